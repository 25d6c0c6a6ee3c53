"""One unit per adapter kind, the way LyCORIS keeps one file per algorithm.

Each of `lora` (LoRA and LoCon), `loha` and `lokr` says its tensors' suffixes (TENSORS, its Tucker
core TUCKER), whether a module's tensors are its (`matches`), its rank, its unscaled weight change
(`update`), that change as factor pairs never multiplied out (`factors`), the base weight's shape
where the module tells it, and where peft keeps its tensors. `dora` is a modifier over any of them.
This registry finds a module's kind from its tensors; callers ask the kind, never compare names.

Per module, with r the kind's rank and scale = alpha / r (alpha = r when the file has none):

    W = W0 + multiplier * module_delta,  module_delta = scale * update   (DoRA: dora.dora_delta)
"""

from __future__ import annotations

import torch

from sdlora.adapters.kinds import dora, loha, lokr, lora
from sdlora.errors import UserError

KINDS = (lora, loha, lokr)
# Modules of algorithms sdlora does not read, named by a tensor only they have.
_UNSUPPORTED = {"diff": "LyCORIS full fine-tuning (diff)", "on_input": "(IA)^3", "a1.weight": "GLoRA",
                "oft_blocks": "OFT / BOFT", "oft_diag": "OFT", "w_norm": "LyCORIS norm layers",
                "lora_A.weight": "diffusers/peft (lora_A/lora_B) that was not converted"}


def kind_of(parts: dict[str, torch.Tensor]):
    """The unit (`lora`, `loha` or `lokr`) whose tensors a module holds; any other algorithm is refused by name."""
    for kind in KINDS:
        if kind.matches(parts):
            return kind
    for suffix, algorithm in _UNSUPPORTED.items():
        if suffix in parts:
            raise UserError(f"{algorithm} adapters are not supported (module tensors {sorted(parts)}); "
                            f"sdlora reads LoRA, LoCon, LoHa and LoKr, each optionally with DoRA")
    raise UserError(f"unrecognised adapter module with tensors {sorted(parts)}; expected "
                    f"{' + '.join(lora.TENSORS)} (LoRA), {' + '.join(loha.TENSORS)} (LoHa) or lokr_w1* + "
                    f"lokr_w2* (LoKr)")


def named(name: str):
    """The unit of a kind's name ("lora", "loha", "lokr")."""
    return next(kind for kind in KINDS if kind.NAME == name)


def for_network_type(network_type: str):
    """The unit of a [network] type: lora and locon are LoRA (LoCon only adapts convs too)."""
    return next(kind for kind in KINDS if network_type in kind.NETWORK_TYPES)


def adapts_convs(network_type: str) -> bool:
    """LoCon is LoRA on the U-Net's 3x3 convs too; the other types reach convs through
    unet_targets = "all"."""
    return network_type in lora.CONV_NETWORK_TYPES


def writes_conv_args(network_type: str) -> bool:
    """Kohya's ss_network_args carry conv_dim / conv_alpha for LoCon and every LyCORIS algorithm."""
    return adapts_convs(network_type) or for_network_type(network_type).LYCORIS_ALGO is not None


def module_kind(parts: dict[str, torch.Tensor]) -> str:
    """"lora" (LoCon and Tucker LoCon too), "loha" or "lokr"."""
    return kind_of(parts).NAME


def has_tucker(parts: dict[str, torch.Tensor]) -> bool:
    return kind_of(parts).TUCKER in parts


def has_dora(parts: dict[str, torch.Tensor]) -> bool:
    return dora.TENSOR in parts


def module_variant(parts: dict[str, torch.Tensor]) -> str:
    """The kind with its options, as reports show it: "lora", "loha+tucker", "lokr+dora", ..."""
    return (module_kind(parts) + ("+tucker" if has_tucker(parts) else "")
            + ("+dora" if has_dora(parts) else ""))


def is_plain_lora(parts: dict[str, torch.Tensor]) -> bool:
    """A LoRA / LoCon module without Tucker core or DoRA: what diffusers and Kohya's networks.lora read."""
    return kind_of(parts) is lora and not has_tucker(parts) and not has_dora(parts)


def module_rank(parts: dict[str, torch.Tensor]) -> int | None:
    """The rank alpha is divided by; None for a LoKr module without low-rank factors."""
    return kind_of(parts).rank(parts)


