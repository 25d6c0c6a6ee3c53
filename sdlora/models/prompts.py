"""Prompts as A1111 users write them: `<lora:name:w>` tags, prompt editing, emphasis, BREAK,
75-token chunks, and kohya's prompt files.

    "a (red:1.2) [house:castle:0.5], [blurry], <lora:pastel:0.8:unet=1> BREAK sunset"

1. Extra-network tags `<kind:args>` are taken out of the text; `<lora:name:w>` (and A1111's alias
   `<lyco:...>`) asks for the adapter `name` at weight w (default 1). A1111's fields: positional
   `name:te:unet`, or named `te=` / `unet=`; the U-Net multiplier defaults to the text encoder's.
2. Composable diffusion (A1111's `AND`, and a `:w` weight at the very end of a prompt, which A1111
   reads as that subprompt's weight) is refused; a `:1` at the end is dropped, as A1111 does.
3. Prompt editing (A1111's `get_learned_conditioning_prompt_schedules`): `[from:to:when]`,
   `[to:when]`, `[from::when]` switch text at a step, `[a|b|c]` alternates every step. `when` with a
   dot is a fraction of the steps, without one a step number; in the hires pass a fraction is
   written 1.x and a step number counts on from the first pass's steps. Denoising step i (from 0)
   uses the first text whose end step e has i <= e, as A1111's sampler does.
4. Emphasis (A1111's `parse_prompt_attention`): `(text)` multiplies the weight of its tokens by
   1.1, `[text]` divides it by 1.1, `(text:w)` (spaces allowed around w) multiplies it by w;
   brackets nest by multiplying, an unclosed bracket runs to the end, `\\(` is a literal bracket;
   `BREAK` ends a chunk.
5. Chunks (A1111's `tokenize_line`): the tokens go into chunks of 75, each encoded on its own
   as [BOS] + 75 tokens (padded) + [EOS], so a prompt never loses its tail; when a chunk is full
   and a comma came within the last 20 tokens, the text after that comma moves to the next one.
6. Weights (A1111's "Original" emphasis), per chunk and per text encoder:
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
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import UserError

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
            try:
                factor = float(weight)
            except ValueError:  # "[.\d]+" also matches "1.2.3" or "."; A1111 fails on them too
                raise UserError(f"prompt {text!r}: {weight!r} is not a weight; write it as a number, e.g. (word:1.2)") \
                    from None
            multiply(open_round.pop(), factor)
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
    """`<lora:name:te:unet>`: the adapter's multipliers on the text encoder(s) and on the U-Net."""

    name: str
    te: float
    unet: float

    @property
    def multiplier(self) -> float | tuple[float, float]:
        """One number when both parts take the same multiplier, else (te, unet)."""
        return self.te if self.te == self.unet else (self.te, self.unet)


def _lora_tag(kind: str, args: str) -> LoraTag:
    """A1111's reading of a tag's fields (extra_networks_lora): each field is `key=value` or
    positional; positional name, te, unet; `te=` and `unet=` override them; unet defaults to te."""
    positional, named = [], {}
    for item in args.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    example = f"e.g. <lora:{name or 'name'}:0.8> or <lora:{name or 'name'}:te=0.5:unet=1>"
    if not name:
        raise UserError(f"prompt tag <{kind}:{args}>: no adapter name; {example}")
    if "dyn" in named or len(positional) > 3:
        raise UserError(f"prompt tag <{kind}:{args}>: dyn (a dynamic rank) is not supported by sdlora; remove it "
                        f"({example})")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise UserError(f"prompt tag <{kind}:{args}>: unknown field {unknown[0]!r}; the fields are te= and unet= "
                        f"({example})")
    try:
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
    except ValueError:
        raise UserError(f"prompt tag <{kind}:{args}>: the multipliers must be numbers; {example}") from None
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise UserError(f"prompt tag <{kind}:{args}>: the multipliers must be finite numbers; {example}")
    return LoraTag(name, te, unet)


