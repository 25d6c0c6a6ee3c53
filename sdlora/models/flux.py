"""FLUX.1's packed latents: the transformer sees an image as a sequence of 2x2 latent patches.

    latents (B, C, h, w) -> packed (B, (h/2)(w/2), 4C)     C = 16 for FLUX.1, so 64 features a token
    token (i, j) = the patch at rows 2i..2i+1, columns 2j..2j+1, its features ordered (c, row, column)

and each token's position id is (0, i, j), which the transformer's 3-axis rotary embedding reads;
the text tokens' ids are (0, 0, 0). The same layout as BFL's `einops "b c (h ph) (w pw) -> b (h w)
(c ph pw)"` (kohya's `flux_utils.pack_latents`) and diffusers' `FluxPipeline._pack_latents`. h and w
must be even: images in multiples of 16 px (VAE /8, then /2).
"""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2)  # (B, C, h/2, row, w/2, column)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, (h/2)(w/2), 4C) -> (B, C, h, w) for latents of `height` x `width` (h x w, not pixels)."""
    b, _, features = packed.shape
    patches = packed.view(b, height // 2, width // 2, features // 4, 2, 2)  # (B, h/2, w/2, C, row, column)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, features // 4, height, width)


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """((h/2)(w/2), 3) position ids (0, i, j) of the packed tokens of h x w latents, in packing order."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
