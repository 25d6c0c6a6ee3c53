"""Rendering a tiny SD3.5 base: the Sampler runs StableDiffusion3Pipeline with flow-matching Euler from the
base's scheduler config, classifier-free guidance with the negative prompt and the skip-layer guidance option,
the prompts encoded by the family, sides rendered at the next multiple of 16 and cropped; a Kohya SD3 file
goes through the one engine; `sdlora run` previews and renders its grids."""

import numpy as np
import pytest
import torch
from test_flux_sample import (
    PROMPTS,
    assert_file_changes_each_part_by_scale_alpha_over_rank_up_down,
)
from test_run import RUN_EXTRA
from test_train import make_style

from sdlora import run
from sdlora.adapters import transformer_keys
from sdlora.config import load_config
from sdlora.errors import UserError
from sdlora.models.families import FAMILIES
from sdlora.sampling.sampler import Sampler, pass_settings
from sdlora.tiny.configs import build_sd3_pipeline

SD3 = ["network.train_text_encoder=false", "dataset.shuffle_caption=false"]
NEGATIVE = "a river"


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd35_medium")
    build_sd3_pipeline(medium=True).save_pretrained(folder)
    return folder


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def _reference(folder, **kwargs):
    """diffusers' own pipeline from the folder, its own prompt encoding (T5 at its default 256 tokens), at
    80x64 and centre-cropped by 4 px each side to 72x64."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS, negative_prompt=[NEGATIVE] * 2, width=80, height=64, num_inference_steps=3,
                  guidance_scale=5.0, generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)],
                  **kwargs).images
    return [im.crop((4, 0, 76, 64)) for im in images]


def test_an_sd3_base_renders_as_its_pipeline_does_with_cfg_and_skip_layer_guidance(tmp_path, sd3_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    settings = [*SD3, "sample.cfg_scale=5", f"sample.negative_prompt={NEGATIVE}"]
    sampler = Sampler(load_config(make_style(tmp_path, sd3_dir), settings))
    assert isinstance(sampler.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    images, params = sampler.render(PROMPTS, [3, 4], 72, 64, 3)
    assert [im.size for im in images] == [(72, 64), (72, 64)]
    np.testing.assert_allclose(_pixels(images), _pixels(_reference(sd3_dir)), atol=1)
    assert (params["Sampler"], params["Schedule type"], params["CFG scale"]) == ("Euler", "Simple", 5.0)
    assert params["Render size"] == "80x64, centre-cropped" and params["Distilled CFG Scale"] is None
    assert params["Skip layer guidance"] is None

    # Skip-layer guidance over every step after the first, block 1 skipped: diffusers' pixels, not the plain ones.
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.0,
           "skip_layer_guidance_stop": 1.0}
    settings += ["sample.skip_guidance_layers=[1]", "sample.skip_layer_guidance_scale=2.8",
                 "sample.skip_layer_guidance_start=0.0", "sample.skip_layer_guidance_stop=1.0"]
    sampler = Sampler(load_config(make_style(tmp_path, sd3_dir), settings))
    guided, params = sampler.render(PROMPTS, [3, 4], 72, 64, 3)
    np.testing.assert_allclose(_pixels(guided), _pixels(_reference(sd3_dir, **slg)), atol=1)
    assert not np.array_equal(_pixels(guided), _pixels(images))
    assert params["Skip layer guidance"] == "2.8 (layers 1; steps 0-1)"


@pytest.mark.parametrize("setting, message", [
    ("sample.skip_guidance_layers=[7, 8, 9]", "transformer blocks 0 to 1"),
    ("sample.skip_layer_guidance_start=0.5", "start must be the smaller")])
def test_skip_layer_guidance_mistakes_are_one_line(tmp_path, sd3_dir, setting, message):
    extra = ["sample.skip_layer_guidance_scale=2.8", "sample.skip_layer_guidance_stop=0.4",
             "sample.skip_guidance_layers=[1]"]
    sampler = Sampler(load_config(make_style(tmp_path, sd3_dir), [*SD3, *extra, setting]))
    with pytest.raises(UserError, match=message):
        sampler.render(PROMPTS[:1], [3], 64, 64, 2)


def test_sd3_renders_in_one_flow_matching_pass_at_the_configs_steps(tmp_path):
    cfg = load_config(make_style(tmp_path, tmp_path), [])
    notes = []
    assert pass_settings(FAMILIES["sd35_large"], cfg.sample, "auto", 128, notes.append) == (
        25, "off", "flow-matching Euler")
    assert notes and "SD3.5 Large renders in one pass" in notes[0] and 'set hires = "on" or "tiled"' in notes[0]
    assert [pass_settings(FAMILIES["sd35_large"], cfg.sample, mode, 128, notes.append)[1]
            for mode in ("on", "tiled", "off")] == ["on", "tiled", "off"]


def test_a_kohya_sd3_file_changes_each_diffusers_part_by_scale_alpha_over_rank_up_down(tmp_path, sd3_dir):
    sampler = Sampler(load_config(make_style(tmp_path, sd3_dir), SD3))
    modules = assert_file_changes_each_part_by_scale_alpha_over_rank_up_down(sampler, tmp_path / "sd3.safetensors",
                                                                             transformer_keys.SD3_NAMES)
    assert any(module.swap_halves for module, _, _ in modules.values())  # the last context block's (shift, scale)
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in modules  # SD3.5 Medium's MMDiT-X block


def test_sdlora_run_on_an_sd3_folder_previews_each_epoch_and_renders_the_scale_grid(tmp_path, sd3_dir):
    extra = RUN_EXTRA.replace("max_train_steps = 4", "max_train_steps = 8") + "\nevery_n_epochs = 1\npreview_steps = 2"
    logs = []
    result = run.run(load_config(make_style(tmp_path, sd3_dir, extra=extra), SD3), log=logs.append)
    previews = sorted((tmp_path / "out" / "previews").rglob("preview*grid*.png"))
    assert [p.parent.name for p in previews] == ["epoch000001"]
    assert result["sample"].grids and all(g.is_file() for g in result["sample"].grids)
    assert any("flow-matching Euler" in line and "2 steps" in line for line in logs)
    assert result["figures"] is not None  # scale 0 vs 1: the style figures of the report


def test_the_tiled_pass_with_one_tile_is_sd3_img2img_with_cfg(tmp_path, sd3_dir):
    """The tiled pass's SD3 denoiser (its scheduler's shifted sigmas, sigma input, classifier-free guidance
    with the negative prompt) over one tile equals StableDiffusion3Img2ImgPipeline from the same latents."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    from sdlora.sampling import tiled
    from sdlora.sampling.sampler import make_scheduler

    sampler = Sampler(load_config(make_style(tmp_path, sd3_dir), [*SD3, "sample.cfg_scale=5"]))
    text, negative = sampler.encode_whole(PROMPTS[:1]), sampler.encode_whole([NEGATIVE])
    first, _ = sampler.render(PROMPTS[:1], [3], 96, 64, 2)
    latents = tiled.encode(sampler.pipe, first[0])  # (1, C, 8, 12)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    denoiser = tiled.FlowDenoiser(sampler.family.for_sampling(0.0), sampler.pipe.transformer, text, (64, 96),
                                  negative, 5.0)
    scheduler = make_scheduler("euler", sampler.base.noise_scheduler)
    ours = tiled.refine(latents, noise, scheduler, denoiser, num_steps=4, strength=0.5, tile=12, overlap=2)

    img2img = StableDiffusion3Img2ImgPipeline.from_pipe(sampler.pipe,
                                                        scheduler=make_scheduler("euler", sampler.base.noise_scheduler))
    theirs = img2img(prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled, negative_prompt_embeds=negative.hidden,
                     negative_pooled_prompt_embeds=negative.pooled, image=latents, strength=0.5, num_inference_steps=4,
                     guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(7)).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    unguided = tiled.FlowDenoiser(sampler.family.for_sampling(0.0), sampler.pipe.transformer, text, (64, 96))
    assert not torch.allclose(ours, tiled.refine(latents, noise, make_scheduler("euler", sampler.base.noise_scheduler),
                                                 unguided, num_steps=4, strength=0.5, tile=12, overlap=2))


@pytest.mark.parametrize("hires", ["on", "tiled"])
def test_an_asked_for_second_pass_keeps_the_size_and_says_so(tmp_path, sd3_dir, hires):
    settings = [*SD3, "sample.hires_tile=48", "sample.hires_tile_overlap=16", "sample.hires_steps=1",
                f"sample.negative_prompt={NEGATIVE}"]
    sampler = Sampler(load_config(make_style(tmp_path, sd3_dir), settings))
    images, params = sampler.render(PROMPTS[:1], [3], 136, 88, 2, hires=hires)
    assert [im.size for im in images] == [(136, 88)]
    assert params["Hires resize"] == "136x88" and params["Denoising strength"] == 0.45
    assert params.get("Hires mode") == ("tiled" if hires == "tiled" else None)
    one_pass, _ = sampler.render(PROMPTS[:1], [3], 136, 88, 2)
    assert not np.array_equal(_pixels(images), _pixels(one_pass))
