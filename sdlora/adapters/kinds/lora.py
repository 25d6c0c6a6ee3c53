"""LoRA and LoCon (Kohya's networks.lora; LyCORIS's locon): one low-rank pair per module.

    delta W = up @ down        down [r, in(, k, k)], up [out, r(, 1, 1)]

LoCon differs from LoRA only in also adapting 3x3 convs: the kernel rides along in down's
flattened input axis. Tucker LoCon (`lora_mid` [r, r, k, k], down [r, in, 1, 1], up [out, r, 1, 1]):

    delta W[p, q, k, l] = sum_ij up[p, i] mid[i, j, k, l] down[j, q]
"""

from __future__ import annotations

import torch

from sdlora.adapters.kinds.rows import common_scale, diagonal_blocks, exchanged_halves
from sdlora.adapters.kinds.tucker import tucker, tucker_pair
from sdlora.errors import UserError

NAME = "lora"
NETWORK_TYPES = ("lora", "locon")  # [network] type values
CONV_NETWORK_TYPES = ("locon",)  # LoCon: LoRA on the U-Net's 3x3 convs too
LYCORIS_ALGO = None  # Kohya's own networks.lora, not a LyCORIS algorithm
DORA = True  # peft trains DoRA over it
TENSORS = ("lora_down.weight", "lora_up.weight")  # every module has both
TUCKER = "lora_mid.weight"
# factor pairs whose shared axis is the rank: (tensor, its rank axis) x 2
RANK_PAIRS = ((("lora_down.weight", 0), ("lora_up.weight", 1)),)


def matches(parts: dict[str, torch.Tensor]) -> bool:
    return all(s in parts for s in TENSORS)


def rank_pairs(parts: dict[str, torch.Tensor]):
    return RANK_PAIRS


def rank(parts: dict[str, torch.Tensor]) -> int:
    return parts["lora_down.weight"].shape[0]


def update(parts: dict[str, torch.Tensor], weight_shape: torch.Size) -> torch.Tensor:
    """delta W unscaled (fp32), [out, in * k * k] or the Tucker form [out, in, k, k]."""
    down = parts["lora_down.weight"].float()
    up = parts["lora_up.weight"].float()
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise UserError(f"lora_up with a {tuple(up.shape[2:])} kernel is not supported (expected 1x1)")
    up = up.reshape(up.shape[0], -1)
    if TUCKER in parts:
        return tucker(parts[TUCKER], up.T, down.reshape(down.shape[0], -1))
    # [out, r] @ [r, in*k*k]; the 3x3 kernel rides along in the flattened input axis.
    return up @ down.reshape(down.shape[0], -1)


def factors(parts: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(up, down)] flattened to [out, r] @ [r, in * k * k]; Tucker: (up, mid x down)."""
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    up = up.reshape(up.shape[0], -1)
    if TUCKER in parts:
        return [tucker_pair(parts[TUCKER], up.T, down.reshape(down.shape[0], -1))]
    return [(up, down.reshape(down.shape[0], -1))]


def weight_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The base weight's shape, which a LoRA module carries: down [r, in, kh, kw] (Tucker: mid's kernel)."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if TUCKER in parts:
        return (up.shape[0], down.shape[1], *parts[TUCKER].shape[2:])
    return (up.shape[0], *down.shape[1:])


def fits(parts: dict[str, torch.Tensor], shape: torch.Size) -> bool | None:
    """Whether the module fits a base weight of `shape`, told from the factors' shapes alone
    (None for a Tucker module: its change must be formed)."""
    if TUCKER in parts:
        return None
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if up.shape[0] != shape[0] or down[0].numel() != shape.numel() // shape[0]:
        raise UserError(f"adapter shape up {tuple(up.shape)} / down {tuple(down.shape)} does not fit the base "
                        f"weight {tuple(shape)}: the adapter was trained for a different base model")
    return True


def with_alpha_one(parts: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The module rewritten with alpha = 1 and the same change: up' = scale * rank * up, so that
    (1 / rank) up' @ down = scale * up @ down.

    For diffusers' load_lora_weights: diffusers 0.42 keys the alphas of a Kohya file's attention
    modules by names its peft config never matches (`...processor.to_k_lora.down.weight`), so in a
    file whose modules' alphas differ (a resized file, peft's alpha_pattern) those modules get the
    most common alpha. With one alpha for all there is nothing to match.
    """
    up = parts["lora_up.weight"]
    factor = scale * rank(parts)
    return parts | {"lora_up.weight": (up.float() * factor).to(up.dtype), "alpha": torch.tensor(1.0)}


