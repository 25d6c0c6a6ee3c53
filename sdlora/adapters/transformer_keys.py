"""Kohya key names of FLUX.1 and SD3.x adapters <-> diffusers' transformer modules, and LoRA
factors of fused modules written from (and read into) their diffusers parts.

sd-scripts (`networks/lora_flux.py`, `networks/lora_sd3.py`) names a module by its path in the
original model (BFL's FLUX, Stability's MMDiT), "." -> "_", after `lora_unet_`; ComfyUI and Forge
keep the originals' module tree and read those names. How the originals' modules map onto diffusers'
(fused projections, exchanged (shift, scale) halves) is `models/transformer_names.py`, which also
reads original-layout checkpoints by the same map.

Kohya's default targets are every Linear in FLUX's DoubleStreamBlock / SingleStreamBlock (19 x 10 +
38 x 3 = 304 modules on FLUX.1) and in SD3's joint blocks (x_block and context_block); the
embedders and the final layer are opt-in (kohya's `in_dims` / `emb_dims`). Text encoders:
`lora_te1_` CLIP-L, `lora_te2_` CLIP-G (SD3), `lora_te3_` T5-XXL, paths as transformers 4 names them.

LoRA on a fused module, with rank r and scale alpha / r (delta W = scale up @ down), from its n parts:

    one down shared by the parts (kohya's own training):   down = A,          up = [B_1; ...; B_n],   alpha
    a down per part (rank r each):                         down = [A_1; ...; A_n] (rank n r),
                                                           up = blockdiag(B_1, ..., B_n),          n alpha

both exact: row block j of up @ down is B_j A_j, and n alpha / (n r) = alpha / r. Reading a fused
module back follows diffusers' `_convert_kohya_flux_lora_to_diffusers`: when r divides by n and up's
off-diagonal blocks are all zero, down is cut into n pieces of rank r / n (alpha / n each, the same
scale); otherwise every part gets the whole down, and up's row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sdlora.models.families.clip import nested_text_name
from sdlora.models.transformer_names import (  # noqa: F401 - FLUX_NAMES, SD3_NAMES: re-exported for the adapters
    FLUX_NAMES,
    NAMES_BY_CLASS,
    SD3_NAMES,
    TransformerNames,
    original_modules,
)

UNET_PREFIX = "lora_unet"
# Kohya's text-encoder prefixes for these families (ComfyUI's too): T5 is te3 with or without CLIP-G.
TEXT_PREFIXES = {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5": "lora_te3"}


def names_of(denoiser: nn.Module) -> TransformerNames | None:
    """How a denoiser's Kohya names read (FLUX.1's, SD3's), or None: named by its diffusers paths (U-Nets)."""
    from accelerate.utils import extract_model_from_parallel

    return NAMES_BY_CLASS.get(type(extract_model_from_parallel(denoiser)).__name__)


@dataclass(frozen=True)
class KohyaModule:
    """One module of a Kohya file and the diffusers modules it covers."""

    key: str  # lora_unet_double_blocks_0_img_attn_qkv
    original: str  # its path in the original model: double_blocks.0.img_attn.qkv
    paths: tuple[str, ...]  # diffusers module paths; their outputs are the key's rows, in order
    swap_halves: bool = False  # rows (shift, scale) in the original, (scale, shift) in diffusers


def kohya_modules(transformer: nn.Module, names: TransformerNames, outer: bool = False) -> dict[str, KohyaModule]:
    """{kohya key: KohyaModule} of the transformer's blocks (kohya's default targets) in the order kohya
    creates them (the original model's); with `outer`, also the embedders and the final layer. A module
    missing from the model (the last SD3 block's context projection, attn2 outside MMDiT-X blocks,
    schnell's guidance) has no key."""
    found = {}
    for module in original_modules(transformer, names, outer):
        key = f"{UNET_PREFIX}_{module.original.replace('.', '_')}"
        found[key] = KohyaModule(key, module.original, module.paths, module.swap_halves)
    return found


