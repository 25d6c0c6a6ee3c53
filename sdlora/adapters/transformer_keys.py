"""Kohya key names of FLUX.1 and SD3.x adapters <-> diffusers' transformer modules, and LoRA
factors of fused modules written from (and read into) their diffusers parts.

sd-scripts (`networks/lora_flux.py`, `networks/lora_sd3.py`) names a module by its path in the
original model (BFL's FLUX, Stability's MMDiT), "." -> "_", after `lora_unet_`; ComfyUI and Forge
keep the originals' module tree and read those names. diffusers' modules differ in two ways:

- fused projections: the original's one Linear is several diffusers Linears over the same input,
  whose outputs are its rows in order. FLUX double blocks' `img_attn.qkv` = [to_q; to_k; to_v]
  (3 x 3072 rows), single blocks' `linear1` = [to_q; to_k; to_v; proj_mlp] (3 x 3072 + 12288),
  SD3 `x_block.attn.qkv` = [to_q; to_k; to_v];
- (shift, scale): the originals' final adaLN modulation (and SD3's last context block's) emits
  (shift, scale), diffusers' `AdaLayerNormContinuous` (scale, shift): the rows' two halves exchanged.

The same map lays out an original checkpoint's Linear weights from diffusers' (rows stacked,
halves exchanged), as diffusers' single-file converter reads them back.

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

from sdlora.adapters import kinds
from sdlora.models.families.clip import nested_text_name

UNET_PREFIX = "lora_unet"
# Kohya's text-encoder prefixes for these families (ComfyUI's too): T5 is te3 with or without CLIP-G.
TEXT_PREFIXES = {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5": "lora_te3"}

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
    (original prefix, diffusers prefix, per-block table) and the modules outside them."""

    blocks: tuple[tuple[str, str, dict[str, tuple[str, ...]]], ...]
    outer: dict[str, tuple[str, ...]]


FLUX_NAMES = TransformerNames((("double_blocks", "transformer_blocks", FLUX_DOUBLE),
                               ("single_blocks", "single_transformer_blocks", FLUX_SINGLE)), FLUX_OUTER)
SD3_NAMES = TransformerNames((("joint_blocks", "transformer_blocks", SD3_JOINT),), SD3_OUTER)


# The transformers named as in their originals, by diffusers class.
NAMES_BY_CLASS = {"FluxTransformer2DModel": FLUX_NAMES, "SD3Transformer2DModel": SD3_NAMES}


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
    modules = dict(transformer.named_modules())
    found: dict[str, KohyaModule] = {}

    def add(original: str, paths: tuple[str, ...]) -> None:
        if not all(p in modules for p in paths):
            return
        # AdaLayerNormContinuous's linear emits (scale, shift); the originals' modulation (shift, scale).
        swap = type(modules[paths[0].rsplit(".", 1)[0]]).__name__ == "AdaLayerNormContinuous"
        key = f"{UNET_PREFIX}_{original.replace('.', '_')}"
        found[key] = KohyaModule(key, original, paths, swap)

    for original, ours, table in names.blocks:
        for i in range(len(getattr(transformer, ours))):
            for path, parts in table.items():
                add(f"{original}.{i}.{path}", tuple(f"{ours}.{i}.{p}" for p in parts))
    if outer:
        for path, parts in names.outer.items():
            add(path, parts)
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


def exchange_halves(up: torch.Tensor) -> torch.Tensor:
    """Rows (a; b) -> (b; a): a modulation's (shift, scale) in the original <-> (scale, shift) in diffusers."""
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
        fused.up = exchange_halves(fused.up)
    return fused


def split(fused: LoraFactors, sizes: list[int], swap_halves: bool = False) -> list[LoraFactors]:
    """The diffusers parts' factors (output sizes `sizes`) from a Kohya module's, as diffusers reads them."""
    up = exchange_halves(fused.up) if swap_halves else fused.up
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
        fused.up = exchange_halves(up) if module.swap_halves else up
        for k in present:
            del out[k]
        out[name] = {"lora_down.weight": fused.down, "lora_up.weight": fused.up, "alpha": torch.tensor(fused.alpha)}
    return out
