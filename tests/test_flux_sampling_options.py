"""[sample] options on a tiny FLUX.1 base: the flow-matching solvers besides Euler (diffusers'
DPMSolverMultistepScheduler on flow sigmas), what the other sampler names do, and the infotext."""

import math

import numpy as np
import pytest
import torch
from test_flux_sample import flux_dirs  # noqa: F401  (the tiny dev and schnell folders, a fixture)
from test_train import make_style

from sdlora.config import load_config
from sdlora.errors import UserError
from sdlora.models.families import FAMILIES
from sdlora.models.flow import flux_mu, shift_sigmas
from sdlora.sampling.sampler import Sampler, pass_settings

FLUX = ["network.train_text_encoder=false", "dataset.shuffle_caption=false"]


def _sampler(tmp_path, folder, *changes) -> Sampler:
    return Sampler(load_config(make_style(tmp_path, folder), [*FLUX, *changes]))


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_dpmpp_2m_steps_through_the_shifted_sigmas_of_the_base(tmp_path, flux_dirs, guidance):
    """DPM++ 2M on flow sigmas, shifted as the base shifts (dev: S = e^mu of the image's 16 packed tokens at
    64x64 px; schnell: S = 1), and its sampler names in the infotext."""
    from diffusers import DPMSolverMultistepScheduler

    sampler = _sampler(tmp_path, flux_dirs[guidance], "sample.sampler=dpmpp_2m")
    assert isinstance(sampler.pipe.scheduler, DPMSolverMultistepScheduler)
    images, params = sampler.render(["a river"], [3], 64, 64, 4)
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Simple")
    shift = math.exp(flux_mu((64 // 16) * (64 // 16))) if guidance else 1.0
    grid = (1 - torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)).flip(0)[:-1]  # s evenly spaced, 0.999 first
    expected = shift_sigmas(grid, shift)
    np.testing.assert_allclose(sampler.pipe.scheduler.sigmas[:-1].double().numpy(), expected.numpy(), atol=1e-5)


def test_dpmpp_2m_solves_the_same_flow_as_euler(tmp_path, flux_dirs):
    """Both integrate the model's velocity field from the same noise: with many steps they reach the same
    image, with few they differ (a solver that ignored the flow would not converge to Euler's image)."""
    sampler = _sampler(tmp_path, flux_dirs[True])

    def render(name, steps):
        images, _ = sampler.render(["a river"], [5], 64, 64, steps, sampler=name)
        return np.asarray(images[0], dtype=np.float64)

    euler = render("euler", 24)
    assert np.abs(render("dpmpp_2m", 24) - euler).mean() < 0.25 * np.abs(render("dpmpp_2m", 2) - euler).mean()
    assert sampler.scheduler_name == "dpmpp_2m"  # switched per call (a prompt file's --ss)


def test_sampler_names_without_a_flow_form_render_with_euler_and_a_note_says_so(tmp_path, flux_dirs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampler = _sampler(tmp_path, flux_dirs[True], "sample.sampler=euler_a")
    assert isinstance(sampler.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    _, params = sampler.render(["a river"], [3], 64, 64, 2)
    assert (params["Sampler"], params["Schedule type"]) == ("Euler", "Simple")
    dev, notes = FAMILIES["flux1_dev"], []
    assert pass_settings(dev, sampler.cfg.sample, "off", 128, notes.append)[2] == "flow-matching Euler"
    assert notes == ["note: [sample] sampler = 'euler_a' has no flow-matching form in diffusers; FLUX.1 dev renders "
                     "with flow-matching Euler (or set sampler = 'euler' or 'dpmpp_2m')"]
    dpm = load_config(make_style(tmp_path, flux_dirs[True]), ["sample.sampler=dpmpp_2m"]).sample
    assert pass_settings(dev, dpm, "off", 128, notes.append)[2] == "flow-matching DPM++ 2M" and len(notes) == 1


def _count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_hires_on_is_flux_img2img_at_the_render_size_then_the_crop(tmp_path, flux_dirs):
    """hires = "on" on FLUX.1: the first pass at the native area (64 px tiny: 80x64 for 104x72), a Lanczos
    upscale to the render size (the next multiples of 16, 112x80), FluxImg2ImgPipeline at hires_denoise for
    exactly hires_steps steps, and the centre crop to the size asked for."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline
    from PIL import Image

    sampler = _sampler(tmp_path, flux_dirs[True], "sample.hires_denoise=0.45", "sample.hires_steps=2",
                       "sample.sampler=dpmpp_2m")
    assert sampler.base.resolution == 64
    calls = _count_calls(sampler.pipe.transformer)
    images, params = sampler.render(["a river"], [3], 104, 72, 3, hires="on")
    assert [im.size for im in images] == [(104, 72)] and len(calls) == 3 + 2
    assert (params["Size"], params["Hires resize"], params["Render size"]) == ("80x64", "104x72",
                                                                               "112x80, centre-cropped")
    assert (params["Sampler"], params["Hires sampler"], params["Denoising strength"]) == ("DPM++ 2M", "Euler", 0.45)

    # The reference: diffusers' pipelines with the same prompt encoding, the first pass with DPM++ 2M
    text = sampler.encode(["a river"])
    pipe = FluxPipeline.from_pretrained(flux_dirs[True])
    pipe.set_progress_bar_config(disable=True)
    euler = pipe.scheduler
    pipe.scheduler = sampler.pipe.scheduler
    first = pipe(prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled, width=80, height=64,
                 num_inference_steps=3, guidance_scale=3.5, generator=torch.Generator().manual_seed(3)).images[0]
    img2img = FluxImg2ImgPipeline.from_pipe(pipe, scheduler=euler)
    expected = img2img(prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled,
                       image=first.resize((112, 80), Image.LANCZOS), width=112, height=80, strength=0.45,
                       num_inference_steps=4, guidance_scale=3.5, generator=torch.Generator().manual_seed(3)).images[0]
    np.testing.assert_allclose(np.asarray(images[0], dtype=float), np.asarray(expected.crop((4, 4, 108, 76)),
                                                                              dtype=float), atol=1)


def test_flow_img2img_steps_are_the_steps_asked_for():
    from sdlora.sampling.sampler import flow_img2img_steps

    for steps in (1, 2, 7, 20, 29):
        for strength in (0.05, 0.29, 0.3, 0.45, 0.5, 0.75, 1.0):
            n = flow_img2img_steps(steps, strength)
            assert n - int(n - n * strength) == steps, (steps, strength)  # FluxImg2ImgPipeline.get_timesteps


def test_the_tiled_pass_with_one_tile_is_flux_img2img(tmp_path, flux_dirs):
    """The tiled pass's FLUX denoiser (schedule, shift at the whole image's sequence length, sigma input,
    distilled guidance, packing) over one tile equals FluxImg2ImgPipeline from the same latents and noise."""
    from diffusers import FluxImg2ImgPipeline

    from sdlora.models.flux import unpack_latents
    from sdlora.sampling import tiled
    from sdlora.sampling.sampler import make_scheduler

    sampler = _sampler(tmp_path, flux_dirs[True])
    text = sampler.encode(["a river"])
    first, _ = sampler.render(["a river"], [3], 96, 64, 2)
    latents = tiled.encode(sampler.pipe, first[0])  # (1, C, 8, 12)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    family = sampler.family.for_sampling(2.0)
    denoiser = tiled.FlowDenoiser(family, sampler.pipe.transformer, text, (64, 96))
    scheduler = make_scheduler("euler", sampler.base.noise_scheduler)
    ours = tiled.refine(latents, noise, scheduler, denoiser, num_steps=4, strength=0.5, tile=12, overlap=2)

    img2img = FluxImg2ImgPipeline.from_pipe(sampler.pipe, scheduler=make_scheduler("euler", sampler.base.noise_scheduler))
    packed = img2img(prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled, image=latents, width=96, height=64,
                     strength=0.5, num_inference_steps=4, guidance_scale=2.0, output_type="latent",
                     generator=torch.Generator().manual_seed(7)).images  # its noise: the same draw
    torch.testing.assert_close(ours, unpack_latents(packed, 8, 12), atol=1e-4, rtol=1e-4)


def test_hires_tiled_keeps_the_size_in_tiles_of_multiples_of_16(tmp_path, flux_dirs):
    sampler = _sampler(tmp_path, flux_dirs[False], "sample.hires_tile=48", "sample.hires_tile_overlap=16",
                       "sample.hires_steps=1")
    calls = _count_calls(sampler.pipe.transformer)
    images, params = sampler.render(["a river"], [3], 136, 88, 2, hires="tiled")
    assert [im.size for im in images] == [(136, 88)]
    # 144x96 px render: 18x12 latent cells in 6x6 tiles overlapping by 2 -> 4 x 3 tiles, one batched call per step
    assert len(calls) == 2 + 2  # batches of 8 tiles: 2 calls for the hires step
    assert (params["Hires mode"], params["Hires tile"], params["Hires tile overlap"]) == ("tiled", "48x48", 16)
    assert "Hires sampler" not in {k for k, v in params.items() if v is not None}  # Euler in both passes
    bad = _sampler(tmp_path, flux_dirs[False], "sample.hires_tile=40", "sample.hires_tile_overlap=16")
    with pytest.raises(UserError, match=r"hires_tile = 40 is not a multiple of 16, which FLUX.1 schnell needs; try 32"):
        bad.render(["a river"], [3], 136, 88, 2, hires="tiled")


def test_pass_settings_keep_an_asked_for_second_pass_and_auto_stays_off(tmp_path):
    cfg = load_config(make_style(tmp_path, tmp_path), ["sample.width=1024", "sample.height=1024"])
    dev, notes = FAMILIES["flux1_dev"], []
    assert pass_settings(dev, cfg.sample, "on", 512, notes.append)[1] == "on"
    assert pass_settings(dev, cfg.sample, "tiled", 512, notes.append)[1] == "tiled"
    assert notes == []
    assert pass_settings(dev, cfg.sample, "auto", 512, notes.append)[1] == "off"
    assert notes and 'set hires = "on" or "tiled"' in notes[0]


def test_flux_prompts_take_a1111_emphasis_on_t5_as_forge_does(tmp_path, flux_dirs):
    """(word:w) scales T5's states of word's tokens by w, then the whole by mean(z) / mean(z w) (A1111's
    "Original" emphasis, Forge's T5 engine); CLIP-L's pooled output is that of the text without the syntax;
    a prompt without syntax is encoded as FluxPipeline's own tokenizer calls encode it."""
    from sdlora.models.families.base import tokenize

    sampler = _sampler(tmp_path, flux_dirs[True])
    t5 = sampler.base.tokenizers[1]
    lengths = sampler.family.token_lengths(sampler.base.tokenizers)  # T5: dev's 512
    plain, weighted = sampler.encode_whole(["a red house", "a (red:1.5) house"]).hidden, None
    reference = sampler.encode_ids(tokenize(sampler.base.tokenizers, ["a red house"], lengths))
    torch.testing.assert_close(plain[:1], reference.hidden, rtol=0, atol=0)
    weighted = sampler.encode_whole(["a (red:1.5) house"])
    # the T5 ids of the pieces "a ", "red", " house" as Forge tokenizes them, each piece on its own
    pieces = t5(["a ", "red", " house"], add_special_tokens=False)["input_ids"]
    ids = [t for piece in pieces for t in piece] + [t5.eos_token_id]
    ids += [t5.pad_token_id] * (lengths[1] - len(ids))
    z = sampler.base.text_encoders[1](torch.tensor([ids])).last_hidden_state
    w = torch.ones(len(ids))
    w[len(pieces[0]):len(pieces[0]) + len(pieces[1])] = 1.5
    expected = z * w[None, :, None]
    expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(weighted.hidden, expected, rtol=1e-5, atol=5e-5)  # float sums over 512 x d
    clip = sampler.encode_ids(tokenize(sampler.base.tokenizers, ["a red house"], lengths)).pooled
    torch.testing.assert_close(weighted.pooled, clip, rtol=1e-5, atol=1e-6)  # "a " + "red" + " house"
    images, _ = sampler.render(["a (red:1.5) house"], [3], 64, 64, 2)
    plain_image, _ = sampler.render(["a red house"], [3], 64, 64, 2)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(plain_image[0]))
    with pytest.raises(UserError, match="prompt editing and alternation .* are not supported for FLUX.1 dev"):
        sampler.render(["a [red:blue:0.5] house"], [3], 64, 64, 2)
