"""Noise shaping of the training loss: kohya's noise offset (fixed and adaptive) and pyramid
(multi-resolution) noise. The objective itself (noisy latents, target, timesteps, min-SNR
weights) is the family's (`models.families.base.DiffusionObjective`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pyramid_noise(shape: tuple[int, int, int], iterations: int, discount: float,
                  generator: torch.Generator) -> torch.Tensor:
    """The multi-resolution part of kohya's pyramid noise (custom_train_functions.pyramid_noise_like,
    after Whitaker's multires noise) for one latent (C, H, W):

        P = sum_i upsample(randn(C, H // r_i^i, W // r_i^i)) * discount^i,   r_i ~ U[2, 4), i < iterations

    bilinear upsampling back to (H, W); it stops after the first level that is 1 pixel high or wide.
    `add_pyramid` adds P to the noise and rescales the sum to unit variance."""
    c, h, w = shape
    pyramid = torch.zeros(shape)
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((1, c, hn, wn), generator=generator)
        pyramid += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)[0] * discount**i
        if hn == 1 or wn == 1:
            break
    return pyramid


def add_pyramid(noise: torch.Tensor, pyramid: torch.Tensor) -> torch.Tensor:
    """(noise + pyramid) / std, the std taken per example (B, C, H, W): kohya divides by the whole
    batch's, the same for one example; per example, an example's noise does not depend on which
    examples share its batch or process."""
    noise = noise + pyramid
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def noise_offset_strength(tc, latents: torch.Tensor) -> torch.Tensor | float:
    """train.noise_offset, plus adaptive_noise_scale x |mean of each latent channel| (kohya's adaptive
    noise offset, (B, C, 1, 1), clamped at 0 for a negative scale); latents already scaled."""
    if not tc.adaptive_noise_scale:
        return tc.noise_offset
    channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
    return torch.clamp(tc.noise_offset + tc.adaptive_noise_scale * channel_mean, min=0.0)
