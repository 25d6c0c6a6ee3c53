"""The rectified-flow objective of SD3.x and FLUX.1, with the interface of `families.base.DiffusionObjective`.

A latent x (B, C, h, w) and Gaussian noise n are joined on a straight line, and the denoiser
learns the line's velocity:

    x_sigma = (1 - sigma) x + sigma n,    sigma in [0, 1] (0: the image, 1: pure noise)
    target  = d x_sigma / d sigma = n - x

`FlowObjective` is the objective with kohya's FLUX options (below), `SD3Objective` the one kohya's
SD3 training uses. Here "timesteps" are the sigmas themselves, () per example and (B,) per batch; FLUX's
transformer takes sigma (it multiplies by 1000 itself), SD3's takes 1000 sigma.

How sigma is drawn follows kohya's `--timestep_sampling` (sd-scripts `library/flux_train_utils.py`,
`get_noisy_model_input_and_timesteps`), z ~ N(0, 1), u ~ U[0, 1):

    uniform      sigma = u
    sigmoid      sigma = sigmoid(sigmoid_scale z)                     (x-flux's; the SD3 paper's logit-normal)
    shift        s = sigmoid(sigmoid_scale z),  sigma = S s / (1 + (S - 1) s),  S = discrete_flow_shift
    flux_shift   the same with S = e^mu, mu linear in the packed sequence length (h/2)(w/2):
                 0.5 at 256 tokens, 1.15 at 4096 (1024 px), so e^mu = 3.1582 there
    sigma        u from the weighting scheme's density (below), then the entry floor(1000 u) of a
                 1000-step flow-matching schedule shifted by discrete_flow_shift, whose sigmas run
                 from 1 down to S(1/1000): sigma = S(1 - floor(1000 u) / 1000)

`weighting_scheme`'s densities for u (diffusers' `compute_density_for_timestep_sampling`, the SD3
paper's section 3.1): logit_normal u = sigmoid(N(logit_mean, logit_std)); mode
u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v ~ U[0, 1); others uniform.

`model_prediction_type` is what the loss compares with the target, from the denoiser's output p:
raw p; additive p + x_sigma; sigma_scaled x_sigma - sigma p, then weighted per example by
diffusers' `compute_loss_weighting_for_sd3`: sigma_sqrt 1 / sigma^2, cosmap
2 / (pi (1 - 2 sigma + 2 sigma^2)), others 1. As in kohya the target stays n - x for all three,
so only raw has the base model's velocity as its optimum: with p = n - x, additive gives
n - x + x_sigma and sigma_scaled x_sigma - sigma (n - x) = x, neither equal to n - x. The
weights are applied only with sigma_scaled (kohya's behaviour); `notes` says when a setting has no effect.
"""

from __future__ import annotations

import math

import torch

from sdlora.errors import ConfigError

TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
# kohya also accepts "uniform", which means "none" (its default).
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
# The [train] keys of the weighting scheme's density and loss weights, which both flow objectives read.
DENSITY_SETTINGS = frozenset({"train.weighting_scheme", "train.logit_mean", "train.logit_std", "train.mode_scale"})
NUM_TRAIN_TIMESTEPS = 1000  # the schedule "sigma" sampling indexes, as kohya's FlowMatchEulerDiscreteScheduler

# FLUX's resolution-dependent shift: mu linear in the image sequence length through these two points
# (BFL's `get_lin_function`, diffusers' scheduler `base_image_seq_len` / `max_image_seq_len`).
BASE_SEQ_LEN, BASE_SHIFT = 256, 0.5
MAX_SEQ_LEN, MAX_SHIFT = 4096, 1.15


def flow_scheduler(configs):
    """The training noise schedule of a flow-matching family's single file: the FlowMatchEulerDiscreteScheduler
    of the config folder `configs` (its shift, FLUX.1-dev's resolution-dependent one included)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(configs, subfolder="scheduler")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """S s / (1 + (S - 1) s): more noise for S > 1 (the map keeps 0 and 1 and is increasing)."""
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int) -> float:
    """mu of FLUX's shift for a packed image of `image_seq_len` tokens ((h/2)(w/2) for latents h x w)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return m * image_seq_len + (BASE_SHIFT - m * BASE_SEQ_LEN)


