"""[sample] options on a tiny FLUX.1 base: the flow-matching solvers besides Euler (diffusers'
DPMSolverMultistepScheduler on flow sigmas), what the other sampler names do, and the infotext."""

import math

import numpy as np
import pytest
import torch
from test_flux_sample import flux_dirs  # noqa: F401  (the tiny dev and schnell folders, a fixture)
from test_train import make_style

from sdlora.config import load_config
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