def extract_networks(text: str) -> tuple[str, list[LoraTag], list[str]]:
    """(text without `<kind:...>` tags, the LoRA tags, the other tags as written).

    `<lora:name>` is multiplier 1; `<lora:name:w>` w on both parts; `<lora:name:te:unet>`,
    `<lora:name:te=a:unet=b>` separate multipliers for the text encoder(s) and the U-Net.
    """
    tags, others = [], []
    for kind, args in _EXTRA_NETWORK.findall(text):
        if kind in LORA_TAG_KINDS:
            tags.append(_lora_tag(kind, args))
        else:
            others.append(f"<{kind}:{args}>")
    return _EXTRA_NETWORK.sub("", text), tags, others


# ---------------------------------------------------------------------------------------------
# AND and prompt editing

_AND = re.compile(r"\bAND\b")
# A1111's subprompt weight: "text : w" at the end of a subprompt (re_weight in prompt_parser).
_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def conditioned_text(prompt: str, where: str = "prompt") -> str:
    """The text A1111 conditions on for a prompt (tags already removed), or a UserError for
    composable diffusion, which sdlora does not do: `AND`, or a weight other than 1 at the end."""
    if len(_AND.split(prompt)) > 1:
        raise UserError(f"{where} {prompt!r}: AND (composable diffusion) is not supported by sdlora; "
                        f"write one prompt, e.g. with 'and' or a comma")
    text, weight = _SUBPROMPT_WEIGHT.search(prompt).groups()
    if weight is not None and float(weight) != 1:
        raise UserError(f"{where} {prompt!r}: A1111 reads the ':{weight}' at its end as a composable diffusion "
                        f"(AND) weight, which sdlora does not support; remove it")
    return text


def check_prompt(prompt: str, where: str = "prompt") -> None:
    """Raise the UserError that sampling `prompt` would raise (its tags, AND, emphasis weights),
    so a command can refuse it before hours of work rather than at its first sample."""
    try:
        parse_attention(conditioned_text(extract_networks(prompt)[0]))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


# The prompt-editing grammar, read from A1111's rules (prompt_parser.schedule_parser):
#   prompt    = (text | "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]" | edit | alternate)*
#   edit      = "[" [prompt ":"] prompt ":" NUMBER "]"          (spaces allowed around NUMBER)
#   alternate = "[" prompt ("|" prompt)+ "]"
#   whole     = (prompt | one of "[]():" as text)*                a stray "|" or "\" : no editing at all
_TEXT = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")


@dataclass
class _Edit:
    before: list  # items; [] for [to:when]
    after: list
    when: str  # the number as written: a dot makes it a fraction


@dataclass
class _Alternate:
    options: list  # one item list per option


def _items(s: str, i: int) -> tuple[list, int]:
    """The longest `prompt` from position i: (items, end). Items: str, _Edit, _Alternate."""
    items = []
    while i < len(s):
        m = _TEXT.match(s, i)
        if m:
            items.append(m.group())
            i = m.end()
            continue
        found = _round(s, i) if s[i] == "(" else _square(s, i) if s[i] == "[" else None
        if found is None:
            break
        more, i = found
        items.extend(more)
    return items, i


def _round(s: str, i: int):
    inner, j = _items(s, i + 1)
    if s[j:j + 1] == ")":
        return ["(", *inner, ")"], j + 1
    if s[j:j + 1] == ":":
        weight, k = _items(s, j + 1)
        if s[k:k + 1] == ")":
            return ["(", *inner, ":", *weight, ")"], k + 1
    return None


def _square(s: str, i: int):
    first, j = _items(s, i + 1)
    if s[j:j + 1] == "]":
        return ["[", *first, "]"], j + 1
    if s[j:j + 1] == "|":
        options = [first]
        while s[j:j + 1] == "|":
            option, j = _items(s, j + 1)
            options.append(option)
        return ([_Alternate(options)], j + 1) if s[j:j + 1] == "]" else None
    if s[j:j + 1] == ":":
        m = _WHEN.match(s, j + 1)
        if m:
            return [_Edit([], first, m.group(1))], m.end()
        second, k = _items(s, j + 1)
        m = _WHEN.match(s, k + 1) if s[k:k + 1] == ":" else None
        if m:
            return [_Edit(first, second, m.group(1))], m.end()
    return None