def module_scale(parts: dict[str, torch.Tensor]) -> float:
    """alpha / rank; a module without `.alpha` (or a LoKr with full factors) loads as scale 1, as in every UI."""
    rank = module_rank(parts)
    alpha = parts.get("alpha")
    return 1.0 if alpha is None or rank is None else float(alpha) / rank


def rank_pairs(parts: dict[str, torch.Tensor]):
    """((tensor, its rank axis), (tensor, its rank axis)) pairs whose rank axes must agree, of every kind."""
    return [pair for kind in KINDS for pair in kind.rank_pairs(parts)]


def module_update(parts: dict[str, torch.Tensor], weight_shape) -> torch.Tensor:
    """The scaled low-rank change (fp32) in the base weight's shape [out, in] or [out, in, k, k].

    For a DoRA module this is only delta W inside the decomposition; `module_delta` gives the change.
    """
    weight_shape = torch.Size(weight_shape)
    delta = kind_of(parts).update(parts, weight_shape)
    if delta.shape[0] != weight_shape[0] or delta.numel() != weight_shape.numel():
        raise UserError(f"adapter module of shape {tuple(delta.shape)} does not fit a base weight of shape "
                        f"{tuple(weight_shape)}: the adapter was trained for a different base model")
    return delta.reshape(weight_shape) * module_scale(parts)


def module_delta(parts: dict[str, torch.Tensor], weight_shape, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight change at multiplier 1 (fp32): W = W0 + multiplier * module_delta.

    A DoRA module's change depends on the base weight W0, which must then be given.
    """
    update = module_update(parts, weight_shape)
    if not has_dora(parts):
        return update
    if base_weight is None:
        raise ValueError("module_delta: a DoRA module (dora_scale) needs the base weight")
    return dora.dora_delta(base_weight.to(update.device), update, parts[dora.TENSOR].to(update.device))


def check_shape(parts: dict[str, torch.Tensor], shape) -> None:
    """module_delta's shape check, without forming the change where the kind can tell from its factors."""
    shape = torch.Size(shape)
    if not has_dora(parts) and kind_of(parts).fits(parts, shape):
        return
    module_update(parts, shape)
    if has_dora(parts):
        dora.dora_axis(parts[dora.TENSOR], shape)


def factored_update(parts: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """delta W / scale, flattened to [out, in * k * k], as factor pairs that are never multiplied out.

    One pair (A, B): delta W / scale = A @ B (LoRA: up, down; Tucker: up, mid x down; LoHa: the
    Khatri-Rao factors of the Hadamard product, inner size r^2). Two pairs (LoKr):
    delta W / scale = kron(A1 @ B1, A2 @ B2), w2 flattened to [b, d * k * k].
    """
    return kind_of(parts).factors(parts)


def stated_weight_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The base weight's shape as the module states it; None when it stores [out, in * kh * kw] flattened
    (LoHa, LoKr without a kernel), so the kernel must come from elsewhere."""
    return kind_of(parts).weight_shape(parts)


def stack_rows(parts: list[dict[str, torch.Tensor]], swap_halves: bool = False) -> dict[str, torch.Tensor] | None:
    """One module whose change is the parts' changes stacked by rows, [dW_1; ...; dW_n] (with
    swap_halves, the rows' two halves exchanged after), exactly; DoRA's per-row magnitudes concatenate.
    None when the kind cannot write it so (LoKr). The parts are one kind with one scale alpha / r."""
    stacked = kind_of(parts[0]).stack_rows(parts, swap_halves)
    if stacked is None or not has_dora(parts[0]):
        return stacked
    return stacked | {dora.TENSOR: dora.stack_rows([p[dora.TENSOR] for p in parts], swap_halves)}


def split_rows(parts: dict[str, torch.Tensor], sizes: list[int], swap_halves: bool = False
               ) -> list[dict[str, torch.Tensor]]:
    """The modules of the parts (output sizes `sizes`) of a module whose rows stack them, each changing
    its part's rows exactly as the module changes them (the inverse of `stack_rows`)."""
    pieces = kind_of(parts).split_rows(parts, sizes, swap_halves)
    if not has_dora(parts):
        return pieces
    return [piece | {dora.TENSOR: m} for piece, m in zip(pieces, dora.split_rows(parts[dora.TENSOR], sizes, swap_halves))]
