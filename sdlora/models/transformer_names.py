"""FLUX.1's and SD3.x's transformers in their originals' names (BFL's FLUX, Stability's MMDiT, the
names kohya, ComfyUI and Forge keep) <-> diffusers' modules, and original-layout checkpoints read
into diffusers' state dicts by the same map.

diffusers' modules differ from the originals' in two ways:

- fused projections: the original's one Linear is several diffusers Linears over the same input,
  whose outputs are its rows in order. FLUX double blocks' `img_attn.qkv` = [to_q; to_k; to_v]
  (3 x 3072 rows), single blocks' `linear1` = [to_q; to_k; to_v; proj_mlp] (3 x 3072 + 12288),
  SD3 `x_block.attn.qkv` = [to_q; to_k; to_v];
- (shift, scale): the originals' final adaLN modulation (and SD3's last context block's) emits
  (shift, scale), diffusers' `AdaLayerNormContinuous` (scale, shift): the rows' two halves exchanged.

Tensors that belong to no Linear (the qk RMS norms' scales, SD3's position table) are renamed one
to one (`TransformerNames.block_tensors`, `outer_tensors`). diffusers' own single-file converter
(`convert_flux_transformer_checkpoint_to_diffusers`) fixes FLUX's width at 3072; this map reads
the row sizes from the model, so it reads any width, the tiny test models' too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sdlora.kohya_names import FLUX_MODULATION_ARGS, SD3_MODULATION_ARGS

# Per block: {original path: diffusers paths whose outputs are its rows, in order}.
FLUX_DOUBLE = {
    "img_mod.lin": ("norm1.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),  # its input is cat(attention 3072, mlp 12288) in both
    "modulation.lin": ("norm.linear",),
}
FLUX_OUTER = {  # kohya's in_dims, and the final layer
    "img_in": ("x_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),  # dev only
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "txt_in": ("context_embedder",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
SD3_JOINT = {
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),  # not in the last block (context_pre_only)
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),  # nor its mlp
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5 Medium's MMDiT-X blocks
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
}
SD3_OUTER = {  # kohya's emb_dims
    "context_embedder": ("context_embedder",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "x_embedder.proj": ("pos_embed.proj",),  # a Conv2d
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
    "final_layer.linear": ("proj_out",),
}


@dataclass(frozen=True)
class TransformerNames:
    """How one family's transformer is named in the original: its block lists
    (original prefix, diffusers prefix, per-block table) and the modules outside them;
    `block_kinds` names each block list as kohya's train_blocks does ("double", "single"), and
    `modulation` holds the per-block paths of the modulation linears (kohya's *_mod_dim)."""

    blocks: tuple[tuple[str, str, dict[str, tuple[str, ...]]], ...]
    outer: dict[str, tuple[str, ...]]
    block_kinds: tuple[str, ...] = ()
    modulation: frozenset[str] = frozenset()
    modulation_args: tuple[str, ...] = ()  # kohya's network_args whose 0s drop `modulation`
    # Tensors of no Linear: {original block list: {name in a block: diffusers name}}, and outside the blocks.
    block_tensors: dict[str, dict[str, str]] = field(default_factory=dict)
    outer_tensors: dict[str, str] = field(default_factory=dict)


# The qk RMS norms' scales (BFL's QKNorm; Stability's ln_q / ln_k).
FLUX_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                     "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                     "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                     "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
FLUX_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
SD3_JOINT_NORMS = {"x_block.attn.ln_q.weight": "attn.norm_q.weight", "x_block.attn.ln_k.weight": "attn.norm_k.weight",
                   "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
                   "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
                   "x_block.attn2.ln_q.weight": "attn2.norm_q.weight", "x_block.attn2.ln_k.weight": "attn2.norm_k.weight"}

FLUX_NAMES = TransformerNames((("double_blocks", "transformer_blocks", FLUX_DOUBLE),
                               ("single_blocks", "single_transformer_blocks", FLUX_SINGLE)), FLUX_OUTER,
                              ("double", "single"), frozenset({"img_mod.lin", "txt_mod.lin", "modulation.lin"}),
                              FLUX_MODULATION_ARGS,
                              block_tensors={"double_blocks": FLUX_DOUBLE_NORMS, "single_blocks": FLUX_SINGLE_NORMS})
SD3_NAMES = TransformerNames((("joint_blocks", "transformer_blocks", SD3_JOINT),), SD3_OUTER, ("joint",),
                             frozenset({"context_block.adaLN_modulation.1", "x_block.adaLN_modulation.1"}),
                             SD3_MODULATION_ARGS, block_tensors={"joint_blocks": SD3_JOINT_NORMS},
                             outer_tensors={"pos_embed": "pos_embed.pos_embed"})


# The transformers named as in their originals, by diffusers class.
NAMES_BY_CLASS = {"FluxTransformer2DModel": FLUX_NAMES, "SD3Transformer2DModel": SD3_NAMES}


@dataclass(frozen=True)
class OriginalModule:
    """One module of the original model and the diffusers modules it covers."""

    original: str  # its path in the original model: double_blocks.0.img_attn.qkv
    paths: tuple[str, ...]  # diffusers module paths; their outputs are its rows, in order
    swap_halves: bool = False  # rows (shift, scale) in the original, (scale, shift) in diffusers


def original_modules(transformer: nn.Module, names: TransformerNames, outer: bool = False) -> list[OriginalModule]:
    """The original's block Linears (kohya's default targets) in the original model's order; with `outer`,
    also the embedders and the final layer. A module missing from the model (the last SD3 block's context
    projection, attn2 outside MMDiT-X blocks, schnell's guidance) is left out."""
    modules = dict(transformer.named_modules())
    found = []

    def add(original: str, paths: tuple[str, ...]) -> None:
        if all(p in modules for p in paths):
            # AdaLayerNormContinuous's linear emits (scale, shift); the originals' modulation (shift, scale).
            swap = type(modules[paths[0].rsplit(".", 1)[0]]).__name__ == "AdaLayerNormContinuous"
            found.append(OriginalModule(original, paths, swap))

    for original, ours, table in names.blocks:
        for i in range(len(getattr(transformer, ours))):
            for path, parts in table.items():
                add(f"{original}.{i}.{path}", tuple(f"{ours}.{i}.{p}" for p in parts))
    if outer:
        for path, parts in names.outer.items():
            add(path, parts)
    return found


def exchanged_halves(rows: torch.Tensor) -> torch.Tensor:
    """The two halves of the rows exchanged: the originals' (shift, scale) <-> diffusers' (scale, shift)."""
    half = rows.shape[0] // 2
    return torch.cat([rows[half:], rows[:half]])


def _tensor_renames(transformer: nn.Module, names: TransformerNames) -> dict[str, str]:
    """{original name: diffusers name} of the tensors of no Linear (`block_tensors`, `outer_tensors`)."""
    renames = dict(names.outer_tensors)
    for original, ours, _ in names.blocks:
        for i in range(len(getattr(transformer, ours))):
            renames.update({f"{original}.{i}.{k}": f"{ours}.{i}.{v}"
                            for k, v in names.block_tensors.get(original, {}).items()})
    return renames


def state_from_original(state: dict, transformer: nn.Module, names: TransformerNames) -> dict:
    """A diffusers state dict of `transformer` (meta weights are enough: only names and sizes are read)
    from an original-layout checkpoint's tensors (its prefix removed). Fused rows are cut at the diffusers
    Linears' out_features, (shift, scale) halves exchanged. Tensors the map has no name for stay under
    their original names, for the caller to report."""
    state = dict(state)
    out = {}
    for module in original_modules(transformer, names, outer=True):
        for tensor in ("weight", "bias"):
            rows = state.pop(f"{module.original}.{tensor}", None)
            if rows is None:
                continue
            if module.swap_halves:
                rows = exchanged_halves(rows)
            sizes = ([transformer.get_submodule(p).out_features for p in module.paths] if len(module.paths) > 1
                     else [rows.shape[0]])
            out.update({f"{path}.{tensor}": part for path, part in zip(module.paths, rows.split(sizes))})
    renames = _tensor_renames(transformer, names)
    out.update({renames[k]: state.pop(k) for k in list(state) if k in renames})
    return out | state


def state_to_original(state: dict, transformer: nn.Module, names: TransformerNames) -> dict:
    """The inverse of `state_from_original`: a diffusers state dict of `transformer` in the original's names
    (rows stacked, halves exchanged), as BFL / Stability checkpoints hold it."""
    state = dict(state)
    out = {}
    for module in original_modules(transformer, names, outer=True):
        for tensor in ("weight", "bias"):
            keys = [f"{p}.{tensor}" for p in module.paths]
            if all(k in state for k in keys):
                rows = torch.cat([state.pop(k) for k in keys])
                out[f"{module.original}.{tensor}"] = exchanged_halves(rows) if module.swap_halves else rows
    renames = {v: k for k, v in _tensor_renames(transformer, names).items()}
    out.update({renames[k]: state.pop(k) for k in list(state) if k in renames})
    return out | state
