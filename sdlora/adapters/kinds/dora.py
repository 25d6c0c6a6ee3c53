"""DoRA (Liu et al. 2024, LyCORIS `dora_wd`): a modifier over any kind, its magnitude `dora_scale`.

The adapted weight is W' = m * (W0 + delta W) / ||W0 + delta W||, the norm taken per output row
(m [out, 1, ...], LyCORIS's wd_on_out and peft's magnitude) or per input column (m [1, in, ...],
LyCORIS before wd_on_out and A1111); the change is W' - W0. A multiplier w scales that change
linearly, W0 + w (W' - W0), as A1111 and ComfyUI do (LyCORIS's own forward agrees at w = 1; at
other weights it interpolates m / ||.|| instead, so that w = 0 there still leaves delta W applied).
"""

from __future__ import annotations

import torch

from sdlora.adapters.kinds.rows import exchanged_halves
from sdlora.errors import UserError

TENSOR = "dora_scale"


def dora_axis(magnitude: torch.Tensor, weight_shape) -> int:
    """0 when DoRA's magnitude is per output row (m [out, 1, ...]), 1 when per input column (m [1, in, ...])."""
    out, fan_in = weight_shape[0], weight_shape[1]
    if magnitude.shape[0] == out and magnitude.numel() == out:
        return 0
    if magnitude.dim() > 1 and magnitude.shape[0] == 1 and magnitude.shape[1] == fan_in and magnitude.numel() == fan_in:
        return 1
    raise UserError(f"dora_scale of shape {tuple(magnitude.shape)} fits neither the rows nor the columns of a base "
                    f"weight of shape {tuple(weight_shape)}: the adapter was trained for a different base model")


def dora_delta(base_weight: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' - W0 with W' = m * (W0 + delta W) / ||W0 + delta W|| along DoRA's axis (fp32)."""
    weight = base_weight.float() + update
    axis = dora_axis(magnitude, weight.shape)
    # The norm of each output row (axis 0) or input column (axis 1) over every other axis.
    moved = weight.movedim(axis, 0)
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1)
    shape = [1] * weight.dim()
    shape[axis] = -1
    norm = norm.reshape(shape) + torch.finfo(torch.float32).eps  # LyCORIS's guard against a zero column
    return weight * (magnitude.float().reshape(shape) / norm) - base_weight.float()


def stack_rows(magnitudes: list[torch.Tensor], swap_halves: bool = False) -> torch.Tensor:
    """The magnitude of a module whose rows are the parts' rows: per-output-row magnitudes [out_j, 1]
    concatenate, since each row's norm involves that row alone."""
    stacked = torch.cat(magnitudes)
    return exchanged_halves(stacked) if swap_halves else stacked


def split_rows(magnitude: torch.Tensor, sizes: list[int], swap_halves: bool = False) -> list[torch.Tensor]:
    if magnitude.shape[0] != sum(sizes) or magnitude.numel() != sum(sizes):
        raise UserError(f"dora_scale of shape {tuple(magnitude.shape)} on a fused module of {sum(sizes)} rows: only "
                        f"a per-output-row magnitude [{sum(sizes)}, 1] can be cut onto its parts")
    return list((exchanged_halves(magnitude) if swap_halves else magnitude).split(sizes))
