"""Kohya key names <-> model module paths, and other key styles converted to Kohya's.

A Kohya key is a prefix plus the module path with every "." turned into "_":

    down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k   (U-Net)
    -> lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k

SDXL's U-Net is named as in Stability's original (SGM) layout, as kohya writes it:
`down_blocks.1.attentions.0...` -> `lora_unet_input_blocks_4_1_...` (`checkpoint.unet_original_paths`).
Text-encoder keys always read `lora_te_text_model_encoder_layers_N_...`: transformers 4
wrapped CLIPTextModel's layers in `text_model`, transformers 5 does not, and every UI
reads the 4.x names (`families.clip.nested_text_name`). "_" is ambiguous in reverse, so key -> module path goes through a
map built from the model itself (`kohya_module_map`). What a module's tensors mean is `kinds`' job.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from sdlora.adapters import kinds, transformer_keys
from sdlora.errors import UserError
from sdlora.models.checkpoint import unet_original_paths
from sdlora.models.families.clip import nested_text_key, nested_text_name

PREFIXES = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}
TEXT_PARTS = ("te", "te1", "te2")


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
    (CLIP-L) + `te2` (OpenCLIP bigG) when it has a second text encoder (SDXL). A transformer named as
    its original (FLUX.1) is the `unet` part (kohya's `lora_unet_`) with CLIP-L as `te1`; its T5
    (kohya's `lora_te3_`) is no part yet."""
    denoiser = getattr(models, "unet", None)  # a BaseModel's or an SD pipeline's; a FluxPipeline's transformer
    denoiser = models.transformer if denoiser is None else denoiser
    if transformer_keys.names_of(denoiser) is not None:
        return {"unet": denoiser, "te1": models.text_encoder}
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


# ---------------------------------------------------------------------------------------------
# Other key styles, converted to Kohya names on load

# diffusers / peft module-tensor endings -> Kohya's. peft and diffusers >= 0.25 write lora_A /
# lora_B; diffusers' older LoRACompatibleLinear wrote lora.down / lora.up, its text-encoder
# patch lora_linear_layer, its attention processors `processor.to_q_lora.down`.
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
    ".lora_down.weight": "lora_down.weight", ".lora_up.weight": "lora_up.weight",  # Kohya's tensors on such names
    ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight", ".lora_linear_layer.up.weight": "lora_up.weight",
    "_lora.down.weight": "lora_down.weight", "_lora.up.weight": "lora_up.weight",
    ".lora_magnitude_vector.weight": "dora_scale", ".lora_magnitude_vector": "dora_scale",
    ".alpha": "alpha",
}
# The pipeline component a name starts with -> the part. A transformer's (FLUX.1, SD3) `transformer.` names are
# diffusers' and PEFT's (SimpleTuner and ai-toolkit write them too); `diffusion_model.` names are the
# original's modules (ComfyUI's model keys, which ai-toolkit's ComfyUI-style files use), Kohya's names with dots.
_DIFFUSERS_COMPONENTS = {"unet.": "unet", "transformer.": "unet", "diffusion_model.": "unet",
                         "text_encoder.": "te", "text_encoder_2.": "te2"}
# The component a diffusers file writes each part under (the denoiser's is the family's `denoiser_part`).
_TEXT_COMPONENTS = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_UNET_CHILDREN = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.",
                  "transformer_blocks.", "single_transformer_blocks.")
# Kohya-style keys (lora_down / lora_up / alpha, LyCORIS tensors) under another prefix, on the denoiser's
# diffusers module path: OneTrainer's `lora_transformer_` and SimpleTuner's LyCORIS `lycoris_` (ComfyUI reads both).
_DENOISER_PREFIXES = (f"{transformer_keys.DIFFUSERS_PART_PREFIX}_", "lycoris_")
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
    tensors = {denoiser_key(k): v for k, v in tensors.items()}
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


def denoiser_key(name: str) -> str:
    """OneTrainer's `lora_transformer_<path>` and SimpleTuner's `lycoris_<path>` -> `lora_unet_<path>` (the path
    with "_" as in Kohya's keys); any other name as it is."""
    for prefix in _DENOISER_PREFIXES:
        if name.startswith(prefix):
            return f"{PREFIXES['unet']}_{name[len(prefix):]}"
    return name


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
    from peft.utils.other import get_pattern_key

    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return
    if not isinstance(config, dict):
        return
    components = {"unet": "unet", **_TEXT_COMPONENTS}
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