def _parse_editing(prompt: str) -> list | None:
    """The prompt's items, or None when A1111's grammar does not take it (then nothing is edited)."""
    items, i = [], 0
    while i < len(prompt):
        more, i = _items(prompt, i)
        items.extend(more)
        if prompt[i:i + 1] in ("[", "]", "(", ")", ":"):  # one character of text, then a prompt again
            items.append(prompt[i])
            i += 1
        elif i < len(prompt):
            return None
    return items


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's schedule of one prompt: [(end step, text)], the last end being the pass's steps.

    steps: the first pass's steps; hires_steps: the hires pass's, for its schedule (section 3).
    """
    try:
        items = _parse_editing(prompt)
    except RecursionError:  # hundreds of nested brackets: read as text rather than fail
        items = None
    if items is None:
        return [(hires_steps or steps, prompt)]
    total, whole, fraction = (steps, 0, 0.0) if hires_steps is None else (hires_steps, steps, 1.0)

    def end(edit: _Edit) -> int:
        v = float(edit.when)
        v = (v - fraction) * total if "." in edit.when else v - whole
        # A1111's min(total, int(v)); clamped first so that 1e999 is `total`, not an overflow
        # (any end below 0 acts alike: never reached).
        return int(min(max(v, -1.0), total))

    def walk(items):
        for item in items:
            if isinstance(item, _Edit):
                yield item
                yield from walk(item.before)
                yield from walk(item.after)
            elif isinstance(item, _Alternate):
                yield item
                for option in item.options:
                    yield from walk(option)

    def text(items, step: int) -> str:
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, _Edit):
                out.append(text(item.before if step <= end(item) else item.after, step))
            else:
                out.append(text(item.options[(step - 1) % len(item.options)], step))
        return "".join(out)

    ends = {total}
    for node in walk(items):
        if isinstance(node, _Alternate):
            ends.update(range(1, total + 1))
        elif end(node) >= 1:
            ends.add(end(node))
    return [(e, text(items, e)) for e in sorted(ends)]


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The text conditioning denoising step `step` (from 0): the first whose end step is >= step."""
    return next((t for e, t in schedule if step <= e), schedule[0][1])


# ---------------------------------------------------------------------------------------------
# Chunks and encoding


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)  # 77 ids: BOS, 75 prompt or padding ids, EOS
    multipliers: list[float] = field(default_factory=list)  # one per id


def chunk_tokens(runs: list[tuple[str, float]], tokenizer) -> list[Chunk]:
    """The prompt's chunks for one tokenizer (section 5 of the module docstring)."""
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


def sequence_tokens(runs: list[tuple[str, float]], tokenizer) -> Chunk:
    """The prompt as one sequence, for a family whose encoders read it whole (FLUX.1's CLIP-L and T5, as
    Forge's T5 engine and its CLIP engine's first chunk read them): [BOS, where the tokenizer has one] +
    the runs' tokens, cut to fit, + [EOS], padded to the tokenizer's model_max_length, each token with its
    run's weight. The tokenizer's own call gives the same ids for a prompt without emphasis. BREAK has no
    meaning in one sequence and is dropped."""
    kept = [(text, weight) for text, weight in runs if (text, weight) != ("BREAK", -1)] or [("", 1.0)]
    ids = tokenizer([text for text, _ in kept], truncation=False, add_special_tokens=False)["input_ids"]
    tokens = [t for piece in ids for t in piece]
    weights = [w for piece, (_, w) in zip(ids, kept) for _ in piece]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    room = tokenizer.model_max_length - len(bos) - 1
    tokens, weights = [*bos, *tokens[:room], tokenizer.eos_token_id], [1.0] * len(bos) + weights[:room] + [1.0]
    filler = tokenizer.model_max_length - len(tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Chunk(tokens + [pad] * filler, weights + [1.0] * filler)


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
