"""The CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships; T5-XXL's, found offline.

open_clip's `bpe_simple_vocab_16e6.txt.gz` holds the merges of OpenAI's CLIP BPE. The
`vocab.json` / `merges.txt` pair that `transformers.CLIPTokenizer` reads is derived from
it exactly: 256 byte symbols, the same with `</w>`, one token per merge (48,894), then
`<|startoftext|>` and `<|endoftext|>` (49,408 in all), which is the SD1.x tokenizer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from sdlora import ASSETS
from sdlora.errors import UserError
from sdlora.io import atomic_write_text

N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-unicode table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_bpe_path() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")


def write_clip_tokenizer_files(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of SD1.x's CLIP tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
              "do_lower_case": True, "errors": "replace", **special}
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
    return out_dir


def clip_tokenizer(cache_dir: str | Path | None = None):
    """A `transformers.CLIPTokenizer` equal to SD1.x's, with no download."""
    from transformers import CLIPTokenizer

    if cache_dir is None:
        cache_dir = ASSETS / "clip_tokenizer"
    cache_dir = Path(cache_dir)
    if not (cache_dir / "vocab.json").exists():
        write_clip_tokenizer_files(cache_dir)
    return CLIPTokenizer.from_pretrained(str(cache_dir))


def open_clip_tokenizer(cache_dir: str | Path | None = None):
    """SD2's tokenizer and SDXL's second: the same vocabulary, padded with "!" (id 0) as OpenCLIP
    pads, where OpenAI CLIP pads with <|endoftext|>."""
    tokenizer = clip_tokenizer(cache_dir)
    tokenizer.pad_token = "!"
    return tokenizer


# T5-XXL's tokenizer (google/t5-v1_1-xxl's SentencePiece model, 32,100 pieces) is not derivable from
# anything installed, so it is not shipped: a FLUX.1 / SD3.x single file is read with a tokenizer folder
# the user has (model.text_encoders) or the copy in the Hugging Face cache of one of these repositories'
# (a tokenizer.json: T5TokenizerFast reads it without the sentencepiece package).
T5_TOKENIZER_SOURCES = ("black-forest-labs/FLUX.1-dev/tokenizer_2", "black-forest-labs/FLUX.1-schnell/tokenizer_2",
                        "stabilityai/stable-diffusion-3.5-medium/tokenizer_3",
                        "stabilityai/stable-diffusion-3.5-large/tokenizer_3")


def t5_tokenizer(cache_dir: str | Path | None = None):
    """T5-XXL's T5TokenizerFast from the local Hugging Face cache (`cache_dir`, None: the default one) of one of
    `T5_TOKENIZER_SOURCES`, never downloaded; a UserError that says where to get one when no copy is there.
    (transformers builds an empty T5 tokenizer when asked for files it lacks, so the file is looked up first.)"""
    from huggingface_hub import try_to_load_from_cache
    from transformers import T5TokenizerFast

    for source in T5_TOKENIZER_SOURCES:
        owner, name, subfolder = source.split("/")
        found = try_to_load_from_cache(f"{owner}/{name}", f"{subfolder}/tokenizer.json", cache_dir=cache_dir)
        if isinstance(found, str):
            return T5TokenizerFast.from_pretrained(Path(found).parent, local_files_only=True)
    raise UserError("model.text_encoders: T5-XXL's tokenizer is not on this machine; add its folder to "
                    "model.text_encoders (ComfyUI's comfy/text_encoders/t5_tokenizer, tokenizer_2 of a FLUX.1 or "
                    "tokenizer_3 of an SD3.5 diffusers folder), or fetch it once into the Hugging Face cache: huggingface-cli download "
                    "black-forest-labs/FLUX.1-schnell --include 'tokenizer_2/*'")