def loadable_module_map(model: nn.Module, part: str) -> dict[str, str]:
    """`kohya_module_map` plus, for a U-Net named in SGM's layout (SDXL), the keys of its
    diffusers paths: diffusers/peft files convert to those (`to_kohya_names`), and ComfyUI and
    diffusers read both forms."""
    mapping = kohya_module_map(model, part)
    if part == "unet" and uses_sgm_names(model):
        for path in list(mapping.values()):
            mapping.setdefault(kohya_key(part, path), path)
    return mapping


def to_diffusers_names(tensors: dict[str, torch.Tensor], parts: dict[str, nn.Module],
                       denoiser_component: str) -> dict[str, torch.Tensor]:
    """A Kohya-named LoRA of the model `parts` (`model_parts`) in diffusers' own key style, as its
    `save_lora_weights` writes it: `<component>.<module path>.lora_A.weight` / `.lora_B.weight` with the
    denoiser under `denoiser_component` ("unet", "transformer"), CLIP text encoders under `text_encoder` /
    `text_encoder_2` with transformers 4's `text_model.` (the names diffusers' files carry).

    diffusers' files hold no alpha (its LoRA metadata is optional), so they load at scale 1: the scale
    alpha / rank is baked into lora_A. A transformer's fused modules (FLUX.1's qkv, linear1) are split onto
    diffusers' modules first, as diffusers itself reads Kohya's (`transformer_keys.split_modules`).
    Only plain LoRA / LoCon has this style (peft's DoRA magnitude is another quantity than LyCORIS's)."""
    modules = group_modules(tensors)
    original_names = transformer_keys.names_of(parts["unet"])
    if original_names is not None:
        originals = transformer_keys.kohya_modules(parts["unet"], original_names, outer=True)
        modules = transformer_keys.split_modules(parts["unet"], originals, modules)
    paths = {key: (part, path) for part, model in parts.items() for key, path in loadable_module_map(model, part).items()}
    unmatched = sorted(key for key in modules if key not in paths)
    if unmatched:
        raise UserError(f"{unmatched[0]}: matches no layer of the base model ({len(unmatched)} modules); "
                        f"the adapter was trained for another architecture")
    names = {}
    for key in modules:
        part, path = paths[key]
        names[key] = (f"{denoiser_component}.{path}" if part == "unet"
                      else f"{_TEXT_COMPONENTS[part]}.{nested_text_name(path)}")
    return named_as_diffusers(modules, names)


def named_as_diffusers(modules: dict[str, dict[str, torch.Tensor]], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{kohya key: tensors} -> `<name>.lora_A.weight` = scale * down, `<name>.lora_B.weight` = up, with `names`
    {kohya key: diffusers module name ("transformer.<path>")}: diffusers' files hold no alpha, so the scale
    alpha / rank is baked into lora_A and the file loads at scale 1."""
    out = {}
    for key, module in modules.items():
        if not kinds.is_plain_lora(module):
            raise UserError(f"{key}: a {kinds.module_variant(module)} module has no diffusers key style (it holds "
                            f"LoRA and LoCon only); write it in the kohya format")
        out[f"{names[key]}.lora_A.weight"] = module["lora_down.weight"] * kinds.module_scale(module)
        out[f"{names[key]}.lora_B.weight"] = module["lora_up.weight"]
    return out


def diffusers_module_names(names) -> dict[str, str]:
    """{kohya key: diffusers module name} of a file's tensor names in diffusers' own style (`unet.`, `transformer.`,
    `text_encoder(_2).` with lora_A / lora_B), as `to_kohya_names` reads them; {} for a file in another style.
    Tools that rewrite such a file (resize) write it back in its style with these names."""
    names = list(names)
    second = any(k.startswith(("text_encoder_2.", "base_model.model.text_encoder_2.")) for k in names)
    found = {}
    for name in names:
        module = _diffusers_module(name, second)
        if module is None or module[2] not in ("unet", "transformer", *_TEXT_COMPONENTS.values()):
            return {}
        part, path, component, _ = module
        found[kohya_key(part, path)] = f"{component}.{path}"
    return found
