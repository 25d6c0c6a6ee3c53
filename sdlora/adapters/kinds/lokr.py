"""LoKr (LyCORIS): a Kronecker product of two factors.

    delta W = kron(w1, w2)      w1 [a, c] (or w1_a @ w1_b), w2 [b, d(, k, k)] (or w2_a @ w2_b,
                                or Tucker t2 with w2_a [r, b], w2_b [r, d]); out = a b, in = c d

The rank alpha is divided by is w1_b's (else w2_b's); with both factors full there is none,
and the scale is 1 whatever alpha says (A1111's and ComfyUI's rule).
"""

from __future__ import annotations

import math

import torch

from sdlora.adapters.kinds.lycoris import lycoris_peft_config
from sdlora.adapters.kinds.tucker import full_pair, tucker, tucker_pair
from sdlora.errors import UserError

NAME = "lokr"
NETWORK_TYPES = ("lokr",)  # [network] type values
LYCORIS_ALGO = "lokr"
DORA = False  # peft has DoRA for LoRA only
TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # a module has some
TUCKER = "lokr_t2"
RANK_PAIRS = ()


def matches(parts: dict[str, torch.Tensor]) -> bool:
    return (("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts.keys())
            and ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts.keys()))


def rank_pairs(parts: dict[str, torch.Tensor]):
    return RANK_PAIRS


def rank(parts: dict[str, torch.Tensor]) -> int | None:
    for name in ("lokr_w1_b", "lokr_w2_b"):  # A1111's and ComfyUI's rule
        if name in parts:
            return parts[name].shape[0]
    return None


def kronecker_factors(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1 [a, c], w2 [b, d * k * k] or [b, d, k, k]): the two Kronecker factors, unscaled."""
    w1 = parts["lokr_w1"].float() if "lokr_w1" in parts else parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
    elif TUCKER in parts:
        w2 = tucker(parts[TUCKER], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        w2 = parts["lokr_w2_a"].float() @ parts["lokr_w2_b"].float()
    return w1, w2


def update(parts: dict[str, torch.Tensor], weight_shape: torch.Size) -> torch.Tensor:
    """delta W unscaled (fp32): kron(w1, w2), w2 given the base conv's kernel when it stores it flattened."""
    w1, w2 = kronecker_factors(parts)
    if len(weight_shape) == 4 and w2.dim() == 2 and w2.shape[1] * w1.shape[1] == weight_shape[1:].numel():
        w2 = w2.reshape(w2.shape[0], weight_shape[1] // w1.shape[1], *weight_shape[2:])  # [b, d, k, k]
    return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2.contiguous())


def factors(parts: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(A1, B1), (A2, B2)]: delta W = kron(A1 @ B1, A2 @ B2), w2 flattened to [b, d * k * k]."""
    w1 = (full_pair(parts["lokr_w1"]) if "lokr_w1" in parts
          else (parts["lokr_w1_a"].float(), parts["lokr_w1_b"].float()))
    if "lokr_w2" in parts:
        w2 = full_pair(parts["lokr_w2"])
    elif TUCKER in parts:
        w2 = tucker_pair(parts[TUCKER], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        w2 = (parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float())
    return [w1, w2]


def weight_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The base weight's shape where the module tells it (a Tucker core or a full 4-d w2 carries
    the kernel); None when it stores the flattened [out, in * kh * kw]."""
    kernel = (parts[TUCKER].shape[2:] if TUCKER in parts
              else parts["lokr_w2"].shape[2:] if "lokr_w2" in parts and parts["lokr_w2"].dim() == 4 else None)
    if kernel is None:
        return None
    pairs = factors(parts)
    out = math.prod(a.shape[0] for a, _ in pairs)
    return (out, pairs[0][1].shape[1] * parts.get("lokr_w2_b", parts.get("lokr_w2")).shape[1], *kernel)


def fits(parts: dict[str, torch.Tensor], shape: torch.Size) -> None:
    """Unknown without forming the change."""
    return None


def peft_config(network_cfg, dim: int, alpha: float, paths: list[str], rank_pattern: dict, alpha_pattern: dict):
    from peft import LoKrConfig

    return lycoris_peft_config(LoKrConfig, network_cfg, dim, alpha, paths, rank_pattern, alpha_pattern)


def peft_tensors(layer, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The module's tensors in a peft LoKr layer: LyCORIS's names and shapes, those it has."""
    return {name: getattr(layer, name)[adapter] for name in TENSORS if adapter in getattr(layer, name)}


def peft_alpha(layer, adapter: str) -> float:
    return float(layer.alpha[adapter])


def file_factor(suffix: str, suffixes, scale: float) -> float:
    """What a peft tensor is multiplied by in the file. LyCORIS and the UIs give a LoKr with both
    factors full scale 1 whatever alpha says; peft scales it by alpha / r, folded into w1."""
    return scale if suffix == "lokr_w1" and "lokr_w2" in suffixes else 1.0


def stack_rows(parts: list[dict[str, torch.Tensor]], swap_halves: bool = False) -> dict[str, torch.Tensor] | None:
    """None: the rows of several Kronecker products stacked are no Kronecker product (nor, in general, are
    kron(w1, w2)'s with its halves exchanged), so a LoKr module stays on its own Linear; one part as it is."""
    return parts[0] if len(parts) == 1 and not swap_halves else None


def split_rows(parts: dict[str, torch.Tensor], sizes: list[int], swap_halves: bool = False
               ) -> list[dict[str, torch.Tensor]]:
    if len(sizes) == 1 and not swap_halves:
        return [parts]
    raise UserError("a LoKr module on a fused Linear (qkv, linear1) cannot be cut onto its parts as a LoKr; "
                    "write it per part (lora_transformer_<diffusers path>), as sdlora exports LoKr")
