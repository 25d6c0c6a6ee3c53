"""Tiled refinement (MultiDiffusion, Bar-Tal et al. 2023) for images far above a base's native size.

A denoiser trained at n x n pixels answers a latent several times larger out of distribution
(the tiny base at 1080x720 draws diagonal hatching; SD1.5 duplicates subjects). Instead, the
upscaled first pass is noised to the hires strength and every step denoises it in overlapping
tiles of the native size, each tile a normal-sized input for the denoiser:

    eps(x_t) = sum_i P_i^T (w_i * eps_theta(P_i x_t, t, c_i)) / sum_i P_i^T w_i

P_i crops tile i, w_i is a window that falls linearly to (almost) zero at the tile's borders,
so a tile's prediction fades out where its neighbour's takes over and no border is a hard cut.
The scheduler then steps the whole latent with the blended prediction, so multistep samplers
(DPM++ 2M) keep one consistent history.

What a family must say lives in `Denoiser`: how a batch of tiles is predicted (the U-Net with
classifier-free guidance; SDXL adds pooled embeddings and time ids that follow each tile's crop
coordinates, as in its crop-conditioned training) and how clean latents are noised to the first
timestep (`scheduler.add_noise` for the DDPM-style schedulers of SD1.x/2.x/SDXL; `FlowDenoiser` for the
flow families, FLUX.1 and SD3.x: x_sigma = (1 - sigma) x + sigma n, their img2img pipelines' schedules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sdlora.models.families.base import TextConditioning

LATENT_CELL = 8  # pixels per latent cell: every VAE sdlora loads downsamples by 8


def spans(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` shared
    cells between neighbours, spread evenly so the first starts at 0 and the last ends at length."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, tile height, tile width) in latent cells; a side shorter than `tile` is one tile."""
    th, tw = min(tile, height), min(tile, width)
    return [(top, left, th, tw) for top in spans(height, th, overlap) for left in spans(width, tw, overlap)]


def ramp(length: int, overlap: int) -> torch.Tensor:
    """1-D blend weights: (i + 0.5) / overlap rising from each end, 1 in the middle; never 0, so a
    cell that only one tile covers (the image's corners) still has a weight to normalise by."""
    i = torch.arange(length, dtype=torch.float32) + 0.5
    return torch.clamp(torch.minimum(i, length - i) / max(overlap, 1), max=1.0)


