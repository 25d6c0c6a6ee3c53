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
scale); otherwise every part gets the whole down, and up's row blocks. LoHa stacks exactly too
(its output-side factors block-diagonal, rank n r, alpha n alpha) and DoRA's per-row magnitudes
concatenate (`kinds.stack_rows`); LoKr cannot (rows of Kronecker products stacked are no Kronecker
product), so a LoKr on a fused module is written per diffusers part under ComfyUI's
`lora_transformer_<diffusers path>` names, which ComfyUI applies to the part's rows of the fused weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sdlora.adapters import kinds
from sdlora.adapters.kinds.rows import exchanged_halves
from sdlora.errors import UserError
from sdlora.kohya_blocks import block_selection
from sdlora.models.families.clip import nested_text_name
from sdlora.models.transformer_names import (  # noqa: F401 - FLUX_NAMES, SD3_NAMES: re-exported for the adapters
    FLUX_NAMES,
    NAMES_BY_CLASS,
    SD3_NAMES,
    TransformerNames,
    original_modules,
)

UNET_PREFIX = "lora_unet"
# ComfyUI's (OneTrainer's) prefix for a transformer's diffusers module paths: `lora_transformer_` + the
# path, "." -> "_"; read as UNET_PREFIX + the same (`keys.denoiser_key`), the key of that diffusers module here.
DIFFUSERS_PART_PREFIX = "lora_transformer"
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


def block_indices(network_cfg) -> dict[str, tuple[str, str]]:
    """{block kind: ([network] field, kohya's selection string)}: the blocks of each kind chosen by index
    (kohya's lora_flux network_args train_double_block_indices, train_single_block_indices; lora_sd3's
    train_block_indices over SD3's joint blocks)."""
    return {"double": ("train_double_block_indices", network_cfg.train_double_block_indices),
            "single": ("train_single_block_indices", network_cfg.train_single_block_indices),
            "joint": ("train_block_indices", network_cfg.train_block_indices)}


def selects_blocks(network_cfg) -> bool:
    """Whether [network] narrows the transformer blocks' targets (train_blocks, train_*_block_indices,
    train_modulation), which a U-Net has no use for."""
    return (network_cfg.train_blocks != "all" or not network_cfg.train_modulation
            or any(value.strip() != "all" for _, value in block_indices(network_cfg).values()))


def unselected_paths(transformer: nn.Module, names: TransformerNames, network_cfg) -> set[str]:
    """The diffusers module paths inside the transformer's blocks that [network] leaves out, as kohya's
    lora_flux does: a block of a kind other than train_blocks, or whose index the kind's
    train_*_block_indices does not name, loses all its modules (kohya: dim 0); with train_modulation
    false every block loses its modulation linears (kohya's img_mod_dim = txt_mod_dim = single_mod_dim = 0).
    Indices are bounded by the model's own block counts (FLUX.1: 19 double, 38 single; SD3.5 Large 38
    joint, Medium 24), where lora_sd3 parses train_block_indices against 999 and ignores indices past the
    model's blocks: a wrong index is refused here, not dropped silently. lora_sd3 selects as lora_flux does
    (a joint block left out loses all its modules; context_mod_dim = x_mod_dim = 0 drop adaLN_modulation)."""
    model = type(transformer).__name__
    if network_cfg.train_blocks not in ("all", *names.block_kinds):
        raise UserError(f"[network] train_blocks = {network_cfg.train_blocks!r}: {model} has no such blocks (it has "
                        f"{', '.join(names.block_kinds)}); use \"all\"")
    indices = block_indices(network_cfg)
    for kind, (field_name, value) in indices.items():
        if kind not in names.block_kinds and block_selection(value, f"[network] {field_name}") is not None:
            raise UserError(f"[network] {field_name} = {value!r}: {model} has no {kind} blocks; leave it \"all\"")
    left_out: set[str] = set()
    for kind, (_, ours, table) in zip(names.block_kinds, names.blocks):
        count = len(getattr(transformer, ours))
        field_name, value = indices.get(kind, ("", "all"))
        chosen = block_selection(value, f"[network] {field_name}", count)
        for i in range(count):
            whole = network_cfg.train_blocks not in ("all", kind) or (chosen is not None and i not in chosen)
            for path, parts in table.items():
                if whole or (not network_cfg.train_modulation and path in names.modulation):
                    left_out.update(f"{ours}.{i}.{p}" for p in parts)
    return left_out


def text_kohya_key(encoder: str, module_path: str) -> str:
    """A text encoder's module path -> its Kohya key: `encoder.layers.0.mlp.fc1` of CLIP-L ->
    `lora_te1_text_model_encoder_layers_0_mlp_fc1`; `encoder.block.0.layer.0.SelfAttention.q` of T5 ->
    `lora_te3_encoder_block_0_layer_0_SelfAttention_q` (T5 has no transformers-4 nesting)."""
    path = module_path if encoder == "t5" else nested_text_name(module_path)
    return f"{TEXT_PREFIXES[encoder]}_{path.replace('.', '_')}"


# ---------------------------------------------------------------------------------------------
# Adapters of fused modules: one module under the original's name where the kind stacks rows exactly
# (`kinds.stack_rows`: LoRA, LoHa, DoRA), else one per diffusers part