def flux_time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """e^mu / (e^mu + 1/s - 1), which is `shift_sigmas` with S = e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(choices)}")
    return value


class FlowObjective:
    """Rectified flow with kohya's FLUX options (`flux_train_network.py`; see the module docstring)."""

    def __init__(self, timestep_sampling: str = "sigma", sigmoid_scale: float = 1.0,
                 discrete_flow_shift: float = 3.0, model_prediction_type: str = "raw",
                 weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.timestep_sampling = _choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        self.model_prediction_type = _choice("model_prediction_type", model_prediction_type, MODEL_PREDICTION_TYPES)
        self.weighting_scheme = _choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
        self.sigmoid_scale, self.discrete_flow_shift = sigmoid_scale, discrete_flow_shift
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        # (1000,) from 1 down to S(1/1000): the table "sigma" sampling indexes.
        self.schedule_sigmas = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=discrete_flow_shift).sigmas

    def notes(self) -> list[str]:
        """Warnings for settings that this combination ignores (kohya ignores them silently)."""
        out = []
        if self.weighting_scheme in ("logit_normal", "mode") and self.timestep_sampling != "sigma":
            out.append(f"weighting_scheme = {self.weighting_scheme!r} only shapes timestep_sampling = 'sigma'")
        if self.weighting_scheme in ("sigma_sqrt", "cosmap") and self.model_prediction_type != "sigma_scaled":
            out.append(f"weighting_scheme = {self.weighting_scheme!r} weights the loss only with "
                       "model_prediction_type = 'sigma_scaled'")
        return out

    def sample_timesteps(self, generator: torch.Generator, latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        """One example's sigma, (); `latent_size` (h, w) is needed by flux_shift only."""
        mode = self.timestep_sampling
        if mode == "uniform":
            return torch.rand((1,), generator=generator)[0]
        if mode == "sigma":
            from diffusers.training_utils import compute_density_for_timestep_sampling

            u = compute_density_for_timestep_sampling(self.weighting_scheme, 1, self.logit_mean, self.logit_std,
                                                      self.mode_scale, generator=generator)
            return self.schedule_sigmas[(u * NUM_TRAIN_TIMESTEPS).long()][0]
        s = torch.sigmoid(torch.randn((1,), generator=generator) * self.sigmoid_scale)[0]
        if mode == "sigmoid":
            return s
        if mode == "shift":
            return shift_sigmas(s, self.discrete_flow_shift)
        if latent_size is None:
            raise ValueError("timestep_sampling = 'flux_shift' needs the latent size")
        h, w = latent_size
        return flux_time_shift(flux_mu((h // 2) * (w // 2)), s)

    def fixed_timesteps(self, k: int) -> torch.Tensor:
        """k sigmas spread evenly over (0, 1), (k,): the validation loss's."""
        return torch.tensor([(i + 1) / (k + 1) for i in range(k)])

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = timesteps.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return (1.0 - sigmas) * latents + sigmas * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def prediction(self, model_output: torch.Tensor, noisy_latents: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
        """What the loss compares with `target`, from the denoiser's output (B, C, h, w)."""
        if self.model_prediction_type == "additive":
            return model_output + noisy_latents
        if self.model_prediction_type == "sigma_scaled":
            return model_output * (-timesteps.view(-1, 1, 1, 1)) + noisy_latents
        return model_output

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor | None:
        """Per-example loss weights (B,), or None: unweighted. min-SNR-gamma is a DDPM weighting and does not
        apply here (kohya's FLUX and SD3 trainings ignore it as well)."""
        if self.model_prediction_type != "sigma_scaled":
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, timesteps)


class SD3Objective(FlowObjective):
    """Rectified flow as kohya trains SD3.x (sd-scripts `library/sd3_train_utils.py`,
    `get_noisy_model_input_and_timesteps`, and `sd3_train_network.py`), which has no timestep_sampling
    or model_prediction_type: u from the weighting scheme's density, shifted by `training_shift` S and
    floored to the 1000-step grid,

        sigma = floor(1000 S u / (1 + (S - 1) u)) / 1000        in {0, 1/1000, ..., 999/1000}

    and the x0-preconditioned output x_sigma - sigma p compared with the latents x, weighted by the
    scheme. Since x_sigma - sigma p - x = sigma (n - x - p), that is the velocity loss times sigma^2."""

    def __init__(self, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, training_shift: float = 1.0):
        super().__init__("sigma", model_prediction_type="sigma_scaled", weighting_scheme=weighting_scheme,
                         logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
        self.training_shift = training_shift

    def sample_timesteps(self, generator: torch.Generator, latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, 1, self.logit_mean, self.logit_std,
                                                  self.mode_scale, generator=generator)
        u = shift_sigmas(u, self.training_shift)
        return ((u * NUM_TRAIN_TIMESTEPS).long() / NUM_TRAIN_TIMESTEPS)[0]

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return latents
