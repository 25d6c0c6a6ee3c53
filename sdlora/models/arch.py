"""The architectures of the public Stable Diffusion families, built from the configs shipped in
`assets/configs/<family>/` (the one copy of each; `checkpoint.py` hands the same folders to
diffusers' single-file loader).

Random weights, no download: the benchmarks, the shape tables of the low-rank tools and the
tests that need SD1.5 / SDXL sizes all build their models here.
"""

from __future__ import annotations

import json

import torch

from sdlora import ASSETS

# One diffusers pipeline folder per family (model_index.json, <part>/config.json), without weights.
CONFIGS = ASSETS / "configs"


def part_config(family: str, part: str) -> dict:
    """The shipped config of one part (e.g. ("sd_v1", "unet"); the scheduler's too) as a dict."""
    found = sorted((CONFIGS / family / part).glob("*.json"))
    if not found:
        raise KeyError(f"no shipped {part} config for {family} (looked in {CONFIGS / family / part})")
    return json.loads(found[0].read_text())


def reduced_unet_config(family: str) -> dict:
    """The family's U-Net config at toy width (32-64 channels, one transformer layer per block):
    the same block types and conditioning (SDXL's text_time embedding included), for CPU tests."""
    config = part_config(family, "unet")
    levels = len(config["block_out_channels"])
    config.update(block_out_channels=[32] + [64] * (levels - 1), layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=32, attention_head_dim=[2] * levels, transformer_layers_per_block=1)
    if config.get("addition_embed_type") == "text_time":
        # projection input = 6 time ids x addition_time_embed_dim + the pooled text embedding's width
        config.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    return config


def build_unet(family: str, reduced: bool = False, device=None, dtype: torch.dtype | None = None):
    """A UNet2DConditionModel of the family at random weights (device="meta": shapes only)."""
    from diffusers import UNet2DConditionModel

    config = reduced_unet_config(family) if reduced else part_config(family, "unet")
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel.from_config(config)
    # nn.Module.to: diffusers' own .to warns about casting a model it did not load
    return torch.nn.Module.to(unet, dtype) if dtype is not None else unet


def build_vae(family: str, device=None):
    from diffusers import AutoencoderKL

    with torch.device(device or "cpu"):
        return AutoencoderKL.from_config(part_config(family, "vae"))


def build_text_encoder(family: str, part: str = "text_encoder", device=None):
    """CLIPTextModel (or, for "text_encoder_2" of SDXL, CLIPTextModelWithProjection) at random weights."""
    import transformers
    from transformers import CLIPTextConfig

    config = part_config(family, part)
    cls = getattr(transformers, (config.get("architectures") or ["CLIPTextModel"])[0])
    with torch.device(device or "cpu"):
        return cls(CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"}))


def unet_conditioning(unet, batch: int, device=None, dtype: torch.dtype | None = None, generator=None) -> dict:
    """Random conditioning of the right shapes for `unet(latents, t, **conditioning)`:
    encoder_hidden_states (B, 77, cross_attention_dim) and, for SDXL's text_time embedding,
    added_cond_kwargs = {text_embeds (B, pooled width), time_ids (B, 6)}."""
    config = unet.config
    kwargs = {"device": device, "dtype": dtype, "generator": generator}
    cond = {"encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, **kwargs)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        size = config.sample_size * 8  # (original h, w, crop top, left, target h, w), as SDXL trains
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=device, dtype=dtype or torch.float32)
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, **kwargs),
                                     "time_ids": time_ids.repeat(batch, 1)}
    return cond