@dataclass
class LoraFactors:
    """delta W = alpha / rank * up @ down, down (rank, in), up (out, rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up, "alpha": torch.tensor(self.alpha)}

    @classmethod
    def of(cls, parts: dict[str, torch.Tensor]) -> "LoraFactors":
        return cls(parts["lora_down.weight"], parts["lora_up.weight"], kinds.lora.alpha_of(parts))


def fuse(parts: list[LoraFactors], swap_halves: bool = False) -> LoraFactors:
    """The Kohya module's LoRA factors from its diffusers parts' (`kinds.lora.stack_rows`)."""
    return LoraFactors.of(kinds.lora.stack_rows([p.tensors() for p in parts], swap_halves))


def split(fused: LoraFactors, sizes: list[int], swap_halves: bool = False) -> list[LoraFactors]:
    """The diffusers parts' LoRA factors (output sizes `sizes`) from a Kohya module's, as diffusers reads
    them (`kinds.lora.split_rows`)."""
    return [LoraFactors.of(p) for p in kinds.lora.split_rows(fused.tensors(), sizes, swap_halves)]


def output_sizes(transformer: nn.Module, module: KohyaModule) -> list[int]:
    """Each diffusers part's output features: the row sizes of the fused module."""
    return [transformer.get_submodule(p).out_features for p in module.paths]


def part_key(path: str) -> str:
    """The key of a diffusers module of the transformer: `lora_unet_transformer_blocks_0_attn_to_q`."""
    return f"{UNET_PREFIX}_{path.replace('.', '_')}"


def export_modules(module: KohyaModule, parts: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """{key: tensors} of one original module adapted on its diffusers parts: the stacked module under
    kohya's name where the kind stacks exactly (`kinds.stack_rows`); otherwise (LoKr on qkv / linear1)
    each part under ComfyUI's name for that diffusers module, `lora_transformer_<path>`, which ComfyUI's
    `model_lora_keys_unet` maps onto the part's rows of the fused weight (comfy/utils.py
    `flux_to_diffusers`: (dim 0, offset, size)) and `keys.denoiser_key` maps back here."""
    stacked = kinds.stack_rows(parts, module.swap_halves)
    if stacked is not None:
        return {module.key: stacked}
    return {f"{DIFFUSERS_PART_PREFIX}_{path.replace('.', '_')}": p for path, p in zip(module.paths, parts)}


def split_modules(transformer: nn.Module, originals: dict[str, KohyaModule],
                  modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya key: tensors} of a file named as the transformer's original -> the same adapters on diffusers'
    modules, each part under its diffusers path's key (`part_key`) with `kinds.split_rows`' tensors;
    modules that are no adapter of an original module (text encoders, parts already) stay as they are."""
    out = {}
    for name, parts in modules.items():
        module = originals.get(name)
        if module is None:
            out[name] = parts
            continue
        try:
            pieces = kinds.split_rows(parts, output_sizes(transformer, module), module.swap_halves)
        except UserError as e:
            raise UserError(f"{name}: {e}") from None
        out |= {part_key(path): piece for path, piece in zip(module.paths, pieces)}
    return out


def fuse_modules(transformer: nn.Module, originals: dict[str, KohyaModule],
                 modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of `split_modules`: LoRA modules on diffusers' modules (keys of their diffusers paths,
    `lora_unet_transformer_blocks_0_attn_to_q`, as diffusers, OneTrainer or ai-toolkit files name them) ->
    one module per original module under Kohya's name, `fuse`d from its parts. A part the file does not
    adapt (diffusers' default targets leave out single blocks' proj_mlp) contributes zero rows of up: the
    fused weight change is exactly the parts' stacked. Other modules (text encoders, original names) stay."""
    out = dict(modules)
    for name, module in originals.items():
        part_keys = [f"{UNET_PREFIX}_{path.replace('.', '_')}" for path in module.paths]
        present = [k for k in part_keys if k in modules]
        if not present or not all(kinds.is_plain_lora(modules[k]) for k in present):
            continue  # nothing of it, or not a plain LoRA: left under the diffusers names
        parts = []
        for k in present:
            down = modules[k]["lora_down.weight"]
            parts.append(LoraFactors(down, modules[k]["lora_up.weight"], float(modules[k].get("alpha", down.shape[0]))))
        # One scale for all parts (`fuse`): each part's scale is moved into its down where they differ.
        scales = [p.alpha / p.down.shape[0] for p in parts]
        if len(set(scales)) > 1:
            parts = [LoraFactors(p.down * s, p.up, float(p.down.shape[0])) for p, s in zip(parts, scales)]
        fused = fuse(parts)
        sizes = output_sizes(transformer, module)
        rows = dict(zip(present, fused.up.split([sizes[part_keys.index(k)] for k in present])))
        up = torch.cat([rows[k] if k in rows else fused.up.new_zeros(size, fused.up.shape[1])
                        for k, size in zip(part_keys, sizes)])
        fused.up = exchanged_halves(up) if module.swap_halves else up
        for k in present:
            del out[k]
        out[name] = {"lora_down.weight": fused.down, "lora_up.weight": fused.up, "alpha": torch.tensor(fused.alpha)}
    return out
