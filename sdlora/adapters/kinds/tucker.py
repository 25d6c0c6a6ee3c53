"""The Tucker core every kind may carry (LyCORIS `use_tucker`): a conv's kernel lives in a small
core t [r, r, k, k] between two matrices a [r, out] and b [r, in]:

    W[p, q, k, l] = sum_ij a[i, p] t[i, j, k, l] b[j, q]
"""

from __future__ import annotations

import torch


def tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W [out, in, k, k] (fp32) from a [r, out], b [r, in], t [r, r, k, k]."""
    return torch.einsum("ijkl,ip,jq->pqkl", t.float(), a.float(), b.float())


def tucker_pair(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tucker(t, a, b)` flattened to [out, in * k * k] as a^T @ M, M[i, (q, k, l)] = sum_j t[i, j, k, l] b[j, q]."""
    m = torch.einsum("ijkl,jq->iqkl", t.float(), b.float())
    return a.float().T, m.reshape(m.shape[0], -1)


def full_pair(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix as a product with an identity on its shorter side."""
    w = w.float().reshape(w.shape[0], -1)
    rows, cols = w.shape
    return (torch.eye(rows), w) if rows <= cols else (w, torch.eye(cols))
