"""A1111's generation parameters ("infotext"): the text every sampled PNG carries in its
`parameters` chunk, written the way A1111 writes it and read back the way it reads it.

Layout: the prompt, then `Negative prompt: ...`, then one line of `Key: value` pairs (A1111's
key order; a value holding a separator is a JSON string).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdlora.io import atomic_path


def _quote(value: str) -> str:
    # A1111 quotes a value holding a separator as a JSON string.
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",\n:") else value


def infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """A1111's layout: prompt, 'Negative prompt: ...', then 'Key: value, ...' (None values left out)."""
    line = ", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Read infotext back like A1111's parse_generation_parameters: {"Prompt", "Negative prompt", key: value}."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameter line: all of it is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result


def save_png(image, path: Path, parameters: str, key: str = "parameters") -> None:
    """Write a PNG atomically with `parameters` as its text chunk `key` (A1111's "parameters")."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(key, parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def parameters_for(prompt: str, seed: int, adapters: list, weights: list[float], negative: str,
                   params: dict) -> str:
    """The infotext of one image: the prompt as written, a `<lora:alias:w>` tag for each active
    adapter (`sampler.Adapter`) the prompt does not already name, and each active adapter's hash once."""
    active = [(a, w) for a, w in zip(adapters, weights) if (w != (0, 0) if isinstance(w, tuple) else w != 0)]
    tags = "".join(f" <lora:{a.alias}:{w:g}>" for a, w in active if not a.from_prompt)
    hashes = ", ".join(dict.fromkeys(f"{a.alias}: {a.short_hash}" for a, _ in active)) or None
    return infotext(prompt + tags, negative, {**params, "Seed": seed, "Lora hashes": hashes, "Version": "sdlora"})
