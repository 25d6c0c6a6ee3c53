"""FLUX.1 (dev and schnell): a rectified-flow transformer on packed 16-channel latents, conditioned
on T5-XXL's hidden states and CLIP-L's pooled output.

    text          T5 last hidden state (B, T, 4096) -> encoder_hidden_states (T = kohya's
                  t5xxl_max_token_length: 512 for dev, 256 for schnell, or [train] t5_max_length)
                  CLIP-L pooler_output (B, 768) -> pooled_projections
                  Each encoder's outputs are its own (`per_encoder_text`): a frozen encoder's are cached
                  while a trained one runs, and [train] clip_l_dropout_rate / t5_dropout_rate zero them
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
modelspec.prediction_type. Bases load from diffusers folders (FluxPipeline.save_pretrained) and from
single files: BFL's transformer (`double_blocks.0.img_attn.qkv.weight`, ...: flux1-dev.safetensors; or
in diffusers' names), bare or under ComfyUI's `model.diffusion_model.`, whose all-in-one files add `vae.` (BFL's autoencoder,
the LDM layout of ae.safetensors) and `text_encoders.clip_l.transformer.` / `text_encoders.t5xxl.
transformer.` (transformers' names); what a file lacks comes from model.vae / model.text_encoders. Dev and
schnell are told apart by the transformer's guidance embedding (`guidance_in.*` in a file, as ComfyUI,
diffusers and kohya tell them). Adapters on the text encoders as sd-scripts' lora_flux.py makes them:
CLIP-L (`lora_te1_`) with network.train_text_encoder, T5 (`lora_te3_`) only with network.train_t5
(kohya's train_t5xxl).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from sdlora.models.families.base import Family, TextConditioning, TextEncoderSlot
from sdlora.models.families.clip import OpenAIClipLayout
from sdlora.models.families.t5 import T5Layout
from sdlora.models.flow import DENSITY_SETTINGS, FlowObjective, flow_scheduler
from sdlora.models.flux import latent_image_ids, pack_latents, unpack_latents
from sdlora.models.prompts import emphasize
from sdlora.models.tokenizer import clip_tokenizer, t5_tokenizer

# The family-dependent keys it reads: FlowObjective's; dev's guidance input in training and sampling (`reads`).
FLUX_SETTINGS = DENSITY_SETTINGS | {"train.timestep_sampling", "train.sigmoid_scale", "train.discrete_flow_shift",
                                    "train.model_prediction_type"}
GUIDANCE_SETTINGS = frozenset({"train.guidance_scale", "sample.guidance_scale"})

# The prefixes are ComfyUI's (its supported_models.Flux: text_encoder_key_prefix "text_encoders.").
FLUX_TEXT_ENCODERS = (
    TextEncoderSlot("text_encoder", "tokenizer", "CLIP-L", "CLIPTextModel", "text_encoders.clip_l.transformer.",
                    OpenAIClipLayout(), clip_tokenizer, name="clip_l"),
    TextEncoderSlot("text_encoder_2", "tokenizer_2", "T5-XXL", "T5EncoderModel", "text_encoders.t5xxl.transformer.",
                    T5Layout(), t5_tokenizer, tokenizer_class="T5TokenizerFast", name="t5",
                    tokenizer_files=("tokenizer.json",)),
)
# A key only FLUX.1 transformers hold (ComfyUI's and diffusers' test) and the one only dev's hold, in BFL's
# names and in diffusers' (a transformer saved by diffusers as one file, which kohya reads too).
FLUX_SIGNATURES = {"double_blocks.0.img_attn.norm.key_norm.scale": "guidance_in.in_layer.weight",
                   "single_transformer_blocks.0.proj_mlp.weight": "time_text_embed.guidance_embedder.linear_1.weight"}


@dataclass(frozen=True)
class FluxFamily(Family):
    """FLUX.1 dev (`guidance`: the transformer has a guidance embedding) or schnell, see the module docstring."""

    guidance: bool = True
    # What one training sets (`for_training`): dev's guidance input, FlowObjective's arguments.
    guidance_scale: float = 0.0
    flow: tuple[Any, ...] = ()

    def detects(self, keys: list[str]) -> bool:
        keys = set(keys)
        found = next(((p, guidance) for p in self.denoiser_prefixes for signature, guidance in FLUX_SIGNATURES.items()
                      if p + signature in keys), None)
        return found is not None and ("".join(found) in keys) == self.guidance

    def guess_prediction_type(self, tensors: dict) -> tuple[str, str]:
        return "flow", f"{self.title}: {'a' if self.guidance else 'no'} guidance embedding"

    def single_file_scheduler(self, configs, prediction_type: str):
        return flow_scheduler(configs)

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
        return replace(self.with_text_settings(train), guidance_scale=train.guidance_scale, flow=flow)

    def for_sampling(self, guidance_scale: float) -> "FluxFamily":
        return replace(self, guidance_scale=guidance_scale)

    def kohya_metadata(self, train) -> dict[str, str]:
        """What sd-scripts' flux_train_network.py adds (its `update_metadata`), as str() of its arguments."""
        return {"ss_network_module": "networks.lora_flux", "ss_model_type": "flux", "ss_apply_t5_attn_mask": "False",
                "ss_weighting_scheme": train.weighting_scheme, "ss_logit_mean": str(train.logit_mean),
                "ss_logit_std": str(train.logit_std), "ss_mode_scale": str(train.mode_scale),
                "ss_guidance_scale": str(train.guidance_scale), "ss_timestep_sampling": train.timestep_sampling,
                "ss_sigmoid_scale": str(train.sigmoid_scale), "ss_model_prediction_type": train.model_prediction_type,
                "ss_discrete_flow_shift": str(train.discrete_flow_shift)}

    def encode_text(self, encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        return self.join_text([self.encode_slot(i, enc, ids) for i, (enc, ids) in enumerate(zip(encoders, input_ids))])

    def encode_slot(self, index: int, encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> dict[str, torch.Tensor]:
        if index == 0:
            return {"pooled": encoder(input_ids).pooler_output}  # (B, 768): CLIP-L's EOS state after the final norm
        return {"hidden": encoder(input_ids).last_hidden_state}  # (B, T, 4096)

    def join_text(self, outputs: list[dict[str, torch.Tensor]]) -> TextConditioning:
        return TextConditioning(outputs[1]["hidden"], outputs[0]["pooled"])

    def emphasized(self, text: TextConditioning, multipliers: list[torch.Tensor]) -> TextConditioning:
        """A1111's "Original" emphasis on T5's states, each prompt on its own, as Forge weights FLUX.1
        prompts (its T5 engine); CLIP-L's pooled output has none: it reads the text without the syntax."""
        hidden = torch.cat([emphasize(text.hidden[i:i + 1], multipliers[1][i:i + 1]) for i in range(len(text.hidden))])
        return replace(text, hidden=hidden)

    def clip_skip_note(self, clip_skip: int) -> str | None:
        if clip_skip > 1:
            return (f"model.clip_skip = {clip_skip} is ignored for FLUX.1: it reads CLIP-L's pooled output and "
                    "T5's last layer; set clip_skip = 1 to silence this")
        return None

    def unread_text_layers(self, clip_skip: int, num_layers: list[int]) -> dict[str, range]:
        return {"te1": range(0), "te3": range(0)}  # both encoders' last layers are read

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

    def swap_blocks(self, denoiser, blocks_to_swap: int) -> list[tuple[list, int]]:
        # kohya's split (flux_models.enable_block_swap): a double block holds about two single blocks' weights
        double = blocks_to_swap // 2
        return [(list(denoiser.transformer_blocks), double),
                (list(denoiser.single_transformer_blocks), 2 * (blocks_to_swap - double))]

    def objective(self, noise_scheduler) -> FlowObjective:
        return FlowObjective(*self.flow)


_FLUX = dict(implementation="https://github.com/black-forest-labs/flux", text_encoders=FLUX_TEXT_ENCODERS,
             per_encoder_text=True, classifier_free_guidance=False, one_pass=True, size_multiple=16,
             pipeline_class="FluxPipeline", denoiser_part="transformer", denoiser_class="FluxTransformer2DModel",
             scheduler_class="FlowMatchEulerDiscreteScheduler", denoiser_prefixes=("model.diffusion_model.", ""),
             vae_prefix="vae.", vae_file="ae.safetensors", settings=FLUX_SETTINGS)
# T5 lengths: kohya's t5xxl_max_token_length defaults (flux_train_network.py), 512 dev, 256 schnell.
# schnell is distilled for 1-4 steps, as its model card renders.
FLUX_DEV = FluxFamily("flux1_dev", "flux1", "flux-1-dev", title="FLUX.1 dev", t5_max_length=512, **_FLUX)
FLUX_SCHNELL = FluxFamily("flux1_schnell", "flux1", "flux-1-schnell", title="FLUX.1 schnell", guidance=False,
                          sample_steps=4, t5_max_length=256, **_FLUX)
