"""Kohya key names and the maths of one adapter module, both ways.

A Kohya key is a prefix plus the module path with every "." turned into "_":

    down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k   (U-Net)
    -> lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k

SDXL's U-Net is named as in Stability's original (SGM) layout, as kohya writes it:
`down_blocks.1.attentions.0...` -> `lora_unet_input_blocks_4_1_...` (`checkpoint.unet_original_paths`).
Text-encoder keys always read `lora_te_text_model_encoder_layers_N_...`: transformers 4
wrapped CLIPTextModel's layers in `text_model`, transformers 5 does not, and every UI
reads the 4.x names (`family.nested_text_name`). "_" is ambiguous in reverse, so key -> module path goes through a
map built from the model itself (`kohya_module_map`).

Per module, with r the rank and scale = alpha / r (alpha = r when the file has none):

    LoRA   delta W = scale * up @ down          down [r, in(, k, k)], up [out, r(, 1, 1)]
    LoHa   delta W = scale * (w1_a @ w1_b) * (w2_a @ w2_b)   (Hadamard product)
           w*_a [out, r], w*_b [r, in * k * k]; Tucker convs add t1/t2 [r, r, k, k]
           with w*_a [r, out], w*_b [r, in].
    Tucker LoCon (`lora_mid` [r, r, k, k], down [r, in, 1, 1], up [out, r, 1, 1]):
           delta W[p, q, k, l] = scale * sum_ij up[p, i] mid[i, j, k, l] down[j, q]
    LoKr   delta W = scale * kron(w1, w2)      w1 [a, c] (or w1_a @ w1_b), w2 [b, d(, k, k)]
           (or w2_a @ w2_b, or Tucker t2 with w2_a [r, b], w2_b [r, d]); out = a b, in = c d;
           r is w1_b's (else w2_b's) rank, and scale = 1 when both are full (no alpha use).
    DoRA   (`dora_scale`, any of the above; Liu et al. 2024, LyCORIS `dora_wd`): the adapted
           weight is W' = m * (W0 + delta W) / ||W0 + delta W||, the norm taken per output row
           (m [out, 1, ...], LyCORIS's wd_on_out and peft's magnitude) or per input column
           (m [1, in, ...], LyCORIS before wd_on_out and A1111); the change is W' - W0.
           A multiplier w scales that change linearly, W0 + w (W' - W0), as A1111 and ComfyUI do
           (LyCORIS's own forward agrees at w = 1; at other weights it interpolates m / ||.||
           instead, so that w = 0 there still leaves delta W applied).
"""

from __future__ import annotations

import torch
from torch import nn

from sdlora.errors import UserError
from sdlora.models.family import nested_text_key, nested_text_name

PREFIXES = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}
TEXT_PARTS = ("te", "te1", "te2")

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # a module has some
# The Tucker core of each kind (LyCORIS `use_tucker`: the kernel lives in a small [r, r, k, k] core).
_TUCKER = {"lora": "lora_mid.weight", "loha": "hada_t1", "lokr": "lokr_t2"}
# Modules of algorithms sdlora does not read, named by a tensor only they have.
_UNSUPPORTED = {"diff": "LyCORIS full fine-tuning (diff)", "on_input": "(IA)^3", "a1.weight": "GLoRA",
                "oft_blocks": "OFT / BOFT", "oft_diag": "OFT", "w_norm": "LyCORIS norm layers",
                "lora_A.weight": "diffusers/peft (lora_A/lora_B) that was not converted"}


def kohya_key(part: str, module_path: str) -> str:
    """Module path as in named_modules() -> Kohya module key (no tensor suffix)."""
    if part not in PREFIXES:
        raise ValueError(f"unknown model part {part!r}; expected one of {', '.join(PREFIXES)}")
    if part in TEXT_PARTS:
        module_path = nested_text_name(module_path)
    return f"{PREFIXES[part]}_{module_path.replace('.', '_')}"


def part_of(key: str) -> str:
    """The model part a Kohya module key belongs to ("unet", "te", "te1", "te2")."""
    # Longest prefix first: "lora_te1_..." also starts with "lora_te".
    for part, prefix in sorted(PREFIXES.items(), key=lambda kv: -len(kv[1])):
        if key.startswith(prefix + "_"):
            return part
    raise UserError(f"{key!r} is not a Kohya LoRA key: it should start with "
                    f"{', '.join(p + '_' for p in PREFIXES.values())}")


