"""Low-rank tools on Kohya-format adapters: resize, extract, merge, inspect.

All four work on one module's weight change flattened to a matrix, W [out, in * kh * kw],
and its singular values S (descending). Energy is the squared singular values:

    energy kept by rank k    E(k) = sum(S[:k]^2) / sum(S^2)
    rank for energy beta     the smallest k with E(k) >= beta      (textbook rule; kohya's
                             `sv_fro` p is sqrt(beta) and keeps one value more)
    error of the best rank-k approximation (Eckart-Young)
                             ||W - W_k||_F / ||W||_F = sqrt(sum(S[k:]^2)) / ||W||_F

resize  W = up @ down (unscaled: the scale alpha / rank stays outside), truncated SVD,
        up = U_k S_k, down = Vh_k, new_alpha = scale * new_rank, so scale * up @ down keeps
        its meaning. LoHa, LoKr and Tucker modules are written as plain LoRA. A DoRA module
        keeps its magnitude (dora_scale): only delta W inside W' = m (W0 + delta W) / ||.|| is
        resized, so the output is DoRA too and says so.
spectra never of the dense W: from the factors (kinds.factored_update), W = A @ B with inner
        size r (LoRA) or r^2 (LoHa, Khatri-Rao), through QR of A and B^T and the SVD of the
        small core; LoKr W = kron(W1, W2) has singular values S1[i] * S2[j].
extract delta = W_tuned - W_base per module, truncated SVD, alpha = rank (scale 1).
merge   W_base += multiplier * kinds.module_delta (DoRA: from W_base), one layer at a time in the
        weight's own dtype (`adapters.apply`), saved as a checkpoint.
inspect metadata, ranks, alphas, norms and each module's energy curve (optionally a PNG).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdlora.adapters import apply, keys, kinds
from sdlora.adapters.file import non_finite_modules, read_adapter, save_adapter
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
from sdlora.models.arch import build_text_encoder, build_unet
from sdlora.models.load import (
    load_base,
    save_diffusers,
    save_single_file,
    stored_dtypes,
)

ENERGY_LEVELS = (0.5, 0.8, 0.9, 0.99)
# Names of 3x3 convs in diffusers' U-Net (ResNet blocks, down/upsamplers, stem and head).
_SPATIAL_CONV_ENDINGS = ("_conv1", "_conv2", "_conv", "_conv_in", "_conv_out")
# 1x1 convs of SD1.x (Linear in SD2.x / SDXL) and of every ResNet shortcut.
_SD1_POINTWISE_CONV_ENDINGS = ("_proj_in", "_proj_out")


# ---------------------------------------------------------------------------------------------
# The maths of one matrix


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest k with sum(S[:k]^2) >= energy * sum(S^2); 1 for an all-zero S."""
    sq = S.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(sq, 0) / total
    # Energy within 1e-6 counts as reached: fp32 round-off leaves ~1e-7 of the energy in the
    # singular values past the true rank, and beta = 1.0 should give that rank, not the full one.
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-6, dtype=cumulative.dtype)).item()) + 1


def energy_kept(S: torch.Tensor, k: int) -> float:
    sq = S.double() ** 2
    total = float(sq.sum())
    return 1.0 if total == 0.0 else float(sq[:k].sum()) / total


