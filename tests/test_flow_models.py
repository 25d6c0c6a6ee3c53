"""FLUX's packed latents (models/flux.py) against diffusers' FluxPipeline, and the tiny FLUX.1 /
SD3.5-architecture parts (tiny/configs.py) running one forward as the families will call them."""

import pytest
import torch

from sdlora.models.flux import latent_image_ids, pack_latents, unpack_latents


@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (1, 4, 2, 2), (3, 16, 128, 96)])
def test_packing_matches_diffusers(shape):
    from diffusers import FluxPipeline

    b, c, h, w = shape
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert packed.shape == (b, (h // 2) * (w // 2), 4 * c)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, b, c, h, w))
    # diffusers unpacks from the pixel size: latents x vae_scale_factor (8)
    assert torch.equal(unpack_latents(packed, h, w), FluxPipeline._unpack_latents(packed, 8 * h, 8 * w, 8))
    assert torch.equal(unpack_latents(packed, h, w), latents)
    ids = latent_image_ids(h, w)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32))
    # token k is the patch at (row, column) = ids[k, 1:], its features ordered (channel, row, column)
    k = len(ids) - 1
    i, j = int(ids[k, 1]), int(ids[k, 2])
    assert torch.equal(packed[:, k], latents[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(b, 4 * c))


@pytest.mark.parametrize("guidance", [True, False])
def test_tiny_flux_forward(guidance):
    from sdlora.tiny.configs import build_flux_components

    parts = build_flux_components(guidance=guidance)
    transformer, clip, t5 = parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]
    assert hasattr(transformer.time_text_embed, "guidance_embedder") == guidance  # dev vs schnell
    latents = torch.randn(2, 16, 8, 6)
    with torch.no_grad():
        t5_out = t5(torch.randint(0, 1000, (2, 12))).last_hidden_state  # (2, 12, 64)
        pooled = clip(torch.randint(0, 1000, (2, 77))).pooler_output  # (2, 32)
        out = transformer(hidden_states=pack_latents(latents), encoder_hidden_states=t5_out, pooled_projections=pooled,
                          timestep=torch.tensor([0.3, 0.9]), img_ids=latent_image_ids(8, 6), txt_ids=torch.zeros(12, 3),
                          guidance=torch.full((2,), 1.0) if guidance else None).sample
    assert out.shape == (2, 12, 64) and torch.isfinite(out).all()
    assert unpack_latents(out, 8, 6).shape == latents.shape


@pytest.mark.parametrize("medium", [False, True])
def test_tiny_sd3_forward(medium):
    from sdlora.tiny.configs import build_sd3_components

    parts = build_sd3_components(medium=medium)
    transformer = parts["transformer"]
    assert (transformer.transformer_blocks[0].attn2 is not None) == medium
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        out_l = parts["text_encoder"](ids, output_hidden_states=True)
        out_g = parts["text_encoder_2"](ids, output_hidden_states=True)
        t5_out = parts["text_encoder_3"](torch.randint(0, 1000, (2, 12))).last_hidden_state  # (2, 12, 64)
        clip_states = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)  # (2, 77, 32 + 32)
        context = torch.cat([clip_states, t5_out], dim=-2)  # (2, 77 + 12, 64)
        pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)  # (2, 32 + 16)
        latents = torch.randn(2, 16, 8, 6)
        out = transformer(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
                          timestep=torch.tensor([300.0, 900.0])).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
