"""LoHa (LyCORIS): the Hadamard product of two low-rank matrices.

    delta W = (w1_a @ w1_b) * (w2_a @ w2_b)      w*_a [out, r], w*_b [r, in * k * k]

Tucker convs add t1/t2 [r, r, k, k] with w*_a [r, out], w*_b [r, in] (`tucker.tucker`).
The rank alpha is divided by is w1_b's.
"""

from __future__ import annotations

import torch

from sdlora.adapters.kinds.lycoris import lycoris_peft_config
from sdlora.adapters.kinds.rows import common_scale, diagonal_blocks, exchanged_halves
from sdlora.adapters.kinds.tucker import tucker, tucker_pair

NAME = "loha"
NETWORK_TYPES = ("loha",)  # [network] type values
LYCORIS_ALGO = "loha"
DORA = False  # peft has DoRA for LoRA only
TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")  # every module has all four
TUCKER = "hada_t1"
RANK_PAIRS = ((("hada_w1_a", 1), ("hada_w1_b", 0)), (("hada_w2_a", 1), ("hada_w2_b", 0)))


def matches(parts: dict[str, torch.Tensor]) -> bool:
    return all(s in parts for s in TENSORS)


def rank_pairs(parts: dict[str, torch.Tensor]):
    """RANK_PAIRS; Tucker's w*_a [r, out] hold the rank on their first axis."""
    if TUCKER in parts:
        return tuple(((a, 0), b) for (a, _), b in RANK_PAIRS)
    return RANK_PAIRS


def rank(parts: dict[str, torch.Tensor]) -> int:
    return parts["hada_w1_b"].shape[0]


def update(parts: dict[str, torch.Tensor], weight_shape: torch.Size) -> torch.Tensor:
    """delta W unscaled (fp32), [out, in * k * k] or the Tucker form [out, in, k, k]."""
    if TUCKER in parts:
        return (tucker(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
                * tucker(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"]))
    w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
    w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
    return w1 * w2


def _khatri_rao(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor):
    """(A1 B1) * (A2 B2) = U V with U[p, ij] = A1[p, i] A2[p, j], V[ij, q] = B1[i, q] B2[j, q] (rank <= r1 r2)."""
    u = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    v = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return u, v


def factors(parts: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(U, V)]: the Khatri-Rao factors of the Hadamard product, inner size r^2."""
    if TUCKER in parts:
        (a1, b1), (a2, b2) = (tucker_pair(parts[f"hada_t{i}"], parts[f"hada_w{i}_a"], parts[f"hada_w{i}_b"])
                              for i in (1, 2))
    else:
        a1, b1, a2, b2 = (parts[name].float() for name in TENSORS)
    return [_khatri_rao(a1, a2, b1, b2)]


def weight_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The base weight's shape where the module tells it (Tucker: w*_a [r, out], w*_b [r, in],
    t [r, r, kh, kw]); None when it stores the flattened [out, in * kh * kw]."""
    if TUCKER in parts:
        return (parts["hada_w1_a"].shape[1], parts["hada_w1_b"].shape[1], *parts["hada_t1"].shape[2:])
    return None


def fits(parts: dict[str, torch.Tensor], shape: torch.Size) -> None:
    """Unknown without forming the change."""
    return None


def peft_config(network_cfg, dim: int, alpha: float, paths: list[str], rank_pattern: dict, alpha_pattern: dict):
    from peft import LoHaConfig

    return lycoris_peft_config(LoHaConfig, network_cfg, dim, alpha, paths, rank_pattern, alpha_pattern)


def peft_tensors(layer, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The module's tensors in a peft LoHa layer: LyCORIS's names and shapes."""
    return {name: getattr(layer, name)[adapter] for name in TENSORS}


def peft_alpha(layer, adapter: str) -> float:
    return float(layer.alpha[adapter])


def file_factor(suffix: str, suffixes, scale: float) -> float:
    """What a peft tensor is multiplied by in the file: 1, peft's LoHa tensors are the file's."""
    return 1.0


def stack_rows(parts: list[dict[str, torch.Tensor]], swap_halves: bool = False) -> dict[str, torch.Tensor] | None:
    """One module whose change is the parts' stacked, [dW_1; ...; dW_n], exactly: with the output-side
    factors block-diagonal and the input-side ones stacked,

        w1_a = blockdiag(w1_a_j), w1_b = [w1_b_1; ...; w1_b_n]   (w2 likewise)

    row block j of (w1_a @ w1_b) * (w2_a @ w2_b) is (w1_a_j @ w1_b_j) * (w2_a_j @ w2_b_j); the rank is
    n r and alpha n alpha, so the scale alpha / r is kept. swap_halves exchanges the row halves of
    w1_a and w2_a (a row permutation of both factors permutes the Hadamard product's rows).
    None for Tucker modules (convs, never fused)."""
    if any(TUCKER in p for p in parts):
        return None
    scale = common_scale([float(p.get("alpha", rank(p))) / rank(p) for p in parts])
    stacked = {}
    for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):
        up = torch.block_diag(*(p[a] for p in parts))
        stacked[a] = exchanged_halves(up) if swap_halves else up
        stacked[b] = torch.cat([p[b] for p in parts])
    return stacked | {"alpha": torch.tensor(scale * stacked["hada_w1_b"].shape[0])}


def split_rows(parts: dict[str, torch.Tensor], sizes: list[int], swap_halves: bool = False
               ) -> list[dict[str, torch.Tensor]]:
    """The parts (output sizes `sizes`) of a module their rows stack into, each exact: when w1_a and
    w2_a are block-diagonal over n equal rank chunks (`stack_rows`' layout), the diagonal blocks with
    the input-side factors' chunks (alpha / n each); otherwise every part keeps the whole input-side
    factors and its rows of w1_a and w2_a (alpha as it is)."""
    ups = {a: exchanged_halves(parts[a]) if swap_halves else parts[a] for a in ("hada_w1_a", "hada_w2_a")}
    alpha, n = float(parts.get("alpha", rank(parts))), len(sizes)
    diagonal = {a: diagonal_blocks(up, sizes) for a, up in ups.items()}
    if all(d is not None for d in diagonal.values()):
        chunks = {b: parts[b].chunk(n) for b in ("hada_w1_b", "hada_w2_b")}
        return [{"hada_w1_a": diagonal["hada_w1_a"][j], "hada_w1_b": chunks["hada_w1_b"][j],
                 "hada_w2_a": diagonal["hada_w2_a"][j], "hada_w2_b": chunks["hada_w2_b"][j],
                 "alpha": torch.tensor(alpha / n)} for j in range(n)]
    w1, w2 = ups["hada_w1_a"].split(sizes), ups["hada_w2_a"].split(sizes)
    return [{"hada_w1_a": w1[j], "hada_w1_b": parts["hada_w1_b"], "hada_w2_a": w2[j], "hada_w2_b": parts["hada_w2_b"],
             "alpha": torch.tensor(alpha)} for j in range(n)]