def relative_error(S: torch.Tensor, k: int) -> float:
    """||W - W_k||_F / ||W||_F of the best rank-k approximation (Eckart-Young)."""
    sq = S.double() ** 2
    total = float(sq.sum())
    return 0.0 if total == 0.0 else math.sqrt(float(sq[k:].sum()) / total)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of W = up @ down (up [out, r], down [r, in]) without forming W.

    up = Q1 R1, down^T = Q2 R2  =>  W = Q1 (R1 R2^T) Q2^T, and the SVD of the small r x r core
    gives W's: U = Q1 U_c, S = S_c, Vh = Vh_c Q2^T. r x r instead of out x in: ~100x faster on SD1.5.
    """
    Q1, R1 = torch.linalg.qr(up.double())
    Q2, R2 = torch.linalg.qr(down.double().T)
    Uc, S, Vhc = torch.linalg.svd(R1 @ R2.T, full_matrices=False)
    return (Q1 @ Uc).float(), S.float(), (Vhc @ Q2.T).float()


def choose_rank(S: torch.Tensor, rank: int | None = None, energy: float | None = None,
                max_rank: int | None = None) -> int:
    k = rank if rank is not None else energy_rank(S, energy)
    return max(1, min(k, max_rank or k, S.numel()))


def truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, k] = U_k diag(S_k), down [k, in] = Vh_k): the best rank-k factors."""
    return U[:, :k] * S[:k], Vh[:k]


