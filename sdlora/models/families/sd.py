"""SD1.x and SD2.x: one CLIP text encoder whose hidden states condition the U-Net.

    sd_v1    OpenAI CLIP-L (768), epsilon prediction, 512 px
    sd_v2    OpenCLIP-H (1024), epsilon prediction, 512 px (SD2.x-base)
    sd_v2_v  OpenCLIP-H (1024), v prediction, 768 px (SD2.x 768-v)

Their single files keep the text encoder under `cond_stage_model.`: `transformer.` (OpenAI CLIP in
transformers' names) for SD1.x, `model.` (OpenCLIP) for SD2.x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.models.families.base import Family, TextEncoderSlot
from sdlora.models.families.clip import OpenAIClipLayout, OpenClipLayout
from sdlora.models.tokenizer import clip_tokenizer, open_clip_tokenizer

SD1_TEXT_ENCODER = TextEncoderSlot("text_encoder", "tokenizer", "text encoder", "CLIPTextModel",
                                   "cond_stage_model.transformer.", OpenAIClipLayout(), clip_tokenizer)
SD2_TEXT_ENCODER = TextEncoderSlot("text_encoder", "tokenizer", "text encoder", "CLIPTextModel",
                                   "cond_stage_model.model.", OpenClipLayout(projection=False, unused_block=23),
                                   open_clip_tokenizer)
# ComfyUI's SD20 check (supported_models.py): the v models' last attention block has a
# spread-out norm1 bias (std > 0.09); the epsilon 512-base models keep it near zero.
V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def sd2_prediction_type(tensors: dict) -> str:
    probe = tensors.get(V_PROBE)
    if probe is not None and torch.std(probe.float(), unbiased=False) > 0.09:
        return "v_prediction"
    return "epsilon"


@dataclass(frozen=True)
class SD2Family(Family):
    """SD2.x: its two variants share the architecture and are named by their prediction type, which
    a single file does not state (guessed from the weights)."""

    def guess_prediction_type(self, tensors: dict) -> tuple[str, str]:
        return sd2_prediction_type(tensors), "guessed from the weights; set model.v_parameterization if wrong"

    def named_for(self, prediction_type: str) -> str:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"


_SD_PIPELINE = (("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False))

SD1 = Family("sd_v1", "sd_v1", "stable-diffusion-v1", title="SD1.x", text_encoders=(SD1_TEXT_ENCODER,),
             signature=SD1_TEXT_ENCODER.prefix, context_width=768, conv_proj=True, pipeline_options=_SD_PIPELINE)
_SD2 = dict(title="SD2.x", text_encoders=(SD2_TEXT_ENCODER,), signature=SD2_TEXT_ENCODER.prefix + "transformer.resblocks.",
            context_width=1024, ss_v2=True, pipeline_options=_SD_PIPELINE)
SD2 = SD2Family("sd_v2", "sd_v2", "stable-diffusion-v2-512", **_SD2)
SD2_V = SD2Family("sd_v2_v", "sd_v2_v", "stable-diffusion-v2-768-v", **_SD2)
