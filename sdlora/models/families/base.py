"""The family interface: what differs between base-model families, one `Family` per entry of
`families.FAMILIES`, keyed by `BaseModel.family`. The trainer, the samplers and the loaders ask the
family object and never branch on a family's name; adding a family is its own module (sd.py, sdxl.py)
and a registry entry.

    family     text conditioning of the U-Net                         extra U-Net inputs
    sd_v1      CLIP-L hidden states (B, 77, 768), kohya's clip_skip     -
    sd_v2(_v)  OpenCLIP-H hidden states (B, 77, 1024), clip_skip        -
    sdxl       penultimate CLIP-L (768) ++ penultimate OpenCLIP-bigG    text_embeds: the pooled projection
               (1280) = (B, 77, 2048)                                   of encoder 2 (B, 1280); time_ids (B, 6)

The training objective (`DiffusionObjective`: epsilon or v-prediction on the DDPM schedule, with
its timestep sampling and min-SNR weighting) and the latent format (`LatentFormat`: scaling and
shift from the VAE's config) come from the family too, so a rectified-flow family (noisy =
(1 - sigma) x + sigma noise, target noise - x) brings its own objective and the loop is unchanged.

A family whose conditioning joins each encoder's own outputs (`per_encoder_text`: FLUX.1's CLIP-L
pooled output and T5 hidden states) says so by `encode_slot` / `join_text`: the trainer then caches
a frozen encoder's outputs while a trained one runs, and zeros one encoder's outputs for kohya's
per-encoder caption dropout. Its T5 length (`t5_max_length`, kohya's t5xxl_max_token_length) is the
family's unless [train] t5_max_length says otherwise (`with_text_settings`).

On the loading side a family says its text encoders (`TextEncoderSlot`: the pipeline component, the
transformers class, the tokenizer, where a single file keeps it and in which layout), its diffusers
pipeline class, how its single files are recognised and what its prediction type is when the file
does not say. Kohya key names (`lora_te1_` / `lora_te2_`, SGM U-Net names) live in
`adapters/keys.py`; the Kohya/modelspec ids of each family are its `Family` fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from sdlora.models.families.clip import encode_prompt

# Config keys ("section.key") whose use depends on the family (`Family.reads`): classifier-free guidance's, and the
# schedulers of SD's sampling passes.
CFG_SETTINGS = frozenset({"sample.cfg_scale", "sample.negative_prompt"})
SD_PASS_SETTINGS = frozenset({"sample.sampler"})


@dataclass
class TextConditioning:
    """What the text encoder(s) give the U-Net for a batch of captions."""

    hidden: torch.Tensor  # (B, 77, d): encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, 1280): SDXL's text_embeds; None for SD1.x/SD2.x

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"hidden": self.hidden} if self.pooled is None else {"hidden": self.hidden, "pooled": self.pooled}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "TextConditioning":
        return cls(d["hidden"], d.get("pooled"))


def tokenize(tokenizers_, captions: list[str], lengths: list[int] | None = None) -> list[torch.Tensor]:
    """Each tokenizer's (B, 77) input ids, padded and truncated to its 77 positions (`lengths`: each
    tokenizer's own, `Family.token_lengths`; None: its model_max_length)."""
    lengths = lengths or [tok.model_max_length for tok in tokenizers_]
    return [tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            for tok, length in zip(tokenizers_, lengths)]


@dataclass(frozen=True)
class LatentFormat:
    """How a family's VAE latents enter the denoiser: (latent - shift) x scaling, both read from the
    VAE's config (`scaling_factor`; `shift_factor`, which SD1.x/SD2.x/SDXL leave unset: 0)."""

    scaling: float
    shift: float = 0.0

    @classmethod
    def of(cls, vae) -> "LatentFormat":
        return cls(vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0)

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w) -> the denoiser's latents (shift 0: exactly latents x scaling)."""
        return (latents - self.shift) * self.scaling