def model_parts(models) -> dict[str, nn.Module]:
    """{part: model} of a base model or pipeline: U-Net + `te` (SD1.x/SD2.x), or U-Net + `te1`
    (CLIP-L) + `te2` (OpenCLIP bigG) when it has a second text encoder (SDXL)."""
    text_encoder_2 = getattr(models, "text_encoder_2", None)
    if text_encoder_2 is None:
        return {"unet": models.unet, "te": models.text_encoder}
    return {"unet": models.unet, "te1": models.text_encoder, "te2": text_encoder_2}


def uses_sgm_names(unet: nn.Module) -> bool:
    """SDXL's U-Net (the one with the `text_time` addition embedding) is named in SGM's layout."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def module_keys(model: nn.Module, part: str, paths) -> dict[str, str]:
    """{kohya key: module path} for module paths of one part of a model."""
    paths = list(paths)
    names = {path: path for path in paths}
    if part == "unet" and uses_sgm_names(model):
        from sdlora.models.checkpoint import unet_original_paths

        names = unet_original_paths(paths, model.config)
        unnamed = [p for p in paths if p not in names]
        if unnamed:
            raise ValueError(f"no SGM name for the U-Net modules {unnamed[:3]}")
    mapping: dict[str, str] = {}
    for path in paths:
        key = kohya_key(part, names[path])
        if key in mapping:
            raise ValueError(f"modules {mapping[key]!r} and {path!r} share the Kohya key {key!r}")
        mapping[key] = path
    return mapping


def kohya_module_map(model: nn.Module, part: str) -> dict[str, str]:
    """{kohya key: module path} for every Linear and Conv2d of `model`.

    On a model with peft adapters injected, the adapted layer's own path is used and its
    internals (base_layer, lora_A, ...) are skipped, so the map is the same before and after.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    paths = []
    inside_adapter = None
    for path, module in model.named_modules():
        if inside_adapter is not None and path.startswith(inside_adapter):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_adapter = path + "."
        elif not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        paths.append(path)
    return module_keys(model, part, paths)


