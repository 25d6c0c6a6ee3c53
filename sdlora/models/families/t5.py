"""T5-XXL's encoder, the text encoder FLUX.1 and SD3.x condition on, in single files: transformers'
T5EncoderModel names (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...), as
ComfyUI's `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors` and the `text_encoders.t5xxl.
transformer.` part of its all-in-one files hold them. The input embedding is one matrix that
T5EncoderModel names twice (`shared`, `encoder.embed_tokens`, tied); files keep one of the names.
"""

from __future__ import annotations

from dataclasses import dataclass

_SHARED, _TIED = "shared.weight", "encoder.embed_tokens.weight"


@dataclass(frozen=True)
class T5Layout:
    """transformers' T5EncoderModel names under the prefix; a decoder (a whole T5's file) is not read."""

    def recognises(self, keys) -> bool:
        return "encoder.block.0.layer.0.SelfAttention.q.weight" in keys

    def width(self, state: dict) -> int:
        return state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[1]

    def from_original(self, state: dict) -> dict:
        out = {k: v for k, v in state.items() if k.startswith("encoder.") and k != _TIED}
        shared = state.get(_SHARED, state.get(_TIED))
        return out if shared is None else {_SHARED: shared, **out}

    def to_original(self, state: dict, prefix: str) -> dict:
        return {prefix + k: v for k, v in state.items() if k != _TIED}
