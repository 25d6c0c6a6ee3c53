"""Renders kept by what made them, so a picture is drawn once: `<output.dir>/cache/renders`.

After training, every saved epoch is rendered on the config's prompts and seeds to score it
(training/results.py); `sdlora sample --epochs-dir --native` asks for the same pictures and finds
them here, and a grid's base column (scale 0) is drawn once for every preview and sweep.

A render's key is a sha256 over everything that decides its pixels:

    the base       its model hash and the [model] settings the sampler reads
    the adapters   each active adapter's file digest and weight (none at scale 0: the base's picture)
    the call       prompt, negative prompt, seed, size, steps, pass (hires mode), CFG scale, sampler
    [sample]       every other setting (hires denoise and tiles, distilled guidance, ...) except the
                   grid's own layout (prompts, seeds, scales, thumbnails, when previews run)
    the code       sdlora's own source and the versions of torch, diffusers and transformers
    the machine    device, dtype, whether adapters are merged

so a changed file, setting or version is a new key: the cache only saves time, and deleting the
folder loses nothing. Each entry is a PNG whose text holds the pass's A1111 parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from importlib.metadata import version
from pathlib import Path

from sdlora import ASSETS
from sdlora.digest import file_digest
from sdlora.io import inside
from sdlora.sampling.infotext import save_png

# [sample] fields that lay out a grid (or say when previews run) without changing any picture.
LAYOUT_FIELDS = frozenset({"prompts", "prompt_file", "seeds", "lora_scales", "thumbnail", "every_n_epochs",
                           "preview_steps", "batch_size", "fuse", "negative_prompt", "cfg_scale", "sampler",
                           "width", "height", "steps"})
PARAMS_KEY = "sdlora-render"  # the PNG text chunk holding the pass's A1111 parameters


@functools.cache
def code_identity() -> str:
    """sha256 over sdlora's Python source, with the versions of the libraries that draw: an edit to
    the code or an upgrade is a new key."""
    h = hashlib.sha256()
    package = ASSETS.parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    for lib in ("torch", "diffusers", "transformers"):
        h.update(f"{lib}={version(lib)}".encode())
    return h.hexdigest()


def _active(weight) -> bool:
    return weight != (0, 0) if isinstance(weight, tuple) else weight != 0


class RenderCache:
    """Renders of one output folder, by key (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.hits = 0  # renders this object found rather than drew
        self.misses = 0

    @classmethod
    def of(cls, cfg) -> RenderCache:
        return cls(cfg.output_dir / "cache" / "renders")

    def key(self, sampler, prompt: str, negative: str, seed: int, width: int, height: int, steps: int,
            hires: str, cfg_scale: float, sampler_name: str) -> str:
        s = sampler.cfg.sample
        adapters = [(file_digest(a.path), list(w) if isinstance(w, tuple) else w)
                    for a, w in zip(sampler.adapters.adapters, sampler.adapters.current) if _active(w)]
        model = {k: v for k, v in dataclasses.asdict(sampler.cfg.model).items() if k != "allow_pickle"}
        settings = {k: v for k, v in dataclasses.asdict(s).items() if k not in LAYOUT_FIELDS}
        if s.hires_upscaler and Path(s.hires_upscaler).is_file():  # the upscaler model's weights draw too, not only its name
            settings["hires_upscaler"] = file_digest(s.hires_upscaler)
        what = {"code": code_identity(), "base": sampler.base.model_hash, "model": model,
                "adapters": adapters, "fused": bool(sampler.adapters.fuse) if adapters else None,
                "device": str(sampler.device), "dtype": str(sampler.pipe.dtype), "sample": settings,
                "call": [prompt, negative, int(seed), width, height, steps, hires, float(cfg_scale), sampler_name]}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    def _read(self, key: str):
        """(image, parameters) stored under `key`, or None when absent or unreadable (a cache miss)."""
        from PIL import Image

        path = self.folder / f"{key}.png"
        if not path.is_file():
            return None
        try:
            with Image.open(path) as im:
                im.load()
                params = json.loads(im.text[PARAMS_KEY])
                return im.convert("RGB"), params
        except (OSError, ValueError, KeyError, SyntaxError):
            return None

    def render(self, sampler, prompts: list[str], seeds: list[int], width: int, height: int, steps: int,
               hires: str = "off", negatives: list[str] | None = None, cfg_scale: float | None = None,
               sampler_name: str | None = None) -> tuple[list, list[dict]]:
        """`Sampler.render` of each (prompt, seed), drawing only those not stored; returns the images and
        each one's parameters. The missing ones are drawn together in one call, in order."""
        s = sampler.cfg.sample
        negatives = list(negatives) if negatives else [s.negative_prompt] * len(prompts)
        call = (width, height, steps, hires, s.cfg_scale if cfg_scale is None else cfg_scale,
                sampler_name or s.sampler)
        keys = [self.key(sampler, p, n, seed, *call) for p, n, seed in zip(prompts, negatives, seeds)]
        found = [self._read(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            images, params = sampler.render([prompts[i] for i in todo], [seeds[i] for i in todo], width, height,
                                            steps, hires, [negatives[i] for i in todo], cfg_scale, sampler_name)
            for i, image in zip(todo, images):
                found[i] = image, params
                save_png_with(image, inside(self.folder, self.folder / f"{keys[i]}.png", "render cache"), params)
        return [f[0] for f in found], [f[1] for f in found]


def save_png_with(image, path: Path, params: dict) -> None:
    """A cache entry: the image, its pass's parameters as JSON in the PNG's text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, path, json.dumps(params), key=PARAMS_KEY)
