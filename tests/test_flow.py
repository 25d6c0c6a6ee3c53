"""The rectified-flow objective (models/flow.py) against kohya's formulas (sd-scripts
library/flux_train_utils.py, written out here) and diffusers' functions where they overlap."""

import math

import pytest
import torch

from sdlora.errors import ConfigError
from sdlora.models.flow import FlowObjective, flux_mu


def draws(n: int, seed: int, objective: FlowObjective, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([objective.sample_timesteps(g, **kw) for _ in range(n)])


def normals(n: int, seed: int) -> torch.Tensor:
    """The standard normals the objective draws, one per example, from the same generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn((1,), generator=g) for _ in range(n)])


def uniforms(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand((1,), generator=g) for _ in range(n)])


def test_uniform_and_sigmoid_sampling():
    assert torch.equal(draws(64, 1, FlowObjective("uniform")), uniforms(64, 1))
    z = normals(64, 2)
    # kohya: sigmas = torch.sigmoid(args.sigmoid_scale * torch.randn(bsz))
    assert torch.allclose(draws(64, 2, FlowObjective("sigmoid", sigmoid_scale=1.7)), torch.sigmoid(1.7 * z))


def test_shift_sampling():
    z = normals(64, 3)
    s = torch.sigmoid(z * 0.8)
    expected = (s * 3.1582) / (1 + (3.1582 - 1) * s)  # kohya's "shift"
    got = draws(64, 3, FlowObjective("shift", sigmoid_scale=0.8, discrete_flow_shift=3.1582))
    assert torch.allclose(got, expected)
    assert (got > s).all()  # S > 1 moves every draw towards noise


def test_flux_shift_depends_on_resolution():
    z = normals(32, 4)
    s = torch.sigmoid(z)
    for (h, w), mu in (((128, 128), 1.15), ((64, 64), 0.5 + 0.65 * (1024 - 256) / 3840), ((32, 32), 0.5)):
        # kohya: mu = get_lin_function(y1=0.5, y2=1.15)((h // 2) * (w // 2)); time_shift(mu, 1.0, s)
        assert flux_mu((h // 2) * (w // 2)) == pytest.approx(mu)
        expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
        got = draws(32, 4, FlowObjective("flux_shift"), latent_size=(h, w))
        assert torch.allclose(got, expected)
    # at 1024 px flux_shift is kohya's recommended fixed shift 3.1582 = e^1.15
    assert torch.allclose(draws(32, 4, FlowObjective("flux_shift"), latent_size=(128, 128)),
                          draws(32, 4, FlowObjective("shift", discrete_flow_shift=math.exp(1.15))))
    with pytest.raises(ValueError, match="latent size"):
        FlowObjective("flux_shift").sample_timesteps(torch.Generator())


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_sigma_sampling_indexes_the_shifted_schedule(scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    n, shift = 256, 3.0
    g = torch.Generator().manual_seed(5)
    if scheme == "logit_normal":  # sigmoid(N(mean, std)), the SD3 paper's lognorm
        u = torch.sigmoid(torch.cat([torch.normal(0.3, 1.2, (1,), generator=g) for _ in range(n)]))
    else:
        v = torch.cat([torch.rand((1,), generator=g) for _ in range(n)])
        u = 1 - v - 1.29 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v) if scheme == "mode" else v
    # the 1000-step schedule from 1 down to 1/1000, shifted: entry i is S(1 - i/1000)
    i = (u * 1000).long()
    expected = (shift * (1 - i / 1000)) / (1 + (shift - 1) * (1 - i / 1000))
    objective = FlowObjective("sigma", discrete_flow_shift=shift, weighting_scheme=scheme, logit_mean=0.3,
                              logit_std=1.2)
    got = draws(n, 5, objective)
    assert torch.allclose(got, expected.float())
    # kohya: noise_scheduler.sigmas at the index of noise_scheduler.timesteps[indices]
    g = torch.Generator().manual_seed(5)
    u_df = torch.cat([compute_density_for_timestep_sampling(scheme, 1, 0.3, 1.2, 1.29, generator=g)
                      for _ in range(n)])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    timesteps = scheduler.timesteps[(u_df * 1000).long()]
    kohya = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])
    assert torch.equal(got, kohya)


def test_noisy_target_and_prediction_types():
    g = torch.Generator().manual_seed(6)
    x, n, p = (torch.randn((3, 4, 2, 2), generator=g) for _ in range(3))
    sigma = torch.tensor([0.0, 0.25, 1.0])
    flow = FlowObjective()
    noisy = flow.noisy(x, n, sigma)
    assert torch.equal(noisy[0], x[0]) and torch.equal(noisy[2], n[2])
    assert torch.allclose(noisy[1], 0.75 * x[1] + 0.25 * n[1])
    assert torch.equal(flow.target(x, n, sigma), n - x)
    # the straight line's velocity: x_sigma moves by (n - x) d sigma
    assert torch.allclose((flow.noisy(x, n, sigma + 1e-3) - noisy) / 1e-3, n - x, atol=1e-3)
    assert torch.equal(flow.prediction(p, noisy, sigma), p) and flow.loss_weights(sigma) is None
    assert torch.equal(FlowObjective(model_prediction_type="additive").prediction(p, noisy, sigma), p + noisy)
    scaled = FlowObjective(model_prediction_type="sigma_scaled").prediction(p, noisy, sigma)
    assert torch.allclose(scaled, noisy - sigma.view(-1, 1, 1, 1) * p)
    # x0 preconditioning: the velocity n - x gives back the clean latent
    assert torch.allclose(FlowObjective(model_prediction_type="sigma_scaled").prediction(n - x, noisy, sigma), x,
                          atol=1e-6)


def test_loss_weighting_schemes():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigma = torch.tensor([0.1, 0.5, 0.9])
    expected = {"none": torch.ones(3), "logit_normal": torch.ones(3), "mode": torch.ones(3),
                "sigma_sqrt": 1 / sigma ** 2, "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}
    for scheme, w in expected.items():
        got = FlowObjective(model_prediction_type="sigma_scaled", weighting_scheme=scheme).loss_weights(sigma)
        assert torch.allclose(got, w)
        assert torch.equal(got, compute_loss_weighting_for_sd3(scheme, sigma))
    # as kohya: the weights apply with sigma_scaled only, and the objective says so
    raw = FlowObjective(weighting_scheme="cosmap")
    assert raw.loss_weights(sigma) is None and "sigma_scaled" in raw.notes()[0]
    assert FlowObjective("shift", weighting_scheme="logit_normal").notes()
    assert not FlowObjective().notes()


def test_fixed_timesteps_and_bad_names():
    assert torch.allclose(FlowObjective().fixed_timesteps(4), torch.tensor([0.2, 0.4, 0.6, 0.8]))
    for kw in ({"timestep_sampling": "logit"}, {"model_prediction_type": "v"}, {"weighting_scheme": "snr"}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            FlowObjective(**kw)


@pytest.mark.parametrize("scheme", ["none", "logit_normal"])
def test_sd3_objective_is_kohyas(scheme):
    from sdlora.models.flow import SD3Objective

    n, shift = 256, 3.0
    g = torch.Generator().manual_seed(7)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.cat([torch.normal(0.0, 1.0, (1,), generator=g) for _ in range(n)]))
    else:
        u = torch.cat([torch.rand((1,), generator=g) for _ in range(n)])
    # kohya sd3_train_utils: u = (u * shift) / (1 + (shift - 1) * u); timesteps = (u * 1000).long(); sigmas = t / 1000
    expected = ((u * shift) / (1 + (shift - 1) * u) * 1000).long() / 1000
    objective = SD3Objective(weighting_scheme=scheme, training_shift=shift)
    assert torch.equal(draws(n, 7, objective), expected)
    assert not objective.notes()
    g = torch.Generator().manual_seed(8)
    x, noise, p = (torch.randn((3, 16, 2, 2), generator=g) for _ in range(3))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    noisy = objective.noisy(x, noise, sigma)
    # kohya: model_pred * (-sigmas) + noisy_model_input against target = latents, weighted
    assert torch.equal(objective.prediction(p, noisy, sigma), p * (-sigma.view(-1, 1, 1, 1)) + noisy)
    assert torch.equal(objective.target(x, noise, sigma), x)
    loss = ((objective.prediction(p, noisy, sigma) - objective.target(x, noise, sigma)) ** 2).mean(dim=(1, 2, 3))
    velocity_loss = ((p - (noise - x)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, sigma ** 2 * velocity_loss, atol=1e-5)  # the velocity loss times sigma^2
    cosmap = SD3Objective(weighting_scheme="cosmap").loss_weights(sigma)
    assert torch.allclose(cosmap, 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)))