def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"lora_unet_x.lora_down.weight": t, ...} -> {"lora_unet_x": {"lora_down.weight": t, ...}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key, dot, suffix = name.partition(".")
        if not dot:
            raise UserError(f"tensor {name!r} is not a Kohya adapter tensor (expected <module key>.<suffix>, "
                            f"e.g. lora_unet_..._to_k.lora_down.weight)")
        modules.setdefault(key, {})[suffix] = tensor
    return modules


def module_kind(parts: dict[str, torch.Tensor]) -> str:
    """"lora" (LoCon and Tucker LoCon too), "loha" or "lokr"; any other algorithm is refused by name."""
    if all(s in parts for s in LORA_SUFFIXES):
        return "lora"
    if all(s in parts for s in LOHA_SUFFIXES):
        return "loha"
    if (("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts.keys())
            and ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts.keys())):
        return "lokr"
    for suffix, algorithm in _UNSUPPORTED.items():
        if suffix in parts:
            raise UserError(f"{algorithm} adapters are not supported (module tensors {sorted(parts)}); "
                            f"sdlora reads LoRA, LoCon, LoHa and LoKr, each optionally with DoRA")
    raise UserError(f"unrecognised adapter module with tensors {sorted(parts)}; expected "
                    f"{' + '.join(LORA_SUFFIXES)} (LoRA), {' + '.join(LOHA_SUFFIXES)} (LoHa) or lokr_w1* + "
                    f"lokr_w2* (LoKr)")


def module_variant(parts: dict[str, torch.Tensor]) -> str:
    """The kind with its options, as reports show it: "lora", "loha+tucker", "lokr+dora", ..."""
    kind = module_kind(parts)
    return kind + ("+tucker" if _TUCKER[kind] in parts else "") + ("+dora" if "dora_scale" in parts else "")


def module_rank(parts: dict[str, torch.Tensor]) -> int | None:
    """The rank alpha is divided by; None for a LoKr module without low-rank factors."""
    kind = module_kind(parts)
    if kind == "lora":
        return parts["lora_down.weight"].shape[0]
    if kind == "loha":
        return parts["hada_w1_b"].shape[0]
    for name in ("lokr_w1_b", "lokr_w2_b"):  # A1111's and ComfyUI's rule
        if name in parts:
            return parts[name].shape[0]
    return None


def module_scale(parts: dict[str, torch.Tensor]) -> float:
    """alpha / rank; a module without `.alpha` (or a LoKr with full factors) loads as scale 1, as in every UI."""
    rank = module_rank(parts)
    alpha = parts.get("alpha")
    return 1.0 if alpha is None or rank is None else float(alpha) / rank


def with_alpha_one(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA module rewritten with alpha = 1 and the same change: up' = scale * rank * up, so that
    (1 / rank) up' @ down = scale * up @ down.

    For diffusers' load_lora_weights: diffusers 0.42 keys the alphas of a Kohya file's attention
    modules by names its peft config never matches (`...processor.to_k_lora.down.weight`), so in a
    file whose modules' alphas differ (a resized file, peft's alpha_pattern) those modules get the
    most common alpha. With one alpha for all there is nothing to match.
    """
    up = parts["lora_up.weight"]
    factor = module_scale(parts) * module_rank(parts)
    return parts | {"lora_up.weight": (up.float() * factor).to(up.dtype), "alpha": torch.tensor(1.0)}


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W[p, q, k, l] = sum_ij a[i, p] t[i, j, k, l] b[j, q]: a [r, out], b [r, in], t [r, r, k, k]."""
    return torch.einsum("ijkl,ip,jq->pqkl", t.float(), a.float(), b.float())


def _lokr_factors(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1 [a, c], w2 [b, d * k * k] or [b, d, k, k]): the two Kronecker factors, unscaled."""
    w1 = parts["lokr_w1"].float() if "lokr_w1" in parts else parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
    elif "lokr_t2" in parts:
        w2 = _tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        w2 = parts["lokr_w2_a"].float() @ parts["lokr_w2_b"].float()
    return w1, w2


def module_update(parts: dict[str, torch.Tensor], weight_shape) -> torch.Tensor:
    """The scaled low-rank change (fp32) in the base weight's shape [out, in] or [out, in, k, k].

    For a DoRA module this is only delta W inside the decomposition; `module_delta` gives the change.
    """
    weight_shape = torch.Size(weight_shape)
    kind = module_kind(parts)
    if kind == "lora":
        down = parts["lora_down.weight"].float()
        up = parts["lora_up.weight"].float()
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise UserError(f"lora_up with a {tuple(up.shape[2:])} kernel is not supported (expected 1x1)")
        up = up.reshape(up.shape[0], -1)
        if "lora_mid.weight" in parts:
            delta = _tucker(parts["lora_mid.weight"], up.T, down.reshape(down.shape[0], -1))
        else:
            # [out, r] @ [r, in*k*k]; the 3x3 kernel rides along in the flattened input axis.
            delta = up @ down.reshape(down.shape[0], -1)
    elif kind == "loha" and "hada_t1" in parts:
        delta = (_tucker(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
                 * _tucker(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"]))
    elif kind == "loha":
        w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
        w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
        delta = w1 * w2
    else:
        w1, w2 = _lokr_factors(parts)
        if len(weight_shape) == 4 and w2.dim() == 2 and w2.shape[1] * w1.shape[1] == weight_shape[1:].numel():
            w2 = w2.reshape(w2.shape[0], weight_shape[1] // w1.shape[1], *weight_shape[2:])  # [b, d, k, k]
        delta = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2.contiguous())
    if delta.shape[0] != weight_shape[0] or delta.numel() != weight_shape.numel():
        raise UserError(f"adapter module of shape {tuple(delta.shape)} does not fit a base weight of shape "
                        f"{tuple(weight_shape)}: the adapter was trained for a different base model")
    return delta.reshape(weight_shape) * module_scale(parts)


def dora_axis(magnitude: torch.Tensor, weight_shape) -> int:
    """0 when DoRA's magnitude is per output row (m [out, 1, ...]), 1 when per input column (m [1, in, ...])."""
    out, fan_in = weight_shape[0], weight_shape[1]
    if magnitude.shape[0] == out and magnitude.numel() == out:
        return 0
    if magnitude.dim() > 1 and magnitude.shape[0] == 1 and magnitude.shape[1] == fan_in and magnitude.numel() == fan_in:
        return 1
    raise UserError(f"dora_scale of shape {tuple(magnitude.shape)} fits neither the rows nor the columns of a base "
                    f"weight of shape {tuple(weight_shape)}: the adapter was trained for a different base model")


def dora_delta(base_weight: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' - W0 with W' = m * (W0 + delta W) / ||W0 + delta W|| along DoRA's axis (fp32)."""
    weight = base_weight.float() + update
    axis = dora_axis(magnitude, weight.shape)
    # The norm of each output row (axis 0) or input column (axis 1) over every other axis.
    moved = weight.movedim(axis, 0)
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1)
    shape = [1] * weight.dim()
    shape[axis] = -1
    norm = norm.reshape(shape) + torch.finfo(torch.float32).eps  # LyCORIS's guard against a zero column
    return weight * (magnitude.float().reshape(shape) / norm) - base_weight.float()


def module_delta(parts: dict[str, torch.Tensor], weight_shape, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight change at multiplier 1 (fp32): W = W0 + multiplier * module_delta.

    A DoRA module's change depends on the base weight W0, which must then be given.
    """
    update = module_update(parts, weight_shape)
    if "dora_scale" not in parts:
        return update
    if base_weight is None:
        raise ValueError("module_delta: a DoRA module (dora_scale) needs the base weight")
    return dora_delta(base_weight.to(update.device), update, parts["dora_scale"].to(update.device))


# ---------------------------------------------------------------------------------------------
# Other key styles, converted to Kohya names on load

# diffusers / peft module-tensor endings -> Kohya's. peft and diffusers >= 0.25 write lora_A /
# lora_B; diffusers' older LoRACompatibleLinear wrote lora.down / lora.up, its text-encoder
# patch lora_linear_layer, its attention processors `processor.to_q_lora.down`.
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight", ".lora_linear_layer.up.weight": "lora_up.weight",
    "_lora.down.weight": "lora_down.weight", "_lora.up.weight": "lora_up.weight",
    ".lora_magnitude_vector.weight": "dora_scale", ".lora_magnitude_vector": "dora_scale",
    ".alpha": "alpha",
}
_DIFFUSERS_COMPONENTS = {"unet.": "unet", "text_encoder.": "te", "text_encoder_2.": "te2"}
_UNET_CHILDREN = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.")
BUNDLED_EMBEDDING_PREFIX = "bundle_emb."


def _diffusers_module(name: str, has_second_encoder: bool) -> tuple[str, str, str | None, str] | None:
    """"unet.<path>.lora_A.weight" -> ("unet", <path>, "unet", "lora_down.weight"): the part, the module path,
    the diffusers component the name starts with (None for unprefixed names) and the Kohya suffix;
    None if not that style."""
    for ending, suffix in _DIFFUSERS_SUFFIXES.items():
        if name.endswith(ending):
            path = name[:-len(ending)]
            break
    else:
        return None
    path = path.removeprefix("base_model.model.")  # peft's own adapter files
    for prefix, part in _DIFFUSERS_COMPONENTS.items():
        if path.startswith(prefix):
            path, component = path[len(prefix):], prefix[:-1]
            break
    else:
        component = None
        part = "unet" if path.startswith(_UNET_CHILDREN) else "te" if path.startswith("text_model.") else None
        if part is None:
            return None
    if part == "te" and has_second_encoder:
        part = "te1"
    # Attention-processor LoRA: attn1.processor.to_q_lora -> attn1.to_q (to_out_lora -> to_out.0).
    head, processor, layer = path.rpartition(".processor.")
    if processor:
        path = f"{head}.{'to_out.0' if layer == 'to_out' else layer}"
    return part, path, component, suffix


def to_kohya_names(tensors: dict[str, torch.Tensor],
                   metadata: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Kohya-named tensors for a file in Kohya, diffusers or peft key style, and notes for the user.

    diffusers/peft files store no alpha unless diffusers wrote its `lora_adapter_metadata`
    (each component's peft config: lora_alpha, alpha_pattern, use_rslora; `_diffusers_alphas`):
    without it the scale is 1 (alpha = rank), as diffusers loads them. peft's DoRA magnitude (per
    output row) becomes `dora_scale` [out, 1, ...]. Bundled textual-inversion embeddings
    (`bundle_emb.*`, which A1111 loads) are left out with a note. Text-encoder keys written under
    transformers 5 (`lora_te_encoder_layers_...`) read under the names every UI uses (`_nested_text_keys`).
    """
    notes = []
    embeddings = sorted({k[len(BUNDLED_EMBEDDING_PREFIX):].split(".")[0] for k in tensors
                         if k.startswith(BUNDLED_EMBEDDING_PREFIX)})
    if embeddings:
        notes.append(f"{len(embeddings)} bundled embedding(s) ignored ({', '.join(embeddings)}); only the LoRA "
                     f"part is loaded")
        tensors = {k: v for k, v in tensors.items() if not k.startswith(BUNDLED_EMBEDDING_PREFIX)}
    tensors, renamed = _nested_text_keys(tensors)
    if renamed:
        notes.append(f"{renamed} text-encoder modules are keyed without `text_model_` (written under transformers 5, "
                     f"e.g. by LyCORIS); read as lora_te_text_model_..., the names A1111 and ComfyUI read "
                     f"(`sdlora convert` writes them so)")
    kohya_prefixes = tuple(p + "_" for p in PREFIXES.values())
    if all(k.startswith(kohya_prefixes) for k in tensors):
        return tensors, notes
    second = any(k.startswith(("text_encoder_2.", "base_model.model.text_encoder_2.")) for k in tensors)
    converted: dict[str, torch.Tensor] = {}
    origins: dict[str, tuple[str | None, str]] = {}  # kohya key -> (diffusers component, module path)
    for name, tensor in tensors.items():
        if name.startswith(kohya_prefixes):
            converted[name] = tensor
            continue
        found = _diffusers_module(name, second)
        if found is None:
            converted[name] = tensor  # read_adapter names what is left over
            continue
        part, path, component, suffix = found
        key = kohya_key(part, path)
        origins[key] = (component, path)
        converted[f"{key}.{suffix}"] = tensor
    modules = group_modules({k: v for k, v in converted.items() if k.startswith(kohya_prefixes)})
    _diffusers_alphas(converted, modules, origins, metadata)
    for key, parts in modules.items():
        if "dora_scale" in parts and "lora_up.weight" in parts:  # peft: [out] -> LyCORIS's [out, 1(, 1, 1)]
            up = parts["lora_up.weight"]
            converted[f"{key}.dora_scale"] = parts["dora_scale"].reshape(up.shape[0], *[1] * (up.dim() - 1))
    notes.append("converted from diffusers/peft key names to Kohya's")
    return converted, notes


def _nested_text_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors with every text-encoder key under its transformers-4 name, how many modules were renamed)."""
    text_prefixes = [PREFIXES[part] + "_" for part in TEXT_PARTS]
    renamed: dict[str, torch.Tensor] = {}
    modules = set()
    for name, tensor in tensors.items():
        prefix = next((p for p in text_prefixes if name.startswith(p)), None)
        if prefix is not None:
            new = prefix + nested_text_key(name[len(prefix):])
            if new != name:
                modules.add(name.partition(".")[0])
                name = new
        renamed[name] = tensor
    return renamed, len(modules)


def _diffusers_alphas(tensors: dict[str, torch.Tensor], modules: dict[str, dict[str, torch.Tensor]],
                      origins: dict[str, tuple[str | None, str]], metadata: dict[str, str]) -> None:
    """Add `<key>.alpha` from diffusers' `lora_adapter_metadata` in place.

    The metadata is each component's peft LoraConfig, its fields prefixed by the component
    (`save_lora_weights`: {"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k": 16}, ...}) or not
    (a model's `save_lora_adapter`). peft gives the module at `path` the alpha of the first
    `alpha_pattern` key matching it (peft's `get_pattern_key`), else `lora_alpha`, and scales by
    alpha / r (rsLoRA: alpha / sqrt(r)) with r its rank (`rank_pattern`'s, which its tensors' shape
    is). Kohya's scale is alpha / rank, so the module's Kohya alpha is that scale * rank.
    """
    import json
    import math

    from peft.utils.other import get_pattern_key

    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return
    if not isinstance(config, dict):
        return
    components = {part: prefix[:-1] for prefix, part in _DIFFUSERS_COMPONENTS.items()}  # "te" -> "text_encoder"
    for key, parts in modules.items():
        if "alpha" in parts or "lora_down.weight" not in parts:
            continue
        component, path = origins[key]
        if component is None and "lora_alpha" in config:
            settings = config
        else:
            component = component or components[part_of(key).replace("te1", "te")]
            settings = {name[len(component) + 1:]: value for name, value in config.items()
                        if name.startswith(component + ".")}
        alpha = settings.get("lora_alpha")
        if alpha is None:
            continue
        patterns = settings.get("alpha_pattern") or {}
        alpha = patterns.get(get_pattern_key(patterns.keys(), path), alpha)
        rank = parts["lora_down.weight"].shape[0]
        scale = alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)
        tensors[f"{key}.alpha"] = torch.tensor(scale * rank)


# ---------------------------------------------------------------------------------------------
# Factored forms, for spectra without the dense weight change


def _khatri_rao(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor):
    """(A1 B1) * (A2 B2) = U V with U[p, ij] = A1[p, i] A2[p, j], V[ij, q] = B1[i, q] B2[j, q] (rank <= r1 r2)."""
    u = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    v = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return u, v


def _tucker_pair(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_tucker(t, a, b)` flattened to [out, in * k * k] as a^T @ M, M[i, (q, k, l)] = sum_j t[i, j, k, l] b[j, q]."""
    m = torch.einsum("ijkl,jq->iqkl", t.float(), b.float())
    return a.float().T, m.reshape(m.shape[0], -1)


def _full_pair(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix as a product with an identity on its shorter side."""
    w = w.float().reshape(w.shape[0], -1)
    rows, cols = w.shape
    return (torch.eye(rows), w) if rows <= cols else (w, torch.eye(cols))


def factored_update(parts: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """delta W / scale, flattened to [out, in * k * k], as factor pairs that are never multiplied out.

    One pair (A, B): delta W / scale = A @ B (LoRA: up, down; Tucker: up, mid x down; LoHa: the
    Khatri-Rao factors of the Hadamard product, inner size r^2). Two pairs (LoKr):
    delta W / scale = kron(A1 @ B1, A2 @ B2), w2 flattened to [b, d * k * k].
    """
    kind = module_kind(parts)
    if kind == "lora":
        up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
        up = up.reshape(up.shape[0], -1)
        if "lora_mid.weight" in parts:
            return [_tucker_pair(parts["lora_mid.weight"], up.T, down.reshape(down.shape[0], -1))]
        return [(up, down.reshape(down.shape[0], -1))]
    if kind == "loha":
        if "hada_t1" in parts:
            (a1, b1), (a2, b2) = (_tucker_pair(parts[f"hada_t{i}"], parts[f"hada_w{i}_a"], parts[f"hada_w{i}_b"])
                                  for i in (1, 2))
        else:
            a1, b1, a2, b2 = (parts[name].float() for name in LOHA_SUFFIXES)
        return [_khatri_rao(a1, a2, b1, b2)]
    w1 = (_full_pair(parts["lokr_w1"]) if "lokr_w1" in parts
          else (parts["lokr_w1_a"].float(), parts["lokr_w1_b"].float()))
    if "lokr_w2" in parts:
        w2 = _full_pair(parts["lokr_w2"])
    elif "lokr_t2" in parts:
        w2 = _tucker_pair(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        w2 = (parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float())
    return [w1, w2]


def loadable_module_map(model: nn.Module, part: str) -> dict[str, str]:
    """`kohya_module_map` plus, for a U-Net named in SGM's layout (SDXL), the keys of its
    diffusers paths: diffusers/peft files convert to those (`to_kohya_names`), and ComfyUI and
    diffusers read both forms."""
    mapping = kohya_module_map(model, part)
    if part == "unet" and uses_sgm_names(model):
        for path in list(mapping.values()):
            mapping.setdefault(kohya_key(part, path), path)
    return mapping
