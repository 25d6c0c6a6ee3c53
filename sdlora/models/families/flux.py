"""FLUX.1 (dev and schnell): a rectified-flow transformer on packed 16-channel latents, conditioned
on T5-XXL's hidden states and CLIP-L's pooled output.

    text          T5 last hidden state (B, T, 4096) -> encoder_hidden_states (T = the T5 tokenizer's
                  model_max_length: 512 in FLUX.1-dev's folder, 256 in schnell's)
                  CLIP-L pooler_output (B, 768) -> pooled_projections
    latents       (VAE latent - shift_factor) x scaling_factor (0.1159, 0.3611 in FLUX's VAE config),
                  packed into 2x2 patches: (B, 16, h, w) -> (B, (h/2)(w/2), 64) (`models.flux`)
    ids           img_ids ((h/2)(w/2), 3) = (0, row, column) of each patch; txt_ids (T, 3) zeros
    timestep      sigma in [0, 1] (the transformer multiplies by 1000 itself)
    guidance      dev only: FLUX.1-dev is guidance-distilled and takes the guidance scale as an input,
                  (B,) filled with train.guidance_scale (kohya's --guidance_scale, default 3.5; its docs
                  advise 1.0 for LoRA training); schnell has no guidance embedding

as kohya's `flux_train_network.py` calls the model and diffusers' FluxPipeline calls
FluxTransformer2DModel. The objective is `flow.FlowObjective` with kohya's FLUX options from
[train]. min_snr_gamma does not apply to rectified flow (kohya's FLUX training ignores it too; a note names it
when set, as any key the family does not read: `families.unread_settings`).

Export ids as sd-scripts writes them: ss_base_model_version "flux1", modelspec.architecture
"flux-1-dev/lora" / "flux-1-schnell/lora", modelspec.implementation BFL's repository, and no
modelspec.prediction_type. Bases load from diffusers folders (FluxPipeline.save_pretrained); dev and
schnell are told apart by the transformer's guidance embedding. Not yet: single files, adapters on the
text encoders (CLIP-L `lora_te1_`, T5 `lora_te3_`), T5's length by variant (256 schnell / 512 dev)
other than the folder's tokenizer says.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from sdlora.models.families.base import Family, TextConditioning, TextEncoderSlot
from sdlora.models.flow import DENSITY_SETTINGS, FlowObjective
from sdlora.models.flux import latent_image_ids, pack_latents, unpack_latents

# The family-dependent keys it reads: FlowObjective's; dev's guidance input in training and sampling (`reads`).
FLUX_SETTINGS = DENSITY_SETTINGS | {"train.timestep_sampling", "train.sigmoid_scale", "train.discrete_flow_shift",
                                    "train.model_prediction_type"}
GUIDANCE_SETTINGS = frozenset({"train.guidance_scale", "sample.guidance_scale"})

FLUX_TEXT_ENCODERS = (
    TextEncoderSlot("text_encoder", "tokenizer", "CLIP-L", "CLIPTextModel", "text_encoders.clip_l.transformer.",
                    None, None),
    TextEncoderSlot("text_encoder_2", "tokenizer_2", "T5-XXL", "T5EncoderModel", "text_encoders.t5xxl.transformer.",
                    None, None, tokenizer_class="T5TokenizerFast"),
)


@dataclass(frozen=True)
class FluxFamily(Family):
    """FLUX.1 dev (`guidance`: the transformer has a guidance embedding) or schnell, see the module docstring."""

    guidance: bool = True
    # What one training sets (`for_training`): dev's guidance input, FlowObjective's arguments.
    guidance_scale: float = 0.0
    flow: tuple[Any, ...] = ()

    def detects(self, keys: list[str]) -> bool:
        return False  # single files: not read yet

    def fits_folder(self, denoiser, widths: set[int]) -> bool:
        return bool(denoiser.config.guidance_embeds) == self.guidance

    def reads(self) -> frozenset[str]:
        return super().reads() | (GUIDANCE_SETTINGS if self.guidance else frozenset())  # schnell has no guidance input

    def folder_prediction_type(self, scheduler) -> str:
        return "flow"

    def modelspec_prediction_type(self, prediction_type: str) -> str | None:
        return None  # sd-scripts writes none for FLUX

    def for_training(self, train) -> "FluxFamily":
        flow = (train.timestep_sampling, train.sigmoid_scale, train.discrete_flow_shift, train.model_prediction_type,
                train.weighting_scheme, train.logit_mean, train.logit_std, train.mode_scale)
        return replace(self, guidance_scale=train.guidance_scale, flow=flow)

    def kohya_metadata(self, train) -> dict[str, str]:
        """What sd-scripts' flux_train_network.py adds (its `update_metadata`), as str() of its arguments."""
        return {"ss_network_module": "networks.lora_flux", "ss_model_type": "flux", "ss_apply_t5_attn_mask": "False",
                "ss_weighting_scheme": train.weighting_scheme, "ss_logit_mean": str(train.logit_mean),
                "ss_logit_std": str(train.logit_std), "ss_mode_scale": str(train.mode_scale),
                "ss_guidance_scale": str(train.guidance_scale), "ss_timestep_sampling": train.timestep_sampling,
                "ss_sigmoid_scale": str(train.sigmoid_scale), "ss_model_prediction_type": train.model_prediction_type,
                "ss_discrete_flow_shift": str(train.discrete_flow_shift)}

    def encode_text(self, encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        pooled = encoders[0](input_ids[0]).pooler_output  # (B, 768): CLIP-L's EOS state after the final norm
        hidden = encoders[1](input_ids[1]).last_hidden_state  # (B, T, 4096)
        return TextConditioning(hidden, pooled)

    def clip_skip_note(self, clip_skip: int) -> str | None:
        if clip_skip > 1:
            return (f"model.clip_skip = {clip_skip} is ignored for FLUX.1: it reads CLIP-L's pooled output and "
                    "T5's last layer; set clip_skip = 1 to silence this")
        return None

    def unread_text_layers(self, clip_skip: int, num_layers: list[int]) -> dict[str, range]:
        return {"te1": range(0), "te2": range(0)}  # both encoders' last layers are read

    def predict(self, denoiser, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                time_ids_: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        b, _, h, w = noisy_latents.shape
        kwargs = {}
        if self.guidance:
            kwargs["guidance"] = torch.full((b,), self.guidance_scale, device=noisy_latents.device)
        out = denoiser(hidden_states=pack_latents(noisy_latents).to(dtype),  # (B, (h/2)(w/2), 4C)
                       encoder_hidden_states=text.hidden.to(dtype), pooled_projections=text.pooled.to(dtype),
                       timestep=timesteps.to(dtype), img_ids=latent_image_ids(h, w).to(noisy_latents.device),
                       txt_ids=torch.zeros(text.hidden.shape[1], 3, device=noisy_latents.device), **kwargs).sample
        return unpack_latents(out, h, w)  # (B, C, h, w)

    def objective(self, noise_scheduler) -> FlowObjective:
        return FlowObjective(*self.flow)


_FLUX = dict(implementation="https://github.com/black-forest-labs/flux", text_encoders=FLUX_TEXT_ENCODERS,
             trains_text_encoders=False, classifier_free_guidance=False, one_pass=True, size_multiple=16,
             pipeline_class="FluxPipeline", denoiser_part="transformer", denoiser_class="FluxTransformer2DModel",
             scheduler_class="FlowMatchEulerDiscreteScheduler", settings=FLUX_SETTINGS)
FLUX_DEV = FluxFamily("flux1_dev", "flux1", "flux-1-dev", title="FLUX.1 dev", **_FLUX)
FLUX_SCHNELL = FluxFamily("flux1_schnell", "flux1", "flux-1-schnell", title="FLUX.1 schnell", guidance=False,
                          sample_steps=4, **_FLUX)  # schnell is distilled for 1-4 steps, as its model card renders
