"""Rendering a tiny FLUX.1 base: the Sampler runs FluxPipeline with flow-matching Euler from the base's
scheduler config, dev's distilled guidance as its input (no classifier-free guidance), the prompts
encoded by the family, seeds as for SD, and sides rendered at the next multiple of 16 and cropped."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_train import make_style

from sdlora.adapters import transformer_keys
from sdlora.config import load_config
from sdlora.models.families import FAMILIES
from sdlora.sampling.sampler import Sampler, pass_settings
from sdlora.tiny.configs import build_flux_pipeline

FLUX = ["network.train_text_encoder=false", "dataset.shuffle_caption=false"]
PROMPTS = ["clrscn, mountains, lake", "a river"]


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    folders = {}
    for guidance in (True, False):
        folders[guidance] = tmp_path_factory.mktemp("flux_dev" if guidance else "flux_schnell")
        build_flux_pipeline(guidance=guidance).save_pretrained(folders[guidance])
    return folders


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_a_flux_base_renders_as_flux_pipeline_does_at_the_next_multiple_of_16_cropped(tmp_path, flux_dirs, guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    cfg = load_config(make_style(tmp_path, flux_dirs[guidance]), [*FLUX, "sample.guidance_scale=2.5"])
    sampler = Sampler(cfg)
    assert isinstance(sampler.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    images, params = sampler.render(PROMPTS, [3, 4], 72, 64, 2)
    assert [im.size for im in images] == [(72, 64), (72, 64)]

    # The reference: diffusers' own pipeline from the folder, its own prompt encoding (T5 padded to the
    # folder's tokenizer length, CLIP-L's pooled output), rendered at 80x64 and centre-cropped by 4 px.
    pipe = FluxPipeline.from_pretrained(flux_dirs[guidance])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS, width=80, height=64, num_inference_steps=2, guidance_scale=2.5,
                    max_sequence_length=pipe.tokenizer_2.model_max_length,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)]).images
    expected = [im.crop((4, 0, 76, 64)) for im in expected]
    np.testing.assert_allclose(_pixels(images), _pixels(expected), atol=1)

    again, _ = sampler.render(PROMPTS[:1], [3], 72, 64, 2)
    # A seed gives its image whatever the batch (to float rounding of the batched matmuls).
    np.testing.assert_allclose(_pixels(again)[0], _pixels(images)[0], atol=1)
    assert np.array_equal(_pixels(sampler.render(PROMPTS[:1], [3], 72, 64, 2)[0]), _pixels(again))
    assert params["Size"] == "72x64" and params["Render size"] == "80x64, centre-cropped"
    assert (params["Sampler"], params["Schedule type"], params["CFG scale"]) == ("Euler", "Simple", 1.0)
    assert params["Distilled CFG Scale"] == (2.5 if guidance else None)
    _, exact = sampler.render(PROMPTS[:1], [3], 64, 64, 2)
    assert exact["Render size"] is None


def test_schnell_renders_4_steps_when_the_config_leaves_steps_and_hires_is_off_with_a_note(tmp_path):
    cfg = load_config(make_style(tmp_path, tmp_path), [])
    notes = []
    schnell, dev = FAMILIES["flux1_schnell"], FAMILIES["flux1_dev"]
    assert pass_settings(schnell, cfg.sample, "auto", 128, notes.append) == (4, "off", "flow-matching Euler")
    assert notes and "hires is off" in notes[0]
    assert pass_settings(dev, cfg.sample, "off", 1080, notes.append) == (25, "off", "flow-matching Euler")
    assert len(notes) == 1  # no pass would have run: no note
    steps_set = load_config(make_style(tmp_path, tmp_path), ["sample.steps=8"]).sample
    assert pass_settings(schnell, steps_set, "off", 1080, notes.append)[0] == 8
    assert pass_settings(FAMILIES["sd_v1"], cfg.sample, "on", 128, notes.append) == (25, "on", "dpmpp_2m_karras")


def kohya_transformer_file(path, transformer, names=transformer_keys.FLUX_NAMES, rank=4, alpha=2.0, seed=0):
    """A Kohya FLUX (or SD3, `names`) LoRA with random factors on kohya's default targets, fused modules one
    down shared by their parts (as kohya trains them): {key: (module, down, up)}."""
    generator = torch.Generator().manual_seed(seed)
    modules, tensors = {}, {}
    for key, module in transformer_keys.kohya_modules(transformer, names).items():
        layers = [transformer.get_submodule(p) for p in module.paths]
        down = torch.randn(rank, layers[0].in_features, generator=generator) * 0.1
        up = torch.randn(sum(layer.out_features for layer in layers), rank, generator=generator) * 0.1
        modules[key] = (module, down, up)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    save_file(tensors, path)
    return modules


def test_a_kohya_flux_file_changes_each_diffusers_part_by_scale_alpha_over_rank_up_down(tmp_path, flux_dirs):
    cfg = load_config(make_style(tmp_path, flux_dirs[True]), FLUX)
    assert_file_changes_each_part_by_scale_alpha_over_rank_up_down(Sampler(cfg), tmp_path / "flux.safetensors",
                                                                    transformer_keys.FLUX_NAMES)


def assert_file_changes_each_part_by_scale_alpha_over_rank_up_down(sampler, path, names):
    """A random Kohya file on the sampler's transformer (`kohya_transformer_file`, named by `names`) at scale 0.5
    changes each diffusers part by 0.5 alpha / rank up_j @ down and the render; scale 0 renders the base, and
    closing the adapters gives the base's weights back."""
    transformer = sampler.pipe.transformer
    base = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    base_image, _ = sampler.render(PROMPTS[:1], [3], 64, 64, 2)
    modules = kohya_transformer_file(path, transformer, names)
    sampler.adapters.add(path)
    sampler.adapters.set_scale(0.5)
    for module, down, up in modules.values():
        if module.swap_halves:  # the original's (shift, scale) rows are diffusers' (scale, shift)
            up = torch.cat(up.chunk(2)[::-1])
        rows = up.split([transformer.get_submodule(p).out_features for p in module.paths])
        for path_j, up_j in zip(module.paths, rows):
            change = transformer.get_submodule(path_j).weight - base[f"{path_j}.weight"]
            torch.testing.assert_close(change, 0.5 * (2.0 / 4) * up_j @ down, atol=1e-6, rtol=1e-5)
    assert not np.array_equal(_pixels(sampler.render(PROMPTS[:1], [3], 64, 64, 2)[0]), _pixels(base_image))
    sampler.adapters.set_scale(0.0)
    assert np.array_equal(_pixels(sampler.render(PROMPTS[:1], [3], 64, 64, 2)[0]), _pixels(base_image))
    sampler.adapters.close()
    assert all(torch.equal(p, base[name]) for name, p in transformer.named_parameters())
    return modules
