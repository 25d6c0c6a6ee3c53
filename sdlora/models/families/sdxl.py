"""SDXL: two text encoders whose penultimate states are concatenated, encoder 2's pooled
projection, and size/crop conditioning (`time_ids`).

SDXL was trained with size and crop conditioning: `time_ids` = (original height, original
width, crop top, crop left, target height, target width) of each example, as in kohya's
`sdxl_train_network.py` and diffusers' SDXL LoRA example. At sampling time the pipeline builds
them itself (original = target = the image size, crop (0, 0)).

kohya's clip_skip does not apply to SDXL: both encoders always give their penultimate layer
(without the final layer norm), which is what clip_skip 2 means for SD1.x; kohya warns and
ignores other values, and so does sdlora. The pooled embedding always comes from the last layer.

Its single files keep the encoders under `conditioner.embedders.0.transformer.` (OpenAI CLIP-L) and
`conditioner.embedders.1.model.` (OpenCLIP bigG, its text_projection included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.models.families.base import Family, TextConditioning, TextEncoderSlot
from sdlora.models.families.clip import OpenAIClipLayout, OpenClipLayout
from sdlora.models.tokenizer import clip_tokenizer, open_clip_tokenizer

SDXL_TEXT_ENCODERS = (
    TextEncoderSlot("text_encoder", "tokenizer", "text encoder 1", "CLIPTextModel",
                    "conditioner.embedders.0.transformer.", OpenAIClipLayout(), clip_tokenizer),
    TextEncoderSlot("text_encoder_2", "tokenizer_2", "text encoder 2", "CLIPTextModelWithProjection",
                    "conditioner.embedders.1.model.", OpenClipLayout(projection=True), open_clip_tokenizer),
)


@dataclass(frozen=True)
class SDXLFamily(Family):
    """SDXL: the conditioning of the module docstring, its size/crop time ids and clip_skip rule."""

    def encode_text(self, encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        out1 = encoders[0](input_ids[0], output_hidden_states=True)
        out2 = encoders[1](input_ids[1], output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, 77, 768 + 1280)
        return TextConditioning(hidden, out2.text_embeds)  # text_embeds: projection of the EOS token's state

    def size_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                          target_size: tuple[int, int]) -> torch.Tensor:
        """time_ids, (6,)."""
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)

    def unet_conditioning(self, text: TextConditioning, time_ids_: torch.Tensor | None, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": text.hidden.to(dtype),
                "added_cond_kwargs": {"text_embeds": text.pooled.to(dtype), "time_ids": time_ids_.to(dtype)}}

    def clip_skip_note(self, clip_skip: int) -> str | None:
        if clip_skip > 2:  # kohya's behaviour
            return (f"model.clip_skip = {clip_skip} is ignored for SDXL: both text encoders always give their "
                    "penultimate layer (what kohya and A1111 use); set clip_skip = 1 or 2 to silence this")
        return None

    def unread_text_layers(self, clip_skip: int, num_layers: list[int]) -> dict[str, range]:
        """SDXL reads encoder 1's penultimate state and encoder 2's last (its pooled output)."""
        return {"te1": range(num_layers[0] - 1, num_layers[0]), "te2": range(0)}


SDXL = SDXLFamily("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base",
                  "https://github.com/Stability-AI/generative-models", title="SDXL base",
                  text_encoders=SDXL_TEXT_ENCODERS, signature="conditioner.embedders.1.",
                  pipeline_class="StableDiffusionXLPipeline")