def peft_config(network_cfg, dim: int, alpha: float, paths: list[str], rank_pattern: dict, alpha_pattern: dict):
    from peft import LoraConfig

    return LoraConfig(r=dim, lora_alpha=alpha, target_modules=paths, rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, lora_dropout=network_cfg.dropout, init_lora_weights=True,
                      use_dora=network_cfg.dora)


def peft_tensors(layer, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The module's tensors in a peft LoRA layer, by file suffix (lora_A = down, lora_B = up)."""
    params = {"lora_down.weight": layer.lora_A[adapter].weight, "lora_up.weight": layer.lora_B[adapter].weight}
    if adapter in layer.lora_magnitude_vector:  # DoRA's m: [out] (Linear), [1, out, 1, 1] (conv)
        params["dora_scale"] = layer.lora_magnitude_vector[adapter].weight
    return params


def peft_alpha(layer, adapter: str) -> float:
    return float(layer.lora_alpha[adapter])


def file_factor(suffix: str, suffixes, scale: float) -> float:
    """What a peft tensor is multiplied by in the file: 1, peft's LoRA tensors are the file's."""
    return 1.0


def alpha_of(parts: dict[str, torch.Tensor]) -> float:
    """The module's alpha; a module without one loads as alpha = rank (scale 1), as every Kohya reader takes it."""
    return float(parts["alpha"]) if "alpha" in parts else float(rank(parts))


def stack_rows(parts: list[dict[str, torch.Tensor]], swap_halves: bool = False) -> dict[str, torch.Tensor] | None:
    """One module whose change is the parts' stacked, [dW_1; ...; dW_n] (rank r and scale alpha / r each):

        one down shared by the parts (kohya's own training):  down = A,              up = [B_1; ...; B_n],  alpha
        a down per part:                                      down = [A_1; ...; A_n],  up = blockdiag(B_j),  n alpha

    both exact: row block j of up @ down is B_j A_j, and n alpha / (n r) = alpha / r. swap_halves
    exchanges up's row halves after. None for Tucker modules (convs, never fused)."""
    if any(TUCKER in p for p in parts):
        return None
    scale = common_scale([alpha_of(p) / rank(p) for p in parts])
    downs, ups = [p["lora_down.weight"] for p in parts], [p["lora_up.weight"] for p in parts]
    if all(torch.equal(d, downs[0]) for d in downs[1:]):
        down, up = downs[0], torch.cat(ups)
    else:
        down, up = torch.cat(downs), torch.block_diag(*ups)
    if swap_halves:
        up = exchanged_halves(up)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(scale * down.shape[0])}


def split_rows(parts: dict[str, torch.Tensor], sizes: list[int], swap_halves: bool = False
               ) -> list[dict[str, torch.Tensor]]:
    """The parts (output sizes `sizes`) of a module their rows stack into, as diffusers'
    `_convert_kohya_flux_lora_to_diffusers` reads a fused module: when the rank divides by n and up is
    block-diagonal, down's n chunks with up's diagonal blocks (alpha / n each, the same scale);
    otherwise every part gets the whole down and its row block of up (alpha as it is)."""
    up = exchanged_halves(parts["lora_up.weight"]) if swap_halves else parts["lora_up.weight"]
    down, alpha = parts["lora_down.weight"], alpha_of(parts)
    diagonal = diagonal_blocks(up, sizes)
    if diagonal is not None:
        n = len(sizes)
        return [{"lora_down.weight": d, "lora_up.weight": u, "alpha": torch.tensor(alpha / n)}
                for d, u in zip(down.chunk(n), diagonal)]
    return [{"lora_down.weight": down, "lora_up.weight": u, "alpha": torch.tensor(alpha)} for u in up.split(sizes)]
