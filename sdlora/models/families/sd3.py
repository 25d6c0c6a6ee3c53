"""SD3.x (SD3 Medium, SD3.5 Medium, SD3.5 Large): a rectified-flow MMDiT on 16-channel latents,
conditioned on CLIP-L, CLIP-G and T5-XXL, as diffusers' StableDiffusion3Pipeline.encode_prompt and
sd-scripts' `strategy_sd3.py` build it:

    text      CLIP-L ++ CLIP-G penultimate hidden states (B, 77, 768 + 1280), zero-padded on the channel
              axis to T5's width 4096, then T5's last hidden state (B, 256, 4096) after them on the
              sequence axis -> encoder_hidden_states (B, 77 + 256, 4096); T5 reads 256 tokens
              (diffusers' max_sequence_length and kohya's t5xxl_max_token_length default), whatever
              the folder's tokenizer says
    pooled    CLIP-L ++ CLIP-G text_embeds (their projections of the EOS state) (B, 768 + 1280)
    latents   (VAE latent - shift_factor) x scaling_factor (0.0609, 1.5305 in SD3's VAE config)
    timestep  1000 sigma (the transformer's time embedding takes the 1000-step scale)

The objective is `flow.SD3Objective` (kohya's sd3_train_network.py): sigma from the weighting scheme's
density shifted by [train] training_shift (kohya's default 1.0; FLUX's discrete_flow_shift is 3.0) and
floored to the 1000-step grid, the x0-preconditioned output compared with the latents.
[train] timestep_sampling, model_prediction_type and discrete_flow_shift are FLUX's and unused here (a note names
them when set, `families.unread_settings`).

The three variants are told apart by the transformer as sd-scripts' `sd3_utils.analyze_state_dict_state`
does: no qk norm -> SD3 Medium ("medium"); qk RMS norm with MMDiT-X blocks (a second image
self-attention, `dual_attention_layers`) -> SD3.5 Medium ("5-medium"); qk norm without -> SD3.5 Large
("5-large"). That string is sd-scripts' ss_base_model_version and the tail of modelspec.architecture
("stable-diffusion-3-5-large/lora"); kohya writes modelspec.implementation "diffusers" and
modelspec.prediction_type "epsilon" for SD3 files (its sai_model_spec falls through to them).

Bases load from diffusers folders (StableDiffusion3Pipeline.save_pretrained). Adapters on the text
encoders as sd-scripts' lora_sd3.py names them: CLIP-L `lora_te1_`, CLIP-G `lora_te2_` (with
network.train_text_encoder), T5 `lora_te3_` (with network.train_t5); each encoder conditions on its
own (`encode_slot`), so a frozen one is cached while a trained one runs, and kohya's per-encoder caption
dropout zeros one encoder's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from sdlora.models.families.base import Family, TextConditioning, TextEncoderSlot
from sdlora.models.flow import DENSITY_SETTINGS, SD3Objective

# The family-dependent keys it reads beside CFG's: SD3Objective's, StableDiffusion3Pipeline's skip-layer guidance.
SD3_SETTINGS = DENSITY_SETTINGS | {"train.training_shift", "sample.skip_layer_guidance_scale",
                                   "sample.skip_guidance_layers", "sample.skip_layer_guidance_start",
                                   "sample.skip_layer_guidance_stop"}
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length, kohya's t5xxl_max_token_length

SD3_TEXT_ENCODERS = (
    TextEncoderSlot("text_encoder", "tokenizer", "CLIP-L", "CLIPTextModelWithProjection",
                    "text_encoders.clip_l.transformer.", None, None, name="clip_l"),
    TextEncoderSlot("text_encoder_2", "tokenizer_2", "CLIP-G", "CLIPTextModelWithProjection",
                    "text_encoders.clip_g.transformer.", None, None, name="clip_g"),
    TextEncoderSlot("text_encoder_3", "tokenizer_3", "T5-XXL", "T5EncoderModel", "text_encoders.t5xxl.transformer.",
                    None, None, tokenizer_class="T5TokenizerFast", name="t5"),
)


def mmdit_type(config) -> str:
    """sd-scripts' model type of an SD3Transformer2DModel config: "medium", "5-medium" or "5-large"."""
    if not config.qk_norm:
        return "medium"
    return "5-medium" if config.dual_attention_layers else "5-large"


