"""Row blocks of a weight change, for modules that several diffusers Linears over one input form in
the original model (FLUX.1's qkv and linear1, SD3's qkv): what the kinds that stack and cut rows
exactly share.

A kind's factor that holds its change's output rows (LoRA's up, LoHa's w1_a and w2_a) stacks the
parts' factors block-diagonally, [out_1 + ... + out_n, r_1 + ... + r_n], with the input-side factors
stacked below each other; reading such a module back, when every factor is block-diagonal over n
equal rank chunks, its diagonal blocks are the parts' factors again.
"""

from __future__ import annotations

import torch

# The one owner sits below the adapters, where single-file loading reads original checkpoints with it.
from sdlora.models.transformer_names import exchanged_halves  # noqa: F401 - re-exported for the kinds


def diagonal_blocks(factor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor] | None:
    """The diagonal blocks of an output-side factor [sum(sizes), rank] cut into row blocks `sizes` and
    len(sizes) equal rank chunks, or None when rank does not divide or an off-diagonal block is non-zero."""
    n, rank = len(sizes), factor.shape[1]
    if n < 2 or rank % n:
        return None
    blocks = [rows.split(rank // n, dim=1) for rows in factor.split(sizes)]  # blocks[j][k]: rows of j, ranks k
    if any(blocks[j][k].any() for j in range(n) for k in range(n) if j != k):
        return None
    return [blocks[j][j] for j in range(n)]


def common_scale(scales: list[float]) -> float:
    """The parts' one scale alpha / rank; parts of one fused module are trained with one [network]."""
    if any(abs(s - scales[0]) > 1e-6 * abs(scales[0]) for s in scales[1:]):
        raise ValueError(f"the parts of a fused module need one scale (alpha / rank), got {scales}")
    return scales[0]