def clamp_quantile(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip both factors to the `quantile` of their joint absolute values (kohya's outlier clamp)."""
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    k = max(1, min(values.numel(), int(math.ceil(quantile * values.numel()))))
    hi = values.kthvalue(k).values
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def factors_in_shape(up: torch.Tensor, down: torch.Tensor, weight_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Kohya shapes: Linear up [out, k], down [k, in]; conv up [out, k, 1, 1], down [k, in, kh, kw]."""
    if len(weight_shape) == 4:
        return up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *weight_shape[1:])
    return up, down


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


def _module_weight_shape(key: str, parts: dict[str, torch.Tensor], sd_v1: bool) -> tuple[int, ...]:
    """The base weight's shape as far as the adapter tells it.

    LoRA modules, Tucker cores and a full 4-d lokr_w2 carry it (`kinds.stated_weight_shape`).
    Otherwise LoHa and LoKr store [r, in * kh * kw], so the kernel comes from the diffusers layer
    name: 3x3 for the U-Net's ResNet and sampler convs, 1x1 conv for SD1.x proj_in / proj_out and
    ResNet shortcuts.
    """
    stated = kinds.stated_weight_shape(parts)
    if stated is not None:
        return stated
    pairs = kinds.factored_update(parts)
    out, cols = math.prod(a.shape[0] for a, _ in pairs), math.prod(b.shape[1] for _, b in pairs)
    unet = keys.part_of(key) == "unet"
    if unet and key.endswith(_SPATIAL_CONV_ENDINGS) and cols % 9 == 0:
        return (out, cols // 9, 3, 3)
    if unet and (key.endswith("_conv_shortcut") or (sd_v1 and key.endswith(_SD1_POINTWISE_CONV_ENDINGS))):
        return (out, cols, 1, 1)
    return (out, cols)


def module_spectrum(parts: dict[str, torch.Tensor]):
    """(S, top) of the module's weight change without its scale, flattened to [out, in * kh * kw]:
    S its singular values (descending), top(k) the best rank-k factors (up [out, k], down [k, cols]).

    Computed from the factors (module docstring): the dense weight change is never formed.
    """
    pairs = kinds.factored_update(parts)
    if len(pairs) == 1:
        U, S, Vh = svd_of_product(*pairs[0])
        return S, lambda k: truncate(U, S, Vh, k)
    (U1, S1, Vh1), (U2, S2, Vh2) = (svd_of_product(*pair) for pair in pairs)
    # kron(U1 S1 Vh1, U2 S2 Vh2) = kron(U1, U2) kron(S1, S2) kron(Vh1, Vh2): S1[i] S2[j], sorted.
    S, order = torch.sort(torch.outer(S1, S2).flatten(), descending=True)
    i, j = order // S2.numel(), order % S2.numel()

    def top(k: int):
        up = (U1[:, i[:k]][:, None, :] * U2[:, j[:k]][None, :, :]).reshape(-1, k) * S[:k]
        down = (Vh1[i[:k]][:, :, None] * Vh2[j[:k]][:, None, :]).reshape(k, -1)
        return up, down

    return S, top


def resize_tensors(tensors: dict[str, torch.Tensor], rank: int | None = None, energy: float | None = None,
                   max_rank: int | None = None, sd_v1: bool = True,
                   dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[ModuleResize]]:
    """Resize every module of a Kohya state dict; return (new tensors, per-module records)."""
    if (rank is None) == (energy is None):
        raise UserError("resize: give exactly one of --rank R or --energy BETA")
    out: dict[str, torch.Tensor] = {}
    records = []
    for key, parts in keys.group_modules(tensors).items():
        kind = kinds.module_variant(parts)
        scale = kinds.module_scale(parts)
        shape = _module_weight_shape(key, parts, sd_v1)
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
    sd_v1 = metadata.get("ss_base_model_version", "sd_v1").startswith("sd_v1")
    new, records = resize_tensors(tensors, rank, energy, max_rank, sd_v1=sd_v1)
    metadata = _resized_metadata(metadata, records, rank, energy, max_rank, src)
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


def _extract_targets(base, conv_rank: int) -> dict[str, tuple[str, str]]:
    """{kohya key: (part, module path)} of Kohya's default `transformer` targets (plus ResNet convs)."""
    targets = {}
    for part, model in keys.model_parts(base).items():
        paths = (unet_target_paths(model, "transformer", convs=conv_rank > 0) if part == "unet"
                 else text_encoder_target_paths(model))
        targets.update({key: (part, path) for key, path in keys.module_keys(model, part, paths).items()})
    return targets


def extract_tensors(base, tuned, rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
                    conv_rank: int = 0, clamp: float | None = 0.99, te_tolerance: float = 1e-4,
                    dtype: torch.dtype = torch.float16):
    """(tensors, records, text_encoder_skipped) of the adapter W_tuned - W_base."""
    if (rank is None) == (energy is None):
        raise UserError("extract: give exactly one of --rank R or --energy BETA")
    models = {"base": keys.model_parts(base), "tuned": keys.model_parts(tuned)}
    targets = _extract_targets(base, conv_rank)
    weights = {}
    for key, (part, path) in targets.items():
        try:
            tuned_weight = models["tuned"][part].get_submodule(path).weight
        except AttributeError:
            raise UserError(f"extract: the tuned model has no {part} module {path}; base and tuned must share "
                            f"one architecture") from None
        base_weight = models["base"][part].get_submodule(path).weight
        if tuned_weight.shape != base_weight.shape:
            raise UserError(f"extract: {path} is {tuple(base_weight.shape)} in the base and "
                            f"{tuple(tuned_weight.shape)} in the tuned model; they must share one architecture")
        weights[key] = tuned_weight.detach().float() - base_weight.detach().float()
    te_keys = [k for k, (part, _) in targets.items() if part != "unet"]
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
    if dtype is not None and not exact:
        for component in (*keys.model_parts(base).values(), base.vae):
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
    if out.suffix.lower() == ".safetensors":
        save_single_file(base, out, dtype, overwrite=overwrite)
    else:
        save_diffusers(base, out, overwrite=overwrite)
    return merged


# ---------------------------------------------------------------------------------------------
# convert


def convert(src, dst, overwrite: bool = False) -> dict[str, str]:
    """Write the adapter `src` (Kohya, LyCORIS, diffusers or peft keys) as a Kohya-named file `dst`.

    Tensors are those `read_adapter` gives every command (bundled embeddings left out);
    diffusers' own header keys are dropped, and a file without Kohya metadata gets the
    network fields A1111 reads (module, dim, alpha, output name). Returns the metadata written.
    """
    src, dst = Path(src), Path(dst)
    refuse_to_overwrite(dst, overwrite)
    tensors, metadata = read_adapter(src)
    metadata = {k: v for k, v in metadata.items()
                if k not in ("lora_adapter_metadata", "format", "sshs_model_hash")}  # save_adapter hashes anew
    groups = keys.group_modules(tensors)
    if "ss_network_module" not in metadata:
        algos = sorted({kinds.module_kind(parts) for parts in groups.values()})
        lycoris = not all(kinds.is_plain_lora(parts) for parts in groups.values())
        algo = (algos[0] if len(algos) == 1 else "locon") if lycoris else None
        ranks = [kinds.module_rank(parts) or 0 for parts in groups.values()]
        alphas = [round(kinds.module_scale(parts) * (kinds.module_rank(parts) or 1), 6) for parts in groups.values()]
        metadata |= network_fields(one_or_dynamic(ranks), one_or_dynamic(alphas, "{:g}".format), algo,
                                        dora=any(kinds.has_dora(parts) for parts in groups.values()))
    metadata.setdefault("ss_output_name", dst.stem)
    save_adapter(dst, tensors, metadata, overwrite=overwrite)
    return metadata


# ---------------------------------------------------------------------------------------------
# inspect


@dataclass
class ModuleSpectrum:
    key: str
    part: str
    kind: str
    rank: int
    alpha: float
    norm: float  # ||scale * delta||_F, the module's effect at multiplier 1
    singular_values: list[float] = field(repr=False)
    ranks_for_energy: dict[str, int] = field(default_factory=dict)


def inspect_tensors(tensors: dict[str, torch.Tensor]) -> list[ModuleSpectrum]:
    spectra = []
    for key, parts in keys.group_modules(tensors).items():
        scale = kinds.module_scale(parts)
        S, _ = module_spectrum(parts)
        rank = kinds.module_rank(parts) or S.numel()
        S = S * abs(scale)
        spectra.append(ModuleSpectrum(
            key, keys.part_of(key), kinds.module_variant(parts), rank, scale * rank, float(S.norm()),
            [float(v) for v in S], {f"{level:.0%}": energy_rank(S, level) for level in ENERGY_LEVELS}))
    return spectra


def inspect(path, plot: Path | None = None) -> dict:
    """A JSON-ready summary of an adapter file (and optionally a PNG of its spectra)."""
    tensors, metadata = read_adapter(path, allow_non_finite=True)
    broken = non_finite_modules(tensors)  # reported, not decomposed (an SVD of NaN fails)
    spectra = inspect_tensors({k: v for k, v in tensors.items() if k.partition(".")[0] not in broken})
    counts: dict[str, int] = {}
    for m in spectra:
        counts[m.part] = counts.get(m.part, 0) + 1
    summary = {"file": str(path), "metadata": {k: _maybe_json(v) for k, v in sorted(metadata.items())},
               "modules_per_part": counts, "modules": [asdict(m) for m in spectra], "non_finite": broken}
    if plot is not None:
        plot_spectra(spectra, Path(plot), title=Path(path).name)
        summary["plot"] = str(plot)
    return summary


def _maybe_json(value: str):
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def plot_spectra(spectra: list[ModuleSpectrum], path: Path, title: str = "") -> Path:
    """One PNG: normalised singular values (log) above cumulative energy, one line per module."""
    import tempfile

    from PIL import Image

    from sdlora.io import atomic_path
    from sdlora.sampling.plot import line_plot

    normalised = [[v / m.singular_values[0] for v in m.singular_values] if m.singular_values and m.singular_values[0]
                  else [0.0] for m in spectra]
    cumulative = []
    for m in spectra:
        sq = torch.tensor(m.singular_values, dtype=torch.float64) ** 2
        total = float(sq.sum()) or 1.0
        cumulative.append([float(v) for v in torch.cumsum(sq, 0) / total])
    with tempfile.TemporaryDirectory() as tmp:
        top = line_plot(normalised, Path(tmp) / "s.png", title=f"{title}: singular values / largest, per module",
                        xlabel="index", ylabel="S / S[0]", log_y=True)
        bottom = line_plot(cumulative, Path(tmp) / "e.png", title="cumulative energy sum(S[:k]^2) / sum(S^2)",
                           xlabel="rank k", ylabel="energy")
        a, b = Image.open(top), Image.open(bottom)
        canvas = Image.new("RGB", (max(a.width, b.width), a.height + b.height), "white")
        canvas.paste(a, (0, 0))
        canvas.paste(b, (0, a.height))
    with atomic_path(path) as tmp_path:
        canvas.save(tmp_path, format="PNG")
    return path


def format_inspect(summary: dict) -> str:
    lines = [f"{summary['file']}", "metadata:"]
    for key, value in summary["metadata"].items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"  {key}: {text if len(text) <= 200 else text[:200] + '...'}")
    lines.append("modules: " + ", ".join(f"{part} {n}" for part, n in summary["modules_per_part"].items()))
    modules = summary["modules"]
    width = max([len(m["key"]) for m in modules] + [6])
    levels = list(modules[0]["ranks_for_energy"]) if modules else []
    lines.append(f"{'module':<{width}}  kind  rank  alpha    norm  " + "  ".join(f"r@{lv:>3}" for lv in levels))
    for m in modules:
        lines.append(f"{m['key']:<{width}}  {m['kind']:<4}  {m['rank']:>4}  {m['alpha']:>5g}  {m['norm']:6.3g}  "
                     + "  ".join(f"{m['ranks_for_energy'][lv]:>5}" for lv in levels))
    if "plot" in summary:
        lines.append(f"plot: {summary['plot']}")
    broken = summary.get("non_finite") or {}
    if broken:
        lines.append(f"NON-FINITE: {len(broken)} modules hold NaN or infinite values (the training diverged; "
                     f"resize, merge and sample refuse this file):")
        lines += [f"  {key}: {', '.join(suffixes)}" for key, suffixes in broken.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# bench


def sd15_module_shapes() -> dict[str, tuple[int, ...]]:
    """{kohya key: weight shape} of Kohya's default targets on SD1.5 (192 U-Net + 72 text encoder)."""
    unet = build_unet("sd_v1", device="meta")  # shapes only, no weights
    text_encoder = build_text_encoder("sd_v1", device="meta")
    shapes = {keys.kohya_key("unet", p): tuple(unet.get_submodule(p).weight.shape)
              for p in unet_target_paths(unet, "transformer")}
    shapes.update({keys.kohya_key("te", p): tuple(text_encoder.get_submodule(p).weight.shape)
                   for p in text_encoder_target_paths(text_encoder)})
    return shapes


def random_adapter(shapes: dict[str, tuple[int, ...]], dim: int, alpha: float, seed: int = 0,
                   dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A Kohya LoRA state dict of random factors with a decaying spectrum (trained adapters look so)."""
    generator = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(dim, dtype=torch.float32) / (dim / 8))  # per-rank magnitude
    tensors = {}
    for key, shape in shapes.items():
        down = torch.randn(dim, *shape[1:], generator=generator) / math.sqrt(math.prod(shape[1:]))
        up = torch.randn(shape[0], dim, *([1, 1] if len(shape) == 4 else []), generator=generator)
        up = up * decay.reshape(1, dim, *([1, 1] if len(shape) == 4 else []))
        tensors[f"{key}.lora_down.weight"] = down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = (up * 0.01).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def bench_resize(dim: int = 128, energy: float = 0.9) -> dict:
    """Time resizing a dim-128 SD1.5-shaped adapter (192 U-Net + 72 text-encoder modules) at energy 0.9."""
    shapes = sd15_module_shapes()
    tensors = random_adapter(shapes, dim, alpha=dim / 2)
    start = time.perf_counter()
    _, records = resize_tensors(tensors, energy=energy)
    seconds = time.perf_counter() - start
    ranks = [r.new_rank for r in records]
    return {"resize_seconds": round(seconds, 3), "modules": len(records), "dim": dim, "energy": energy,
            "new_rank_min": min(ranks), "new_rank_max": max(ranks),
            "new_rank_mean": round(sum(ranks) / len(ranks), 1), "threads": torch.get_num_threads()}
