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

Bases load from diffusers folders (StableDiffusion3Pipeline.save_pretrained) and from SAI's single files
(sd3.5_large.safetensors, sd3.5_medium.safetensors, sd3_medium*.safetensors): the MMDiT under
`model.diffusion_model.joint_blocks...` (or bare, a transformer saved alone), the VAE under `first_stage_model.`,
and, in the files that ship them, the text encoders in transformers' names under ComfyUI's and SAI's
`text_encoders.clip_l.transformer.` / `text_encoders.clip_g.transformer.` / `text_encoders.t5xxl.transformer.`
(ComfyUI's supported_models.SD3: text_encoder_key_prefix "text_encoders."); what a file lacks comes from
model.text_encoders (SAI's clip_l / clip_g / t5xxl files, told apart by width and layout). The variant is
read from the transformer's tensors by the rule below (`file_model_type`). CLIP-L's pooled output is used
unprojected, as ComfyUI and diffusers' single-file loader read SAI's files (`OpenAIClipLayout`). Adapters on the text
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
from sdlora.models.families.clip import OpenAIClipLayout
from sdlora.models.families.t5 import T5Layout
from sdlora.models.flow import DENSITY_SETTINGS, SD3Objective, flow_scheduler
from sdlora.models.tokenizer import clip_tokenizer, open_clip_tokenizer, t5_tokenizer

# The family-dependent keys it reads beside CFG's: SD3Objective's, StableDiffusion3Pipeline's skip-layer guidance.
SD3_SETTINGS = DENSITY_SETTINGS | {"train.training_shift", "sample.skip_layer_guidance_scale",
                                   "sample.skip_guidance_layers", "sample.skip_layer_guidance_start",
                                   "sample.skip_layer_guidance_stop"}
# SAI's files name the MMDiT under ComfyUI's model.diffusion_model.; a transformer saved alone may be bare.
SD3_FAMILY_PREFIXES = ("model.diffusion_model.", "")
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length, kohya's t5xxl_max_token_length

# SAI's files keep CLIP-G in transformers' names too (not OpenCLIP's, as SDXL's do), with its text_projection.
SD3_TEXT_ENCODERS = (
    TextEncoderSlot("text_encoder", "tokenizer", "CLIP-L", "CLIPTextModelWithProjection",
                    "text_encoders.clip_l.transformer.", OpenAIClipLayout(identity_projection=True), clip_tokenizer,
                    name="clip_l"),
    TextEncoderSlot("text_encoder_2", "tokenizer_2", "CLIP-G", "CLIPTextModelWithProjection",
                    "text_encoders.clip_g.transformer.", OpenAIClipLayout(projection=True), open_clip_tokenizer,
                    name="clip_g"),
    TextEncoderSlot("text_encoder_3", "tokenizer_3", "T5-XXL", "T5EncoderModel", "text_encoders.t5xxl.transformer.",
                    T5Layout(), t5_tokenizer, tokenizer_class="T5TokenizerFast", name="t5",
                    tokenizer_files=("tokenizer.json",)),
)
# A tensor every SAI MMDiT holds (diffusers' and kohya's test), and those that tell the variants apart in a file.
SD3_SIGNATURE = "joint_blocks.0.context_block.attn.qkv.weight"
QK_NORM = "joint_blocks.0.context_block.attn.ln_k.weight"  # sd-scripts' analyze_state_dict_state test
DUAL_ATTENTION = ".x_block.attn2.qkv.weight"  # in each MMDiT-X block


def model_type(qk_norm: bool, dual_attention: bool) -> str:
    """sd-scripts' model type: no qk norm -> "medium" (SD3), qk norm with MMDiT-X blocks -> "5-medium", qk norm
    without -> "5-large" (sd3_utils.analyze_state_dict_state; it supports no other combination)."""
    if not qk_norm:
        return "medium"
    return "5-medium" if dual_attention else "5-large"


def mmdit_type(config) -> str:
    """sd-scripts' model type of an SD3Transformer2DModel config: "medium", "5-medium" or "5-large"."""
    return model_type(bool(config.qk_norm), bool(config.dual_attention_layers))


def file_prefix(keys) -> str | None:
    """The prefix under which a single file keeps an SAI MMDiT (`SD3Family.denoiser_prefixes`); None: it holds none."""
    keys = set(keys)
    return next((p for p in SD3_FAMILY_PREFIXES if p + SD3_SIGNATURE in keys), None)


def file_model_type(keys, prefix: str) -> tuple[str, str]:
    """(model type, what told it) of the MMDiT under `prefix` in a file's tensor names, as `mmdit_type` reads a
    config: the qk norms' scales, the MMDiT-X blocks' second attention, and the depth (joint blocks)."""
    keys = [k for k in keys if k.startswith(prefix)]
    qk_norm = prefix + QK_NORM in keys
    dual = sorted(int(k[len(prefix):].split(".")[1]) for k in keys if k.endswith(DUAL_ATTENTION))
    depth = len({k[len(prefix):].split(".")[1] for k in keys if k.startswith(prefix + "joint_blocks.")})
    how = (f"{depth} joint blocks, {'qk RMS norm' if qk_norm else 'no qk norm'}"
           + (f", dual attention in blocks {dual[0]}-{dual[-1]}" if dual else ""))
    return model_type(qk_norm, bool(dual)), how


@dataclass(frozen=True)
class SD3Family(Family):
    """One SD3.x variant (its `base_model_version` is sd-scripts' model type), see the module docstring."""

    flow: tuple[Any, ...] = ()  # SD3Objective's arguments, set by `for_training`

    def detects(self, keys: list[str]) -> bool:
        prefix = file_prefix(keys)
        return prefix is not None and file_model_type(keys, prefix)[0] == self.base_model_version

    def guess_prediction_type(self, tensors: dict) -> tuple[str, str]:
        return "flow", f"{self.title}: {file_model_type(tensors, file_prefix(tensors))[1]}"

    def single_file_scheduler(self, configs, prediction_type: str):
        return flow_scheduler(configs)

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
            scheduler_class="FlowMatchEulerDiscreteScheduler", denoiser_prefixes=SD3_FAMILY_PREFIXES,
            vae_file="vae/diffusion_pytorch_model.safetensors", settings=SD3_SETTINGS)
# vae_file: a transformer saved alone has no VAE; Stability publishes it only inside the checkpoints and as the
# vae folder of its diffusers repositories (stabilityai/stable-diffusion-3.5-large), which model.vae reads.
SD3_MEDIUM = SD3Family("sd3_medium", "medium", "stable-diffusion-3-medium", title="SD3 Medium", **_SD3)
SD35_MEDIUM = SD3Family("sd35_medium", "5-medium", "stable-diffusion-3-5-medium", title="SD3.5 Medium", **_SD3)
SD35_LARGE = SD3Family("sd35_large", "5-large", "stable-diffusion-3-5-large", title="SD3.5 Large", **_SD3)
