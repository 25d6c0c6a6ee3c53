"""Prompts as A1111 users write them: `<lora:name:w>` tags, emphasis, BREAK, 75-token chunks, and
kohya's prompt files.

    "a (red:1.2) house, [blurry], <lora:pastel:0.8> BREAK sunset"

1. Extra-network tags `<kind:args>` are taken out of the text; `<lora:name:w>` (and A1111's alias
   `<lyco:...>`) asks for the adapter `name` at weight w (default 1).
2. Emphasis (A1111's `parse_prompt_attention`): `(text)` multiplies the weight of its tokens by
   1.1, `[text]` divides it by 1.1, `(text:w)` multiplies it by w; brackets nest by multiplying,
   an unclosed bracket runs to the end, `\\(` is a literal bracket; `BREAK` ends a chunk.
3. Chunks (A1111's `tokenize_line`): the tokens go into chunks of 75, each encoded on its own
   as [BOS] + 75 tokens (padded) + [EOS], so a prompt never loses its tail; when a chunk is full
   and a comma came within the last 20 tokens, the text after that comma moves to the next one.
4. Weights (A1111's "Original" emphasis), per chunk and per text encoder:
       z' = z * w[token] * mean(z) / mean(z * w)          z: (1, 77, d) hidden states
   The chunks' states are concatenated: (1, 77 * n, d). A prompt and its negative prompt are
   padded to the same number of chunks with encoded empty chunks (A1111's pad_cond_uncond),
   since the pipelines stack them into one batch. SDXL's pooled embedding is the first chunk's.

`encode` takes the tokenizer(s) and a function encoding a list of (1, 77) id tensors (one per
tokenizer), so SD1/SD2 (one encoder) and SDXL (two, concatenated) share it.

Prompt files (kohya's sample prompts): one prompt per line, options after ` --`:
`--n` negative prompt, `--w` / `--h` size, `--d` seed, `--s` steps, `--l` CFG scale,
`--ss` sampler; empty lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

EMPHASIS = 1.1
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

# One match per token of the emphasis grammar: escaped brackets and backslashes, an opening
# bracket, ":w)" closing a weighted group, a closing bracket, a run of plain text, a lone ":".
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_KINDS = ("lora", "lyco")


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] runs of the prompt; a BREAK is ("BREAK", -1). Neighbours of equal weight merge."""
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            multiply(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            multiply(open_square.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append(["BREAK", -1])
                runs.append([part, 1.0])
    for start in open_round:
        multiply(start, EMPHASIS)
    for start in open_square:
        multiply(start, 1 / EMPHASIS)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


@dataclass
class LoraTag:
    name: str
    weight: float


def extract_networks(text: str) -> tuple[str, list[LoraTag], list[str]]:
    """(text without `<kind:...>` tags, the LoRA tags, the other tags as written).

    `<lora:name>` is weight 1; `<lora:name:w>`; A1111's third field (a separate U-Net weight) is
    accepted only when it equals the second, since sdlora applies one weight per adapter.
    """
    tags, others = [], []
    for kind, args in _EXTRA_NETWORK.findall(text):
        if kind not in LORA_TAG_KINDS:
            others.append(f"<{kind}:{args}>")
            continue
        name, *weights = [a.strip() for a in args.split(":")]
        try:
            numbers = [float(w) for w in weights] or [1.0]
        except ValueError:
            raise UserError(f"prompt tag <{kind}:{args}>: the weight must be a number, e.g. <lora:{name}:0.8>") from None
        if len(set(numbers[:2])) > 1:
            raise UserError(f"prompt tag <{kind}:{args}>: separate text-encoder and U-Net weights are not supported; "
                            f"give one weight, e.g. <lora:{name}:{numbers[0]:g}>")
        tags.append(LoraTag(name, numbers[0]))
    return _EXTRA_NETWORK.sub("", text), tags, others


# ---------------------------------------------------------------------------------------------
# Chunks and encoding


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)  # 77 ids: BOS, 75 prompt or padding ids, EOS
    multipliers: list[float] = field(default_factory=list)  # one per id


def chunk_tokens(runs: list[tuple[str, float]], tokenizer) -> list[Chunk]:
    """The prompt's chunks for one tokenizer (section 3 of the module docstring)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        filler = CHUNK_TOKENS - len(chunk.tokens)
        # After the prompt: EOS, then the tokenizer's padding (EOS for CLIP-L, "!" for OpenCLIP).
        chunk.tokens = [bos, *chunk.tokens, eos] + [pad] * filler
        chunk.multipliers = [1.0, *chunk.multipliers] + [1.0] * (filler + 1)
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    ids = tokenizer([text for text, _ in runs], truncation=False, add_special_tokens=False)["input_ids"]
    for tokens, (text, weight) in zip(ids, runs):
        if (text, weight) == ("BREAK", -1):
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1 and \
                    len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                moved, moved_w = chunk.tokens[last_comma + 1:], chunk.multipliers[last_comma + 1:]
                del chunk.tokens[last_comma + 1:], chunk.multipliers[last_comma + 1:]
                close()
                chunk.tokens, chunk.multipliers = moved, moved_w
            if len(chunk.tokens) == CHUNK_TOKENS:
                close()
            chunk.tokens.append(token)
            chunk.multipliers.append(weight)
    if chunk.tokens or not chunks:
        close()
    return chunks


def emphasize(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: z * w per token, rescaled so the mean of z is unchanged.
    z (B, T, d), multipliers (B, T). All weights 1 leave z as it is (the rule's value; computed,
    a hidden state whose mean is 0, as a layer norm without bias gives, would make it 0 / 0)."""
    if bool((multipliers == 1).all()):
        return z
    weighted = z * multipliers.to(z.dtype).unsqueeze(-1)
    new_mean = weighted.mean()
    return weighted if new_mean == 0 else weighted * (z.mean() / new_mean)


@dataclass
class Encoded:
    hidden: torch.Tensor  # (1, 77 * chunks, d)
    pooled: torch.Tensor | None  # SDXL: the first chunk's pooled embedding


def encode(text: str, tokenizers: list, encode_ids, widths: list[int]) -> Encoded:
    """A1111's conditioning of one prompt (tags already removed).

    encode_ids([ids (1, 77) per tokenizer]) -> an object with `.hidden` (1, 77, sum(widths)) and
    `.pooled`; widths: each encoder's share of the hidden size, weighted and mean-restored apart.
    """
    runs = parse_attention(text)
    per_tokenizer = [chunk_tokens(runs, tok) for tok in tokenizers]
    hidden, pooled = [], None
    for i in range(len(per_tokenizer[0])):
        chunks = [chunks[i] for chunks in per_tokenizer]
        out = encode_ids([torch.tensor([c.tokens]) for c in chunks])
        parts = torch.split(out.hidden, widths, dim=-1)
        hidden.append(torch.cat([emphasize(z, torch.tensor([c.multipliers], device=z.device))
                                 for z, c in zip(parts, chunks)], dim=-1))
        if i == 0:
            pooled = out.pooled
    return Encoded(torch.cat(hidden, dim=1), pooled)


def pad_to_same_length(encoded: list[Encoded], empty: Encoded) -> list[Encoded]:
    """Each conditioning padded with the encoded empty prompt to the longest one's chunk count."""
    n = max(e.hidden.shape[1] for e in encoded)
    chunk = empty.hidden.shape[1]
    return [dataclasses.replace(e, hidden=torch.cat([e.hidden, *[empty.hidden] * ((n - e.hidden.shape[1]) // chunk)],
                                                    dim=1)) for e in encoded]


# ---------------------------------------------------------------------------------------------
# Prompt files


@dataclass
class PromptLine:
    """One prompt of a prompt file: the text and the options that line sets (None: the config's)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None


_OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
            "s": ("steps", int), "l": ("cfg_scale", float), "ss": ("sampler", str)}


def parse_prompt_line(line: str, where: str = "prompt") -> PromptLine:
    """"a house --n blurry --w 768 --d 3" -> PromptLine (kohya's sample-prompt options)."""
    text, *options = line.strip().split(" --")
    result = PromptLine(prompt=text.strip())
    for option in options:
        name, _, value = option.strip().partition(" ")
        if name not in _OPTIONS:
            raise UserError(f"{where}: unknown option --{name}; use --n (negative prompt), --w, --h, --d (seed), "
                            f"--s (steps), --l (CFG scale) or --ss (sampler)")
        field_name, kind = _OPTIONS[name]
        try:
            setattr(result, field_name, kind(value.strip()))
        except ValueError:
            raise UserError(f"{where}: --{name} {value.strip()!r} is not a {kind.__name__}") from None
    return result


def read_prompt_file(path) -> list[PromptLine]:
    """Every prompt of a kohya-style prompt file (UTF-8 text, one per line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} not found (sample.prompt_file / --from-file)")
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(parse_prompt_line(line, f"{path}:{number}"))
    if not lines:
        raise UserError(f"prompt file {path} has no prompts (one per line; # starts a comment)")
    return lines


# ---------------------------------------------------------------------------------------------
# Finding the adapters that tags name


def find_lora(name: str, folders: list[Path]) -> Path:
    """The .safetensors file in `folders` (searched recursively) whose stem or ss_output_name is `name`."""
    from safetensors import safe_open

    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.safetensors")):
            if path.stem == name:
                found.append(path)
                continue
            try:
                with safe_open(str(path), "pt") as f:
                    alias = (f.metadata() or {}).get("ss_output_name")
            except Exception:  # not an adapter we can read: it cannot be the one named
                continue
            if alias == name:
                found.append(path)
    if not found:
        where = ", ".join(str(f) for f in folders) or "no folder (give one with --lora-dir DIR)"
        raise UserError(f"<lora:{name}:...>: no adapter named {name!r} (file name or ss_output_name) in {where}")
    if len(set(found)) > 1:
        raise UserError(f"<lora:{name}:...>: {len(found)} adapters are named {name!r} "
                        f"({', '.join(str(p) for p in found[:3])}); rename one or narrow --lora-dir")
    return found[0]
