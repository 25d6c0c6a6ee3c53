"""Captions and prompts longer than CLIP's 75 tokens, kohya's `max_token_length` (75 | 150 | 225).

CLIP encodes 77 positions: BOS, 75 tokens, EOS (padding after a short text). kohya's long
captions split the tokens into n = max_token_length / 75 chunks, encode each chunk as its own
77-position sequence (BOS, <= 75 tokens, EOS, padding), and join the states:

    hidden = [BOS state of chunk 0] ++ chunk_0[1:76] ++ ... ++ chunk_{n-1}[1:76] ++ [last state of chunk n-1]

so the U-Net sees (B, 2 + 75 n, d): 77, 152 or 227 positions. SDXL's pooled embedding is the
first chunk's. A chunk past the end of the text is BOS, EOS, padding, as in kohya. Tokens past
max_token_length are cut; `count_cut` says how many captions lose some.

The per-chunk encoding is `Family.encode_text` (one or two encoders), so the join composes with
whatever a family does for one 77-token sequence. Sampling prompts follow A1111 instead
(`prompts.py`: chunks of 75 concatenated whole, 77 positions each, emphasis, BREAK), which is
how A1111, Forge and ComfyUI condition a long prompt at inference.
"""

from __future__ import annotations

import torch

from sdlora.models.families import FAMILIES
from sdlora.models.families.base import TextConditioning, tokenize
from sdlora.models.prompts import (
    CHUNK_TOKENS as CHUNK,  # tokens per chunk between BOS and EOS (CLIP's 77 - 2)
)

LENGTHS = (75, 150, 225)


def token_count(tokenizer, caption: str) -> int:
    """Tokens of a caption without BOS/EOS."""
    return len(tokenizer(caption, add_special_tokens=False, truncation=False).input_ids)


def count_cut(tokenizer, captions, max_token_length: int) -> int:
    """How many of `captions` are longer than max_token_length tokens (and lose their end)."""
    return sum(token_count(tokenizer, c) > max_token_length for c in dict.fromkeys(captions))


def _chunks(tokenizer, caption: str, n: int) -> torch.Tensor:
    """(n, 77) ids: BOS, up to 75 tokens, EOS, padding, for each chunk of the caption's tokens."""
    ids = tokenizer(caption, add_special_tokens=False, truncation=False).input_ids[:n * CHUNK]
    size = CHUNK + 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for k in range(n):
        part = ids[k * CHUNK:(k + 1) * CHUNK]
        row = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id]
        rows.append(row + [pad] * (size - len(row)))
    return torch.tensor(rows)


def tokenize_long(tokenizers, captions: list[str], max_token_length: int = 75,
                  lengths: list[int] | None = None) -> list[torch.Tensor]:
    """Each tokenizer's ids: (B, 77) for 75 tokens (family.tokenize, each tokenizer padded to its
    `lengths`), else (B, n, 77) chunks."""
    if max_token_length <= CHUNK:
        return tokenize(tokenizers, captions, lengths)
    n = max_token_length // CHUNK
    return [torch.stack([_chunks(tok, c, n) for c in captions]) for tok in tokenizers]


def join_chunks(hidden: torch.Tensor) -> torch.Tensor:
    """(B, n, 77, d) chunk states -> (B, 2 + 75 n, d): kohya's join (see the module docstring)."""
    if hidden.shape[1] == 1:
        return hidden[:, 0]
    middle = hidden[:, :, 1:CHUNK + 1].flatten(1, 2)  # (B, 75 n, d)
    return torch.cat([hidden[:, 0, :1], middle, hidden[:, -1, -1:]], dim=1)


def encode_long(family: str, encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
    """`Family.encode_text` for (B, 77) ids, or chunk by chunk for (B, n, 77) ids, joined."""
    encode_text = FAMILIES[family].encode_text
    if input_ids[0].dim() == 2:
        return encode_text(encoders, input_ids, clip_skip)
    b, n = input_ids[0].shape[:2]
    text = encode_text(encoders, [ids.reshape(b * n, -1) for ids in input_ids], clip_skip)
    hidden = join_chunks(text.hidden.reshape(b, n, *text.hidden.shape[1:]))
    pooled = None if text.pooled is None else text.pooled.reshape(b, n, -1)[:, 0]  # the first chunk's
    return TextConditioning(hidden, pooled)
