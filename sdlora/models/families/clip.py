"""CLIP text encoders, the ones SD1.x, SD2.x and SDXL condition on: their transformers-4 names,
kohya's clip_skip, and their two original single-file layouts (OpenAI CLIP, OpenCLIP) both ways.
A family names, per text encoder, which layout its single files use (`TextEncoderSlot.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# transformers 4 nests CLIPTextModel's transformer as `.text_model` (so its module paths read
# `text_model.encoder.layers.N...`); transformers 5 flattens CLIPTextModel (`encoder.layers.N...`)
# and keeps the nesting in CLIPTextModelWithProjection. Files (Kohya adapters, original-layout
# checkpoints) always use the 4.x names.
_TEXT_TRANSFORMER_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")


def nested_text_name(path: str) -> str:
    """A text encoder's module or parameter path under its transformers-4 name: `encoder.layers.3.mlp.fc1`
    -> `text_model.encoder.layers.3.mlp.fc1`; nested paths and `text_projection` are kept."""
    return "text_model." + path if path.startswith(_TEXT_TRANSFORMER_CHILDREN) else path


def nested_text_key(body: str) -> str:
    """`nested_text_name` for the body of a Kohya key, whose "." are already "_": `encoder_layers_3_mlp_fc1`
    (what kohya and LyCORIS write under transformers 5) -> `text_model_encoder_layers_3_mlp_fc1`."""
    children = tuple(child.replace(".", "_") for child in _TEXT_TRANSFORMER_CHILDREN)
    return "text_model_" + body if body.startswith(children) else body


def text_transformer(text_encoder):
    """The CLIPTextTransformer (embeddings, encoder, final_layer_norm) of a text encoder, nested or flat,
    also when accelerate wrapped it for multi-process training."""
    from accelerate.utils import extract_model_from_parallel

    text_encoder = extract_model_from_parallel(text_encoder)
    return getattr(text_encoder, "text_model", text_encoder)


def encode_prompt(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """One CLIP text encoder's hidden states for the UNet's cross attention, (B, 77, dim).

    kohya's clip_skip: 1 is the last hidden state; n > 1 is the hidden state n layers from
    the end (hidden_states[-n]) passed through the final layer norm, as sd-scripts does.
    diffusers' pipelines count differently: their `clip_skip=k` takes hidden_states[-(k + 1)]
    (then the final layer norm), so kohya/A1111 clip_skip n is diffusers clip_skip n - 1;
    never pass this value to a pipeline's `clip_skip` argument, pass prompt_embeds instead.
    """
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return text_transformer(text_encoder).final_layer_norm(hidden)


# ---------------------------------------------------------------- original single-file layouts
#
# Each layout converts a CLIPTextModel(WithProjection) state dict (transformers names) to the names a
# single file keeps under the encoder's prefix, and back from those names with the prefix removed; it
# recognises a separate file of its encoder (model.text_encoders) by a tensor name, and reads its width.


@dataclass(frozen=True)
class OpenAIClipLayout:
    """OpenAI CLIP (SD1's text encoder, SDXL's first, FLUX's CLIP-L): transformers' CLIPTextModel names under
    the prefix; position_ids are a buffer transformers builds itself. `projection`: the model has a
    text_projection; without one, a file's (SAI's clip_l.safetensors holds it) is not read. `identity_projection`:
    the pooled output is used unprojected, so the model's text_projection is the identity whatever the file holds
    (SD3's CLIP-L: ComfyUI's SD3ClipModel reads it with return_projected_pooled=False, and diffusers' single-file
    loader sets text_projection to eye(768), as kohya's sd3_utils.load_clip_l does for a file without one)."""

    projection: bool = False
    identity_projection: bool = False

    def recognises(self, keys) -> bool:
        return "text_model.embeddings.token_embedding.weight" in keys

    def width(self, state: dict) -> int:
        return state["text_model.embeddings.token_embedding.weight"].shape[1]

    def from_original(self, state: dict) -> dict:
        out = {k: v for k, v in state.items() if not k.endswith("position_ids")
               and (self.projection or k != "text_projection.weight")}
        if self.identity_projection and out:
            embedding = out["text_model.embeddings.token_embedding.weight"]
            out["text_projection.weight"] = torch.eye(embedding.shape[1], dtype=embedding.dtype)
        return out

    def to_original(self, state: dict, prefix: str) -> dict:
        return {prefix + nested_text_name(k): v for k, v in state.items()
                if not k.endswith("position_ids") and (self.projection or k != "text_projection.weight")}


# OpenCLIP <-> transformers CLIP, both ways. OpenCLIP stacks q, k, v in one in_proj (dim 0) and applies
# text_projection as x @ P, so P is the transposed Linear weight.
_OPEN_CLIP_NAMES = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.final_layer_norm.weight": "ln_final.weight",
                    "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@dataclass(frozen=True)
class OpenClipLayout:
    """OpenCLIP (SD2's text encoder, SDXL's second). `projection`: read its text_projection, which SDXL's
    pooled embedding uses and SD2's U-Net never sees; `unused_block`: a block the file has and the
    conditioning never runs (SD2 reads the penultimate of OpenCLIP-H's 24 blocks: its config has 23,
    and diffusers leaves the 24th out too)."""

    projection: bool
    unused_block: int | None = None

    def recognises(self, keys) -> bool:
        return "transformer.resblocks.0.attn.in_proj_weight" in keys

    def width(self, state: dict) -> int:
        return state["token_embedding.weight"].shape[1]

    def from_original(self, state: dict) -> dict:
        """The encoder in transformers-4 names, from its original names (prefix removed)."""
        names = {v: k for k, v in _OPEN_CLIP_NAMES.items()}
        layer_names = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
        out = {}
        for name, value in state.items():
            if name in names:
                out[names[name]] = value
            elif name == "text_projection":
                if self.projection:
                    out["text_projection.weight"] = value.T.contiguous()
            elif name.startswith("transformer.resblocks."):
                index, rest = name.removeprefix("transformer.resblocks.").split(".", 1)
                module, param = rest.rsplit(".", 1)
                base = f"text_model.encoder.layers.{index}."
                if module == "attn" and param.startswith("in_proj_"):
                    for proj, chunk in zip(_QKV, value.chunk(3)):
                        out[f"{base}{proj}.{param.removeprefix('in_proj_')}"] = chunk.clone()
                else:
                    out[base + layer_names.get(module, module) + "." + param] = value
            # logit_scale and the like belong to CLIP's image-text training, not to the U-Net's conditioning
        if self.unused_block is not None:
            unused = f"text_model.encoder.layers.{self.unused_block}."
            out = {k: v for k, v in out.items() if not k.startswith(unused)}
        return out

    def to_original(self, state: dict, prefix: str) -> dict:
        projection = state.get("text_projection.weight")
        state = {nested_text_name(k): v for k, v in state.items()
                 if not k.endswith("position_ids") and k != "text_projection.weight"}
        out = {} if projection is None else {prefix + "text_projection": projection.T.contiguous()}
        for key, value in state.items():
            if key in _OPEN_CLIP_NAMES:
                out[prefix + _OPEN_CLIP_NAMES[key]] = value
                continue
            layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
            module, param = rest.rsplit(".", 1)
            base = f"{prefix}transformer.resblocks.{layer}."
            if module in _QKV:
                if module == _QKV[0]:
                    parts = [state[key.replace(_QKV[0], p)] for p in _QKV]
                    out[base + f"attn.in_proj_{param}"] = torch.cat(parts, 0)
                continue
            out[base + _OPEN_CLIP_LAYER[module] + "." + param] = value
        return out
