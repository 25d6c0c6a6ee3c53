"""Encode once: VAE latents (and text-encoder outputs when the text encoder is frozen).

A latent entry is keyed by the image file's content, the bucket size, the VAE's identity
and the preprocessing version, so a re-run performs zero VAE encodes and a changed image
is re-encoded. Entries hold the latent distribution (mean, std) of the image and, with
flip augmentation, of its mirror image: a flipped step samples from the flipped entry,
never from a stale or mirrored-after-encoding latent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlora.data.buckets import Bucket, fit_to_bucket
from sdlora.io import atomic_save_file

PREPROCESS_VERSION = "1"  # bump when fit_to_bucket or normalisation changes


def module_fingerprint(module: torch.nn.Module) -> str:
    """Identity of a model: its config and every weight (cheap next to one encode pass)."""
    h = hashlib.sha256(json.dumps(getattr(module, "config", {}), sort_keys=True, default=str).encode())
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) in [-1, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def read_entry(path: Path, log=print) -> dict[str, torch.Tensor] | None:
    """A cache file's tensors, or None when there is none; a damaged one (a disk error, a killed
    copy) is deleted and reported, so the caller rebuilds it rather than trusting it."""
    if not path.exists():
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad file
        log(f"cache: {path} was damaged ({type(e).__name__}); rebuilding it")
        path.unlink(missing_ok=True)
        return None


class LatentCache:
    def __init__(self, folder: Path, vae, device: torch.device | str = "cpu", dtype=torch.float32, log=print):
        self.folder, self.log = Path(folder), log
        self.vae = vae
        self.device, self.dtype = device, dtype
        self.vae_id = module_fingerprint(vae)
        self.encodes = 0  # images through the VAE (a mirror image counts): a re-run of an unchanged set makes none

    def key(self, digest: str, bucket: Bucket, flip: bool) -> str:
        return f"{digest[:24]}_{bucket}_{self.vae_id}_p{PREPROCESS_VERSION}{'_flip' if flip else ''}"

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def read(self, digest: str, bucket: Bucket, flip_aug: bool) -> dict[str, torch.Tensor] | None:
        """The stored entry, or None when it is missing (or was damaged, and is now removed)."""
        return read_entry(self.path(self.key(digest, bucket, flip_aug)), self.log)

    def get(self, image_path: Path, digest: str, bucket: Bucket, flip_aug: bool, load_image) -> dict[str, torch.Tensor]:
        """{"mean", "std"} (+ "flip_mean", "flip_std" with flip_aug), encoding only on a miss."""
        entry = self.read(digest, bucket, flip_aug)
        if entry is not None:
            return entry
        path = self.path(self.key(digest, bucket, flip_aug))
        image, _ = fit_to_bucket(load_image(image_path), bucket)
        pixels = image_to_tensor(image)[None]
        if flip_aug:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        entry = self._encode(pixels)
        atomic_save_file(entry, path)
        return entry

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.encodes += len(pixels)
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()  # (n, 4, h/8, w/8)
        entry = {"mean": mean[0], "std": std[0]}
        if len(pixels) == 2:
            entry.update(flip_mean=mean[1], flip_std=std[1])
        return entry


class LazyLatents:
    """(digest, bucket) -> an example's latent distribution, for the trainer.

    Entries already on disk are read up front; the others are encoded when training first
    reaches their example, so the first step waits for one batch's encodes, not the whole
    dataset's (the time to first step of diffusers' example), and each image is still encoded
    once. `on_complete` runs once every entry is in memory (the trainer then drops the VAE)."""

    def __init__(self, cache: LatentCache, examples, load_image, on_complete=None):
        self.cache, self.load_image, self.on_complete = cache, load_image, on_complete
        self.examples = {(ex.digest, ex.bucket): ex for ex in examples}
        self.entries: dict = {}
        for key, ex in self.examples.items():
            entry = cache.read(ex.digest, ex.bucket, ex.subset.flip_aug)
            if entry is not None:
                self.entries[key] = entry
        self._check_complete()

    @property
    def missing(self) -> int:
        return len(self.examples) - len(self.entries)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        if key not in self.entries:
            ex = self.examples[key]
            self.entries[key] = self.cache.get(ex.image, ex.digest, ex.bucket, ex.subset.flip_aug, self.load_image)
            self._check_complete()
        return self.entries[key]

    def _check_complete(self) -> None:
        if self.on_complete is not None and not self.missing:
            self.on_complete, done = None, self.on_complete
            done()


class TextEmbeddingCache:
    """Frozen text-encoder outputs per caption (only valid when captions never change):
    {"hidden": (77, d)} and, for SDXL, {"pooled": (1280,)} (`TextConditioning.to_dict`), or a
    per-encoder family's frozen encoders' own outputs ({"1.hidden": (T, d)}: encoder 1's), keyed by
    the encoders' weights, `identity` (family, clip_skip, lengths, encoders) and the caption."""

    def __init__(self, folder: Path, text_encoders, identity: str, encode, log=print):
        self.folder = Path(folder)
        self.encode = encode  # list of captions -> {name: (B, ...)} of the batch
        self.te_id = "_".join(module_fingerprint(te) for te in text_encoders) + f"_{identity}"
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.log = log
        self.encodes = 0  # captions through the text encoders: one per distinct caption not on disk

    def fill(self, captions) -> None:
        for caption in dict.fromkeys(captions):
            self.get(caption)

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        key = hashlib.sha256(f"{self.te_id}\0{caption}".encode()).hexdigest()[:32]
        if key in self.memory:
            return self.memory[key]
        path = self.folder / f"{key}.safetensors"
        entry = read_entry(path, self.log)
        if entry is None:
            self.encodes += 1
            with torch.no_grad():
                outputs = self.encode([caption])
            entry = {name: t[0].float().cpu() for name, t in outputs.items()}
            atomic_save_file(entry, path)
        self.memory[key] = entry
        return entry