@dataclass
class Denoiser:
    """A family's denoiser for one image: prompt and negative conditioning, guidance, full size.

    `Family.predict` runs the U-Net with the family's conditioning; SDXL's time ids for a tile are
    (full height, full width, tile top, tile left, tile height, tile width) in pixels: the tile is
    a crop of the full picture, which is how SDXL was trained to read them.
    """

    family: object  # models.families.base.Family of the base
    unet: torch.nn.Module
    text: TextConditioning  # batch 2: (negative, prompt)
    cfg_scale: float
    full_size: tuple[int, int]  # (height, width) in pixels

    def time_ids(self, boxes) -> torch.Tensor | None:
        ids = [self.family.size_conditioning(self.full_size, (top * LATENT_CELL, left * LATENT_CELL),
                                             (th * LATENT_CELL, tw * LATENT_CELL)) for top, left, th, tw in boxes]
        return None if ids[0] is None else torch.stack(ids)

    def __call__(self, tiles: torch.Tensor, t: torch.Tensor, boxes) -> torch.Tensor:
        """tiles (N, C, th, tw), all the same size -> guided model output (N, C, th, tw)."""
        n = tiles.shape[0]
        # (2N, ...): N negative rows then N prompt rows, one U-Net call.
        text = TextConditioning(hidden=self.text.hidden.repeat_interleave(n, dim=0),
                                pooled=None if self.text.pooled is None else
                                self.text.pooled.repeat_interleave(n, dim=0))
        ids = self.time_ids(boxes)
        ids = None if ids is None else ids.repeat(2, 1).to(tiles.device)
        out = self.family.predict(self.unet, torch.cat([tiles, tiles]), t, text, ids, self.unet.dtype).to(tiles.dtype)
        uncond, cond = out.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)

    def noised(self, scheduler, latents, noise, t):
        return scheduler.add_noise(latents, noise, t.reshape(1))

    def set_timesteps(self, scheduler, num_steps: int, device) -> None:
        scheduler.set_timesteps(num_steps, device=device)

    def model_input(self, scheduler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(x, t)


@dataclass
class FlowDenoiser:
    """A flow family's transformer for one image, timesteps scheduled as its img2img pipeline schedules
    them; the transformer takes sigma = t / 1000 (`Family.predict`).

    FLUX.1 (guidance-distilled, `Family.for_sampling` gives dev its guidance input; no `negative`):
    FluxImg2ImgPipeline's sigmas, evenly spaced from 1 to 1/n and shifted at mu of the whole image's
    packed sequence length (the tiles see the sigmas of the image they form). SD3.x (a family with
    classifier-free guidance): its scheduler's own sigmas (shifted by its config; mu only where the config
    asks for dynamic shifting), and with `negative` guidance at `cfg_scale` as StableDiffusion3Img2ImgPipeline
    computes it (negative and text rows in one batch). Skip-layer guidance stays with the first pass."""

    family: object  # models.families.base.Family, `for_sampling` applied
    transformer: torch.nn.Module
    text: TextConditioning  # batch 1
    full_size: tuple[int, int]  # (height, width) in pixels
    negative: TextConditioning | None = None  # batch 1: classifier-free guidance (SD3.x)
    cfg_scale: float = 1.0

    def __call__(self, tiles: torch.Tensor, t: torch.Tensor, boxes) -> torch.Tensor:
        """tiles (N, C, th, tw) -> the velocity (N, C, th, tw); th and tw even (2x2 patches)."""
        rows = [self.text] if self.negative is None else [self.negative, self.text]
        n = tiles.shape[0]
        text = TextConditioning(hidden=torch.cat([r.hidden.repeat(n, 1, 1) for r in rows]),
                                pooled=torch.cat([r.pooled.repeat(n, 1) for r in rows]))
        sigmas = (t / 1000).expand(n * len(rows)).to(tiles.device)
        out = self.family.predict(self.transformer, tiles.repeat(len(rows), 1, 1, 1), sigmas, text, None,
                                  self.transformer.dtype)
        if self.negative is not None:
            uncond, cond = out.chunk(2)
            out = uncond + self.cfg_scale * (cond - uncond)
        return out.to(tiles.dtype)

    def noised(self, scheduler, latents, noise, t):
        return scheduler.scale_noise(latents, t.reshape(1), noise)

    def set_timesteps(self, scheduler, num_steps: int, device) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        height, width = self.full_size
        c = scheduler.config
        mu = calculate_shift((height // LATENT_CELL // 2) * (width // LATENT_CELL // 2), c.base_image_seq_len,
                             c.max_image_seq_len, c.base_shift, c.max_shift)
        # FluxImg2ImgPipeline passes its sigmas, StableDiffusion3Img2ImgPipeline leaves them to the scheduler;
        # the scheduler reads mu only where its config shifts dynamically (both pipelines compute it so).
        sigmas = None if self.family.classifier_free_guidance else np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas, mu=mu)

    def model_input(self, scheduler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x  # flow matching scales nothing


@torch.no_grad()
def refine(latents: torch.Tensor, noise: torch.Tensor, scheduler, denoiser: Denoiser, *, num_steps: int,
           strength: float, tile: int, overlap: int, batch: int = 8, on_step=None) -> torch.Tensor:
    """img2img over (1, C, H, W) latents at `strength`, every step denoised in blended tiles.

    num_steps: the schedule's length; its last int(num_steps * strength) steps run, as in
    diffusers' img2img (sample.img2img_steps picks num_steps for a wanted number of steps).
    tile, overlap: in latent cells.
    on_step(i): called before the i-th step that runs (prompt editing switches the conditioning there).
    """
    denoiser.set_timesteps(scheduler, num_steps, latents.device)
    t_start = max(num_steps - int(num_steps * strength), 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    if len(timesteps) == 0:
        return latents
    x = denoiser.noised(scheduler, latents, noise, timesteps[0])
    _, _, height, width = x.shape
    boxes = tile_boxes(height, width, tile, overlap)
    th, tw = boxes[0][2], boxes[0][3]
    window = (ramp(th, overlap)[:, None] * ramp(tw, overlap)[None, :]).to(x.device, x.dtype)  # (th, tw)
    weight_sum = torch.zeros(height, width, device=x.device, dtype=x.dtype)
    for top, left, _, _ in boxes:
        weight_sum[top:top + th, left:left + tw] += window
    for step, t in enumerate(timesteps):
        if on_step is not None:
            on_step(step)
        model_input = denoiser.model_input(scheduler, x, t)
        blended = torch.zeros_like(x)
        for i in range(0, len(boxes), batch):
            chunk = boxes[i:i + batch]
            tiles = torch.cat([model_input[..., top:top + th, left:left + tw] for top, left, _, _ in chunk])
            prediction = denoiser(tiles, t, chunk)
            for (top, left, _, _), p in zip(chunk, prediction):
                blended[0, :, top:top + th, left:left + tw] += window * p
        x = scheduler.step(blended / weight_sum, t, x).prev_sample
    return x


class _vae_precision:
    """SDXL's VAE overflows in fp16 (its config says force_upcast): run it in fp32 for the call, as
    diffusers' SDXL pipelines do, and give it back in its dtype."""

    def __init__(self, vae):
        self.vae, self.dtype = vae, vae.dtype
        self.upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)

    def __enter__(self):
        if self.upcast:
            self.vae.to(torch.float32)
        return self.vae

    def __exit__(self, *exc):
        if self.upcast:
            self.vae.to(self.dtype)


@torch.no_grad()
def encode(pipe, image) -> torch.Tensor:
    """A PIL image -> (1, C, h, w) float32 latents in the denoiser's scale (the posterior's mean:
    the upscale's content, no extra sampling noise)."""
    with _vae_precision(pipe.vae) as vae:
        pixels = pipe.image_processor.preprocess(image).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode(pipe, latents: torch.Tensor):
    """(1, C, h, w) latents -> a PIL image."""
    with _vae_precision(pipe.vae) as vae:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        pixels = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]