def text_kohya_key(encoder: str, module_path: str) -> str:
    """A text encoder's module path -> its Kohya key: `encoder.layers.0.mlp.fc1` of CLIP-L ->
    `lora_te1_text_model_encoder_layers_0_mlp_fc1`; `encoder.block.0.layer.0.SelfAttention.q` of T5 ->
    `lora_te3_encoder_block_0_layer_0_SelfAttention_q` (T5 has no transformers-4 nesting)."""
    path = module_path if encoder == "t5" else nested_text_name(module_path)
    return f"{TEXT_PREFIXES[encoder]}_{path.replace('.', '_')}"


# ---------------------------------------------------------------------------------------------
# LoRA factors of fused modules


@dataclass
class LoraFactors:
    """delta W = alpha / rank * up @ down, down (rank, in), up (out, rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def fuse(parts: list[LoraFactors], swap_halves: bool = False) -> LoraFactors:
    """The Kohya module's factors from its diffusers parts' (see the module docstring)."""
    first = parts[0]
    if any(p.alpha / p.down.shape[0] != first.alpha / first.down.shape[0] for p in parts):
        raise ValueError("the parts of a fused module need one scale (alpha / rank)")
    if all(torch.equal(p.down, first.down) for p in parts[1:]):
        fused = LoraFactors(first.down, torch.cat([p.up for p in parts]), first.alpha)
    else:
        fused = LoraFactors(torch.cat([p.down for p in parts]), torch.block_diag(*(p.up for p in parts)),
                            sum(p.alpha for p in parts))
    if swap_halves:
        fused.up = _swap_halves(fused.up)
    return fused


def split(fused: LoraFactors, sizes: list[int], swap_halves: bool = False) -> list[LoraFactors]:
    """The diffusers parts' factors (output sizes `sizes`) from a Kohya module's, as diffusers reads them."""
    up = _swap_halves(fused.up) if swap_halves else fused.up
    n, rank = len(sizes), fused.down.shape[0]
    if n > 1 and rank % n == 0:
        r = rank // n
        blocks = [rows.split(r, dim=1) for rows in up.split(sizes)]  # blocks[j][k]: rows of part j, ranks k
        if all(not blocks[j][k].any() for j in range(n) for k in range(n) if j != k):
            return [LoraFactors(down, blocks[j][j], fused.alpha / n) for j, down in enumerate(fused.down.chunk(n))]
    return [LoraFactors(fused.down, rows, fused.alpha) for rows in up.split(sizes)]


def output_sizes(transformer: nn.Module, module: KohyaModule) -> list[int]:
    """Each diffusers part's output features: the row sizes of the fused module."""
    return [transformer.get_submodule(p).out_features for p in module.paths]


def split_modules(transformer: nn.Module, originals: dict[str, KohyaModule],
                  modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya key: tensors} of a file named as the transformer's original -> the same LoRA on diffusers'
    modules, each part under its diffusers path's key (`lora_unet_transformer_blocks_0_attn_to_q`) with
    `split`'s factors; modules that are no LoRA of an original module (text encoders) stay as they are.
    A module without alpha has alpha = rank (scale 1), as every Kohya reader takes it."""
    out = {}
    for name, parts in modules.items():
        module = originals.get(name)
        if module is None or not {"lora_down.weight", "lora_up.weight", "alpha"} >= set(parts):
            out[name] = parts
            continue
        down = parts["lora_down.weight"]
        fused = LoraFactors(down, parts["lora_up.weight"], float(parts.get("alpha", down.shape[0])))
        for path, factors in zip(module.paths, split(fused, output_sizes(transformer, module), module.swap_halves)):
            out[f"{UNET_PREFIX}_{path.replace('.', '_')}"] = {"lora_down.weight": factors.down,
                                                              "lora_up.weight": factors.up,
                                                              "alpha": torch.tensor(factors.alpha)}
    return out