class DiffusionObjective:
    """The DDPM objective of SD1.x, SD2.x and SDXL on the base's noise schedule:

        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   t ~ U{0, ..., T - 1}
        target = eps (epsilon) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (v-prediction)

    min-SNR-gamma weights (Hang et al. 2023): w = min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v),
    SNR = abar / (1 - abar) from diffusers' `compute_snr`."""

    def __init__(self, noise_scheduler):
        self.noise_scheduler = noise_scheduler
        self.v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
        self.num_timesteps = noise_scheduler.config.num_train_timesteps

    def sample_timesteps(self, generator: torch.Generator, latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        """One example's timestep, () int64, uniform over the schedule (whatever the latents' (h, w))."""
        return torch.randint(0, self.num_timesteps, (), generator=generator)

    def fixed_timesteps(self, k: int) -> torch.Tensor:
        """k timesteps spread evenly over (0, T), (k,): the validation loss's."""
        return torch.tensor([(i + 1) * self.num_timesteps // (k + 1) for i in range(k)])

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.v_prediction:
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def prediction(self, model_output: torch.Tensor, noisy_latents: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
        """What the loss compares with `target`: the U-Net's output itself."""
        return model_output

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor | None:
        """Per-example loss weights (B,): min-SNR-gamma's, or None (unweighted) when gamma is 0."""
        return self.snr_weights(timesteps, min_snr_gamma) if min_snr_gamma else None

    def notes(self) -> list[str]:
        """Warnings for settings this objective ignores: none."""
        return []

    def snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)
        return torch.clamp(snr, max=gamma) / (snr + 1 if self.v_prediction else snr)


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: its place in a diffusers pipeline and in an original-layout single file."""

    part: str  # the pipeline component and its config subfolder: "text_encoder", "text_encoder_2"
    tokenizer_part: str  # its tokenizer's component: "tokenizer", "tokenizer_2"
    label: str  # how messages name it: "text encoder", "text encoder 2"
    model_class: str  # the transformers class: "CLIPTextModel" | "CLIPTextModelWithProjection"
    prefix: str  # where a single file keeps its tensors
    layout: Any  # clip.OpenAIClipLayout / clip.OpenClipLayout / t5.T5Layout: its state to and from the names under `prefix`
    tokenizer: Callable[[], Any] | None  # its tokenizer, built offline (None: the family has no single files yet)
    tokenizer_class: str = "CLIPTokenizer"  # the transformers class of a folder's tokenizer
    # Which encoder it is where the family names them (FLUX.1, SD3: "clip_l" | "clip_g" | "t5"): its Kohya
    # prefix (`transformer_keys.TEXT_PREFIXES`), its caption dropout ([train] <name>_dropout_rate); "" for
    # SD1.x-SDXL's, numbered by position.
    name: str = ""
    # A tokenizer folder for it (model.text_encoders) holds one of these; (): never read from a folder.
    tokenizer_files: tuple[str, ...] = ()

    def from_original(self, state: dict) -> dict:
        """Its state in transformers-4 names from a single file's tensors under `prefix` (prefix removed)."""
        return self.layout.from_original(state)

    def to_original(self, state: dict) -> dict:
        """A state dict of the encoder in the single file's names, `prefix` included."""
        return self.layout.to_original(state, self.prefix)


@dataclass(frozen=True)
class Family:
    """A family with one CLIP text encoder (SD1.x, SD2.x): its hidden states condition the U-Net."""

    name: str  # BaseModel.family
    base_model_version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture, before "/lora"
    # modelspec.implementation: kohya writes Stability's repository for SDXL, "diffusers" for SD1/2.
    implementation: str = "diffusers"
    title: str = ""  # how the loading message names it: "SD1.x", "SDXL base"
    text_encoders: tuple[TextEncoderSlot, ...] = ()  # in conditioning order
    signature: str = ""  # a key prefix that only this family's single files hold
    context_width: int = 0  # the width of its text conditioning, which tells folders of alike families apart
    ss_v2: bool = False  # kohya's ss_v2: an SD2.x base
    conv_proj: bool = False  # the U-Net's proj_in / proj_out are 1x1 convs (SD1.x), not Linear
    pipeline_class: str = "StableDiffusionPipeline"  # diffusers' text-to-image pipeline of the family
    pipeline_options: tuple[tuple[str, Any], ...] = ()  # its further constructor arguments
    trains_text_encoders: bool = True  # sdlora can put adapters on its text encoders
    # The sampler's classifier-free guidance with a negative prompt; False: the family is guidance-distilled
    # (FLUX.1 dev takes the guidance scale as an input, schnell none) and renders from the prompt alone.
    classifier_free_guidance: bool = True
    size_multiple: int = 8  # the pipeline's image sides are multiples of this (FLUX.1: 16, the VAE's 8 x 2x2 packing)
    # The sampler renders in one pass of its pipeline with flow-matching Euler at the next multiple of size_multiple
    # and crops (FLUX.1, SD3.x); False: SD's passes (hires, tiles) and A1111's prompt rules.
    one_pass: bool = False
    sample_steps: int = 0  # its steps when [sample] steps is left at the default (0: that default)
    denoiser_part: str = "unet"  # the denoiser's pipeline component and folder (BaseModel.unet holds it)
    denoiser_class: str = "UNet2DConditionModel"  # its diffusers class
    scheduler_class: str = "DDPMScheduler"  # the training noise schedule's diffusers class
    # The conditioning joins each encoder's own outputs (`encode_slot`, `join_text`), so that encoders can
    # be cached, trained and dropped apart (FLUX.1); False: the encoders combine only in `encode_text`.
    per_encoder_text: bool = False
    t5_max_length: int = 0  # T5 tokens per caption (kohya's t5xxl_max_token_length default); 0: no T5
    # Where its single files keep the denoiser: under the first of these prefixes the file has ("": bare
    # names, as BFL's own files); the VAE under `vae_prefix`; each text encoder under its slot's prefix.
    denoiser_prefixes: tuple[str, ...] = ("model.diffusion_model.",)
    vae_prefix: str = "first_stage_model."
    vae_file: str = ""  # the VAE file to give as model.vae when a single file lacks one ("": its files never do)
    # The family-dependent config keys its objective and sampler read beside `CFG_SETTINGS` / `SD_PASS_SETTINGS`
    # (`reads`); the DDPM objective's min-SNR weighting here.
    settings: frozenset[str] = frozenset({"train.min_snr_gamma"})

    def reads(self) -> frozenset[str]:
        """The family-dependent config keys this family reads: its `settings`, classifier-free guidance's when it
        guides so, the schedulers of SD's passes unless it renders in one flow-matching pass. A key another family
        reads and this one does not is noted when set (`families.unread_settings`)."""
        return (self.settings | (CFG_SETTINGS if self.classifier_free_guidance else frozenset())
                | (frozenset() if self.one_pass else SD_PASS_SETTINGS))

    def detects(self, keys: list[str]) -> bool:
        """Do a single file's tensor names say it holds this family?"""
        return any(k.startswith(self.signature) for k in keys)

    def guess_prediction_type(self, tensors: dict) -> tuple[str, str]:
        """(prediction type, how it was decided) of a single file that does not say."""
        return "epsilon", self.title

    def single_file_scheduler(self, configs, prediction_type: str):
        """The training noise schedule of a single file, from the config folder `configs`."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(configs, subfolder="scheduler", prediction_type=prediction_type)

    def named_for(self, prediction_type: str) -> str:
        """The family's name for a base with this prediction type (SD2.x names its two variants by it)."""
        return self.name

    def pipeline(self, base, scheduler):
        """The family's diffusers pipeline over `base`'s components (a BaseModel) with `scheduler`."""
        import diffusers

        encoders = {part: getattr(base, part) for slot in self.text_encoders
                    for part in (slot.part, slot.tokenizer_part)}
        return getattr(diffusers, self.pipeline_class)(vae=base.vae, scheduler=scheduler,
                                                       **{self.denoiser_part: base.unet}, **encoders,
                                                       **dict(self.pipeline_options))

    def fits_folder(self, denoiser, widths: set[int]) -> bool:
        """Is a loaded folder with this family's components this family rather than an alike one
        (`families.folder_family`)? Its text conditioning's width is among the folder's `widths`."""
        return self.context_width in widths

    def folder_prediction_type(self, scheduler) -> str:
        """The prediction type of a folder with this training scheduler."""
        return scheduler.config.prediction_type

    def modelspec_prediction_type(self, prediction_type: str) -> str | None:
        """modelspec.prediction_type of an adapter on a base with `prediction_type`; None: not written."""
        return "v" if prediction_type == "v_prediction" else "epsilon"

    def kohya_metadata(self, train) -> dict[str, str]:
        """The family's own ss_* fields of a trained adapter, from its [train] table (`train`): none."""
        return {}

    def for_training(self, train) -> "Family":
        """The family as one training uses it, with its [train] table (`train`): the same for SD1.x-SDXL,
        whose objective and conditioning have no settings there."""
        return self

    def emphasized(self, text: TextConditioning, multipliers: list[torch.Tensor]) -> TextConditioning:
        """A1111's emphasis on the conditioning of prompts read whole (`prompts.sequence_tokens`), from each
        tokenizer's (B, T) token weights: the family knows which encoder's states they scale. SD1.x-SDXL
        prompts are chunked and weighted by `prompts.encode` instead."""
        return text

    def for_sampling(self, guidance_scale: float) -> "Family":
        """The family as sdlora's own denoising loops (the tiled hires pass) call `predict` when sampling: a
        guidance-distilled family takes `guidance_scale` ([sample]) as its input; the others: the same."""
        return self

    def encode_text(self, encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        """The U-Net's text conditioning from each encoder's (B, 77) input ids (see the module docstring)."""
        return TextConditioning(encode_prompt(encoders[0], input_ids[0], clip_skip))

    def encode_slot(self, index: int, encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> dict[str, torch.Tensor]:
        """Text encoder `index`'s own outputs, {name: (B, ...)}, for a family with `per_encoder_text`."""
        raise NotImplementedError(f"{self.title} conditions on its text encoders together")

    def join_text(self, outputs: list[dict[str, torch.Tensor]]) -> TextConditioning:
        """The conditioning from every encoder's `encode_slot` outputs, in slot order."""
        raise NotImplementedError(f"{self.title} conditions on its text encoders together")

    def with_text_settings(self, train) -> "Family":
        """The family with [train]'s text settings (`train`): t5_max_length replaces the family's T5 length."""
        if train.t5_max_length and self.t5_max_length:
            return replace(self, t5_max_length=train.t5_max_length)
        return self

    def token_lengths(self, tokenizers: list) -> list[int]:
        """Tokens per caption of each encoder: T5's `t5_max_length`, the others their tokenizer's (CLIP's 77)."""
        return [self.t5_max_length if slot.name == "t5" and self.t5_max_length else tok.model_max_length
                for slot, tok in zip(self.text_encoders, tokenizers)]

    def size_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                          target_size: tuple[int, int]) -> torch.Tensor | None:
        """An example's extra conditioning on its size and crop ((height, width) / (top, left) pairs);
        None: the family has none."""
        return None

    def predict(self, denoiser, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                time_ids_: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's prediction (noise or velocity, the objective's target) for noisy latents
        (B, C, h, w) at timesteps (B,), run in `dtype`."""
        return denoiser(noisy_latents.to(dtype), timesteps, **self.unet_conditioning(text, time_ids_, dtype)).sample

    def unet_conditioning(self, text: TextConditioning, time_ids_: torch.Tensor | None, dtype: torch.dtype) -> dict:
        """Keyword arguments of the U-Net call beside (latents, timesteps)."""
        return {"encoder_hidden_states": text.hidden.to(dtype)}

    def clip_skip_note(self, clip_skip: int) -> str | None:
        """A warning when clip_skip asks for something the family ignores."""
        return None

    def unread_text_layers(self, clip_skip: int, num_layers: list[int]) -> dict[str, range]:
        """{text-encoder part: indices of its trailing layers whose output the conditioning never reads}.

        Adapters there get no gradient (kohya creates and exports them all the same); the trainer
        freezes them so that multi-process training does not wait for their gradients. SD1.x/SD2.x
        read hidden_states[-clip_skip]."""
        return {"te": range(num_layers[0] - max(clip_skip, 1) + 1, num_layers[0])}

    def swap_blocks(self, denoiser, blocks_to_swap: int) -> list[tuple[list, int]]:
        """[train] blocks_to_swap over the denoiser's block lists (`models.blockswap`): each list's blocks
        in forward order with how many of its last ones are swapped. A transformer with one list of
        blocks (SD3's joint blocks, diffusers' `transformer_blocks`) swaps its last `blocks_to_swap`, as
        kohya's sd3 offloader; a U-Net has none: []."""
        blocks = getattr(denoiser, "transformer_blocks", None)
        return [] if blocks is None else [(list(blocks), blocks_to_swap)]

    def objective(self, noise_scheduler) -> DiffusionObjective:
        return DiffusionObjective(noise_scheduler)

    def latent_format(self, vae) -> LatentFormat:
        return LatentFormat.of(vae)
