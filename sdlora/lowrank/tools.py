"""Low-rank tools on Kohya-format adapter files: resize, extract, merge.

The maths (energy, ranks, the SVD from the factors) is `svd.py`'s; `inspect.py` reports spectra.

resize  W = up @ down (unscaled: the scale alpha / rank stays outside), truncated SVD,
        up = U_k S_k, down = Vh_k, new_alpha = scale * new_rank, so scale * up @ down keeps
        its meaning. LoHa, LoKr and Tucker modules are written as plain LoRA. A DoRA module
        keeps its magnitude (dora_scale): only delta W inside W' = m (W0 + delta W) / ||.|| is
        resized, so the output is DoRA too and says so.
extract delta = W_tuned - W_base per module, truncated SVD, alpha = rank (scale 1).
merge   W_base += multiplier * kinds.module_delta (DoRA: from W_base), one layer at a time in the
        weight's own dtype (`adapters.apply`), saved as a checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.adapters import apply, keys, kinds, transformer_keys
from sdlora.adapters.file import diffusers_names_of, read_adapter, save_adapter
from sdlora.adapters.kinds.rows import exchanged_halves
from sdlora.adapters.network import (
    network_fields,
    network_metadata,
    one_or_dynamic,
    text_encoder_target_paths,
    unet_target_paths,
)
from sdlora.config import ModelConfig
from sdlora.errors import UserError
from sdlora.io import refuse_to_overwrite
from sdlora.lowrank.svd import (
    choose_rank,
    clamp_quantile,
    energy_kept,
    factors_in_shape,
    module_spectrum,
    relative_error,
    truncate,
)
from sdlora.models.checkpoint import save_diffusers, save_single_file
from sdlora.models.families import FAMILIES, by_base_model_version
from sdlora.models.load import load_base, stored_dtypes

# Names of 3x3 convs in diffusers' U-Net (ResNet blocks, down/upsamplers, stem and head).
_SPATIAL_CONV_ENDINGS = ("_conv1", "_conv2", "_conv", "_conv_in", "_conv_out")
# 1x1 convs of SD1.x (Linear in SD2.x / SDXL) and of every ResNet shortcut.
_SD1_POINTWISE_CONV_ENDINGS = ("_proj_in", "_proj_out")


# ---------------------------------------------------------------------------------------------
# resize


@dataclass
class ModuleResize:
    key: str
    kind: str
    old_rank: int
    new_rank: int
    energy_kept: float
    relative_error: float
    converted: bool = False  # a LoHa, LoKr or Tucker module, written as a plain LoRA
    dora: bool = False  # its DoRA magnitude kept as it is


@dataclass
class ResizeReport:
    source: str
    output: str
    modules: list[ModuleResize]
    size_before: int
    size_after: int
    seconds: float

    def table(self) -> str:
        width = max([len(m.key) for m in self.modules] + [6])
        lines = [f"{'module':<{width}}  old  new  energy  rel.error"]
        for m in self.modules:
            lines.append(f"{m.key:<{width}}  {m.old_rank:>3}  {m.new_rank:>3}  {m.energy_kept:6.2%}  "
                         f"{m.relative_error:9.4f}")
        ranks = [m.new_rank for m in self.modules]
        lines.append(f"{len(self.modules)} modules, new ranks {min(ranks)}..{max(ranks)}; "
                     f"{_size(self.size_before)} -> {_size(self.size_after)} ({self.output})")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _module_weight_shape(key: str, parts: dict[str, torch.Tensor], conv_proj: bool) -> tuple[int, ...]:
    """The base weight's shape as far as the adapter tells it.

    LoRA modules, Tucker cores and a full 4-d lokr_w2 carry it (`kinds.stated_weight_shape`).
    Otherwise LoHa and LoKr store [r, in * kh * kw], so the kernel comes from the diffusers layer
    name: 3x3 for the U-Net's ResNet and sampler convs, 1x1 conv for ResNet shortcuts and, where the
    family has them as convs (`conv_proj`: SD1.x), proj_in / proj_out.
    """
    stated = kinds.stated_weight_shape(parts)
    if stated is not None:
        return stated
    pairs = kinds.factored_update(parts)
    out, cols = math.prod(a.shape[0] for a, _ in pairs), math.prod(b.shape[1] for _, b in pairs)
    unet = keys.part_of(key) == "unet"
    if unet and key.endswith(_SPATIAL_CONV_ENDINGS) and cols % 9 == 0:
        return (out, cols // 9, 3, 3)
    if unet and (key.endswith("_conv_shortcut") or (conv_proj and key.endswith(_SD1_POINTWISE_CONV_ENDINGS))):
        return (out, cols, 1, 1)
    return (out, cols)


def resize_tensors(tensors: dict[str, torch.Tensor], rank: int | None = None, energy: float | None = None,
                   max_rank: int | None = None, conv_proj: bool = True,
                   dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[ModuleResize]]:
    """Resize every module of a Kohya state dict; return (new tensors, per-module records)."""
    if (rank is None) == (energy is None):
        raise UserError("resize: give exactly one of --rank R or --energy BETA")
    out: dict[str, torch.Tensor] = {}
    records = []
    for key, parts in keys.group_modules(tensors).items():
        kind = kinds.module_variant(parts)
        scale = kinds.module_scale(parts)
        shape = _module_weight_shape(key, parts, conv_proj)
        S, top = module_spectrum(parts)
        old_rank = kinds.module_rank(parts) or S.numel()
        k = choose_rank(S, rank, energy, max_rank)
        up, down = top(k)
        save_dtype = dtype or next(t.dtype for name, t in parts.items() if name not in ("alpha", "dora_scale"))
        up, down = factors_in_shape(up, down, shape)
        out[f"{key}.lora_down.weight"] = down.to(save_dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(save_dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(scale * k, dtype=save_dtype)
        if "dora_scale" in parts:  # the magnitude is kept as it is: the output is DoRA too
            out[f"{key}.dora_scale"] = parts["dora_scale"]
        converted = kinds.kind_of(parts) is not kinds.lora or kinds.has_tucker(parts)
        records.append(ModuleResize(key, kind, old_rank, k, energy_kept(S, k), relative_error(S, k), converted,
                                    kinds.has_dora(parts)))
    return out, records


def resize(src, dst, rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
           overwrite: bool = False) -> ResizeReport:
    """Resize the adapter file `src` into `dst` (a LoRA file whatever the input: LoHa becomes LoRA)."""
    src, dst = Path(src), Path(dst)
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UserError(f"resize: --energy {energy} must be in (0, 1], e.g. 0.9 keeps 90% of the squared "
                        f"singular values")
    if rank is not None and rank < 1:
        raise UserError(f"resize: --rank {rank} must be at least 1")
    refuse_to_overwrite(dst, overwrite)
    start = time.perf_counter()
    tensors, metadata = read_adapter(src)
    family = by_base_model_version(metadata.get("ss_base_model_version", "sd_v1"))
    new, records = resize_tensors(tensors, rank, energy, max_rank, conv_proj=family is not None and family.conv_proj)
    metadata = _resized_metadata(metadata, records, rank, energy, max_rank, src)
    names = diffusers_names_of(src)
    if names and not any(r.dora for r in records):  # a diffusers-style file stays one ([output] format)
        new = keys.named_as_diffusers(keys.group_modules(new), names)
    save_adapter(dst, new, metadata, overwrite=overwrite)
    return ResizeReport(str(src), str(dst), records, src.stat().st_size, dst.stat().st_size,
                        time.perf_counter() - start)


def _resized_metadata(metadata: dict[str, str], records: list[ModuleResize], rank, energy, max_rank,
                      src: Path) -> dict[str, str]:
    source_hash = metadata.get("sshs_model_hash")
    metadata = {k: v for k, v in metadata.items() if k != "sshs_model_hash"}  # save_adapter writes the new one
    ranks = sorted({r.new_rank for r in records})
    # scale = alpha / rank is unchanged per module; ss_network_alpha states it at the new dim.
    old_dim, old_alpha = _float_or_none(metadata.get("ss_network_dim")), _float_or_none(metadata.get("ss_network_alpha"))
    alpha = metadata.get("ss_network_alpha")  # kept when the old scale is unknown
    if len(ranks) > 1:
        alpha = "dynamic"
    elif old_alpha is not None and old_dim:
        alpha = f"{old_alpha / old_dim * ranks[0]:g}"
    dora = any(r.dora for r in records)
    fields = network_fields(one_or_dynamic(ranks), alpha, dora=dora)
    metadata["ss_network_dim"] = fields["ss_network_dim"]
    if alpha is not None:
        metadata["ss_network_alpha"] = alpha
    if any(r.converted for r in records):  # a plain LoRA now
        metadata["ss_network_module"] = fields["ss_network_module"]
        metadata["ss_network_args"] = fields["ss_network_args"]
        if "modelspec.architecture" in metadata:
            metadata["modelspec.architecture"] = metadata["modelspec.architecture"].split("/")[0] + "/lora"
    elif not dora and "dora_wd" in metadata.get("ss_network_args", ""):
        args = json.loads(metadata["ss_network_args"])  # never claim a DoRA that is not in the file
        args.pop("dora_wd", None)
        metadata["ss_network_args"] = json.dumps(args)
    record = {"method": "rank" if rank is not None else "energy", "rank": rank, "energy": energy,
              "max_rank": max_rank, "source": src.name, "source_hash": source_hash,
              "ranks": {r.key: r.new_rank for r in records}}
    metadata["sdlora_resize"] = json.dumps(record)
    rule = f"rank {rank}" if rank is not None else f"energy {energy}"
    metadata["ss_training_comment"] = (metadata.get("ss_training_comment", "") +
                                       f" [resized by sdlora: {rule}, ranks {ranks[0]}..{ranks[-1]}]").strip()
    return metadata


def _float_or_none(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# extract


@dataclass
class ExtractReport:
    output: str
    modules: list[ModuleResize]
    text_encoder_skipped: bool
    seconds: float

    def table(self) -> str:
        width = max([len(m.key) for m in self.modules] + [6])
        lines = [f"{'module':<{width}}  rank  energy  rel.error"]
        lines += [f"{m.key:<{width}}  {m.new_rank:>4}  {m.energy_kept:6.2%}  {m.relative_error:9.4f}"
                  for m in self.modules]
        if self.text_encoder_skipped:
            lines.append("text encoder: unchanged between base and tuned, no text-encoder modules written")
        lines.append(f"{len(self.modules)} modules -> {self.output}")
        return "\n".join(lines)


def _load(source, what: str, dtype: torch.dtype = torch.float32):
    if not (Path(source).expanduser().exists() or source == "tiny"):
        raise UserError(f"{what} {source}: no such file or folder (give a diffusers folder or a .safetensors checkpoint)")
    return load_base(ModelConfig(base=str(source)), dtype=dtype)


def _extract_targets(base, conv_rank: int) -> dict[str, tuple[str, tuple[str, ...], bool]]:
    """{kohya key: (part, module paths, swap_halves)} of Kohya's default targets (plus ResNet convs): one path
    each, except a transformer named as its original (FLUX.1), whose Kohya module is the rows of several
    diffusers modules (`transformer_keys.kohya_modules`)."""
    targets = {}
    for part, model in keys.model_parts(base).items():
        names = transformer_keys.names_of(model) if part == "unet" else None
        if names is not None:
            targets.update({key: (part, module.paths, module.swap_halves)
                            for key, module in transformer_keys.kohya_modules(model, names).items()})
            continue
        paths = (unet_target_paths(model, "transformer", convs=conv_rank > 0) if part == "unet"
                 else text_encoder_target_paths(model))
        targets.update({key: (part, (path,), False) for key, path in keys.module_keys(model, part, paths).items()})
    return targets


def _weight_change(models: dict, part: str, paths: tuple[str, ...], swap_halves: bool) -> torch.Tensor:
    """W_tuned - W_base (fp32) of one Kohya module: its diffusers modules' rows stacked, in the original's order."""
    changes = []
    for path in paths:
        try:
            tuned_weight = models["tuned"][part].get_submodule(path).weight
        except AttributeError:
            raise UserError(f"extract: the tuned model has no {part} module {path}; base and tuned must share "
                            f"one architecture") from None
        base_weight = models["base"][part].get_submodule(path).weight
        if tuned_weight.shape != base_weight.shape:
            raise UserError(f"extract: {path} is {tuple(base_weight.shape)} in the base and "
                            f"{tuple(tuned_weight.shape)} in the tuned model; they must share one architecture")
        changes.append(tuned_weight.detach().float() - base_weight.detach().float())
    change = torch.cat(changes) if len(changes) > 1 else changes[0]
    return exchanged_halves(change) if swap_halves else change


def extract_tensors(base, tuned, rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
                    conv_rank: int = 0, clamp: float | None = 0.99, te_tolerance: float = 1e-4,
                    dtype: torch.dtype = torch.float16):
    """(tensors, records, text_encoder_skipped) of the adapter W_tuned - W_base."""
    if (rank is None) == (energy is None):
        raise UserError("extract: give exactly one of --rank R or --energy BETA")
    models = {"base": keys.model_parts(base), "tuned": keys.model_parts(tuned)}
    targets = _extract_targets(base, conv_rank)
    weights = {key: _weight_change(models, part, paths, swap) for key, (part, paths, swap) in targets.items()}
    te_keys = [k for k, (part, _, _) in targets.items() if part != "unet"]
    te_skipped = bool(te_keys) and max(float(weights[k].abs().max()) for k in te_keys) < te_tolerance
    if all(float(w.abs().max()) < te_tolerance for w in weights.values()):
        raise UserError(f"extract: no target weight differs by more than {te_tolerance:g} between --base and "
                        f"--tuned; are they the same checkpoint?")
    tensors, records = {}, []
    for key, delta in weights.items():
        if te_skipped and key in te_keys:
            continue
        spatial = delta.dim() == 4 and delta.shape[2:] != (1, 1)
        U, S, Vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
        k = choose_rank(S, conv_rank if spatial else rank, None if spatial else energy, max_rank)
        up, down = truncate(U, S, Vh, k)
        if clamp is not None:
            up, down = clamp_quantile(up, down, clamp)
        approx = up @ down
        flat = delta.reshape(delta.shape[0], -1)
        norm = float(flat.norm())
        up, down = factors_in_shape(up, down, delta.shape)
        tensors[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(k), dtype=dtype)  # alpha = rank: scale 1
        # With clamping the error is measured, not the Eckart-Young bound.
        error = float((flat - approx).norm()) / norm if norm else 0.0
        records.append(ModuleResize(key, "lora", S.numel(), k, energy_kept(S, k), error))
    return tensors, records, te_skipped


def extract(base_source, tuned_source, out, rank: int | None = None, energy: float | None = None,
            max_rank: int | None = None, conv_rank: int = 0, clamp: float | None = 0.99,
            te_tolerance: float = 1e-4, dtype: torch.dtype = torch.float16, overwrite: bool = False) -> ExtractReport:
    """Write a Kohya LoRA for the difference tuned - base of two checkpoints of one architecture."""
    out = Path(out)
    refuse_to_overwrite(out, overwrite)
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UserError(f"extract: --energy {energy} must be in (0, 1]")
    if rank is not None and rank < 1:
        raise UserError(f"extract: --rank {rank} must be at least 1")
    if clamp is not None and not 0.0 < clamp <= 1.0:
        raise UserError(f"extract: --clamp-quantile {clamp} must be in (0, 1], e.g. 0.99 (or pass --no-clamp)")
    start = time.perf_counter()
    base, tuned = _load(base_source, "--base"), _load(tuned_source, "--tuned")
    tensors, records, te_skipped = extract_tensors(base, tuned, rank, energy, max_rank, conv_rank, clamp,
                                                   te_tolerance, dtype)
    dim = one_or_dynamic(r.new_rank for r in records)
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)} if conv_rank else {}
    network = network_fields(dim, dim, args=args)  # alpha = rank: scale 1
    metadata = network_metadata(base, out.stem, network, f"extracted by sdlora: {tuned_source} - {base_source}")
    metadata["sdlora_extract"] = json.dumps({"base": str(base_source), "tuned": str(tuned_source), "rank": rank,
                                             "energy": energy, "max_rank": max_rank, "conv_rank": conv_rank,
                                             "clamp_quantile": clamp, "text_encoder_skipped": te_skipped})
    save_adapter(out, tensors, metadata, overwrite=overwrite)
    return ExtractReport(str(out), records, te_skipped, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# merge


def merge_adapters(base, adapters: list[tuple[Path, float]]) -> dict[str, int]:
    """Bake adapters into the loaded base in place: W += multiplier * module_delta, one layer at a time
    (`apply.merge_files`). Returns {adapter path: modules merged}. Every module of every file must find
    its layer and fit it, else nothing is changed and the error names the file and a module."""
    return apply.merge_files(keys.model_parts(base), adapters)


def load_merged(base_source, adapters: list[tuple[Path, float]], dtype: torch.dtype | None = None):
    """(BaseModel with the adapters baked in, in memory; {adapter path: modules merged}).

    For "train, merge, sample": `load_merged(base, [(adapter, 1.0)])[0].pipeline()` renders what
    the merged checkpoint renders, without writing it; `dtype` rounds the weights as saving would.

    Each layer's change is summed in fp32 from its weight and rounded once, one layer at a time
    (`apply.merge_files`), so memory peaks near the base's own size. The base is loaded in `dtype`
    when it stores its weights in `dtype` (an fp16 SDXL checkpoint merged to fp16), else in fp32
    and rounded after merging: either way every weight is rounded to `dtype` once, from fp32.
    """
    for path, _ in adapters:
        if not Path(path).is_file():
            raise UserError(f"merge: adapter {path} does not exist (give ADAPTER[:SCALE], e.g. style.safetensors:0.8)")
    exact = dtype is not None and stored_dtypes(ModelConfig(base=str(base_source))) == {dtype}
    base = _load(base_source, "BASE", dtype if exact else torch.float32)
    merged = merge_adapters(base, [(Path(p), float(m)) for p, m in adapters])
    if dtype is not None and not exact:  # every text encoder, FLUX.1's T5 (no adapter part) too
        text_encoders = [getattr(base, slot.part) for slot in FAMILIES[base.family].text_encoders]
        for component in (base.unet, *text_encoders, base.vae):
            component.to(dtype)
    return base, merged


def merge(base_source, adapters: list[tuple[Path, float]], out, dtype: torch.dtype = torch.float16,
          overwrite: bool = False) -> dict[str, int]:
    """Load `base_source`, merge the adapters, save to `out` (.safetensors: one file; else a diffusers folder)."""
    out = Path(out)
    refuse_to_overwrite(out, overwrite)
    if not adapters:
        raise UserError("merge: name at least one adapter between BASE and OUT")
    if out.suffix and out.suffix.lower() != ".safetensors":
        raise UserError(f"merge: OUT {out} must end with .safetensors (one checkpoint file) or have no suffix "
                        f"(a diffusers folder)")
    base, merged = load_merged(base_source, adapters, dtype)
    if out.suffix.lower() == ".safetensors" and transformer_keys.names_of(base.unet) is not None:
        raise UserError(f"merge: OUT {out}: a {FAMILIES[base.family].title} base is written as a diffusers folder "
                        f"(give OUT without a suffix); its single-file layout is not written yet")
    if out.suffix.lower() == ".safetensors":
        save_single_file(base, out, dtype, overwrite=overwrite)
    else:
        save_diffusers(base, out, overwrite=overwrite)
    return merged