@dataclass(frozen=True)
class SD3Family(Family):
    """One SD3.x variant (its `base_model_version` is sd-scripts' model type), see the module docstring."""

    flow: tuple[Any, ...] = ()  # SD3Objective's arguments, set by `for_training`

    def detects(self, keys: list[str]) -> bool:
        return False  # single files: not read yet

    def fits_folder(self, denoiser, widths: set[int]) -> bool:
        return mmdit_type(denoiser.config) == self.base_model_version

    def folder_prediction_type(self, scheduler) -> str:
        return "flow"

    def modelspec_prediction_type(self, prediction_type: str) -> str | None:
        return "epsilon"  # what sd-scripts writes for SD3 (sai_model_spec sets it for every non-FLUX model)

    def for_training(self, train) -> "SD3Family":
        return replace(self.with_text_settings(train), flow=(train.weighting_scheme, train.logit_mean, train.logit_std, train.mode_scale,
                                   train.training_shift))

    def kohya_metadata(self, train) -> dict[str, str]:
        """What sd-scripts' sd3_train_network.py adds (its `update_metadata`), as str() of its arguments:
        no attention masks (sdlora applies none, as kohya's default)."""
        return {"ss_network_module": "networks.lora_sd3", "ss_apply_lg_attn_mask": "False",
                "ss_apply_t5_attn_mask": "False", "ss_weighting_scheme": train.weighting_scheme,
                "ss_logit_mean": str(train.logit_mean), "ss_logit_std": str(train.logit_std),
                "ss_mode_scale": str(train.mode_scale)}

    def encode_text(self, encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        return self.join_text([self.encode_slot(i, enc, ids) for i, (enc, ids) in enumerate(zip(encoders, input_ids))])

    def encode_slot(self, index: int, encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> dict[str, torch.Tensor]:
        if index < 2:  # CLIP-L, CLIP-G: the penultimate layer's states and the projected EOS state
            out = encoder(input_ids, output_hidden_states=True)
            return {"hidden": out.hidden_states[-2], "pooled": out.text_embeds}  # (B, 77, 768 | 1280), (B, ...)
        return {"hidden": encoder(input_ids).last_hidden_state}  # T5: (B, T, 4096)

    def join_text(self, outputs: list[dict[str, torch.Tensor]]) -> TextConditioning:
        clip_l, clip_g, t5 = outputs
        clip = torch.cat([clip_l["hidden"], clip_g["hidden"]], dim=-1)  # (B, 77, 768 + 1280)
        clip = torch.nn.functional.pad(clip, (0, t5["hidden"].shape[-1] - clip.shape[-1]))  # (B, 77, 4096)
        pooled = torch.cat([clip_l["pooled"], clip_g["pooled"]], dim=-1)  # (B, 768 + 1280)
        return TextConditioning(torch.cat([clip, t5["hidden"]], dim=-2), pooled)  # hidden (B, 77 + T, 4096)

    def clip_skip_note(self, clip_skip: int) -> str | None:
        if clip_skip > 1:
            return (f"model.clip_skip = {clip_skip} is ignored for {self.title}: it reads both CLIPs' penultimate "
                    "layer and T5's last, as sd-scripts and diffusers do; set clip_skip = 1 to silence this")
        return None

    def unread_text_layers(self, clip_skip: int, num_layers: list[int]) -> dict[str, range]:
        # The CLIPs' last layers feed their pooled projections; T5's last layer is read.
        return {"te1": range(0), "te2": range(0), "te3": range(0)}

    def predict(self, denoiser, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                time_ids_: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        return denoiser(hidden_states=noisy_latents.to(dtype), encoder_hidden_states=text.hidden.to(dtype),
                        pooled_projections=text.pooled.to(dtype),
                        timestep=timesteps * 1000).sample  # fp32: the 1000-step scale in bf16 would round

    def objective(self, noise_scheduler) -> SD3Objective:
        return SD3Objective(*self.flow)


# Sides a multiple of 16: the VAE's 8 x the transformer's 2x2 patches.
# T5 reads T5_MAX_LENGTH tokens unless [train] t5_max_length says otherwise.
_SD3 = dict(implementation="diffusers", text_encoders=SD3_TEXT_ENCODERS, per_encoder_text=True,
            t5_max_length=T5_MAX_LENGTH, one_pass=True, size_multiple=16, pipeline_class="StableDiffusion3Pipeline",
            denoiser_part="transformer", denoiser_class="SD3Transformer2DModel",
            scheduler_class="FlowMatchEulerDiscreteScheduler", settings=SD3_SETTINGS)
SD3_MEDIUM = SD3Family("sd3_medium", "medium", "stable-diffusion-3-medium", title="SD3 Medium", **_SD3)
SD35_MEDIUM = SD3Family("sd35_medium", "5-medium", "stable-diffusion-3-5-medium", title="SD3.5 Medium", **_SD3)
SD35_LARGE = SD3Family("sd35_large", "5-large", "stable-diffusion-3-5-large", title="SD3.5 Large", **_SD3)
