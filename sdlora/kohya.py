"""Kohya key names and the maths of one adapter module, both ways.

A Kohya key is a prefix plus the module path with every "." turned into "_":

    down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k   (U-Net)
    -> lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k

SDXL's U-Net is named as in Stability's original (SGM) layout, as kohya writes it:
`down_blocks.1.attentions.0...` -> `lora_unet_input_blocks_4_1_...` (`checkpoint.unet_original_paths`).
Text-encoder keys always read `lora_te_text_model_encoder_layers_N_...`: transformers 4
wrapped CLIPTextModel's layers in `text_model`, transformers 5 does not, and every UI
reads the 4.x names. "_" is ambiguous in reverse, so key -> module path goes through a
map built from the model itself (`kohya_module_map`).

Per module, with r the rank and scale = alpha / r (alpha = r when the file has none):

    LoRA   delta W = scale * up @ down          down [r, in(, k, k)], up [out, r(, 1, 1)]
    LoHa   delta W = scale * (w1_a @ w1_b) * (w2_a @ w2_b)   (Hadamard product)
           w*_a [out, r], w*_b [r, in * k * k]; Tucker convs add t1/t2 [r, r, k, k]
           with w*_a [r, out], w*_b [r, in].
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

PREFIXES = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}
TEXT_PARTS = ("te", "te1", "te2")
# Children of CLIPTextTransformer: a flat transformers-5 CLIPTextModel path starts with one.
_TEXT_TRANSFORMER_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def kohya_key(part: str, module_path: str) -> str:
    """Module path as in named_modules() -> Kohya module key (no tensor suffix)."""
    if part not in PREFIXES:
        raise ValueError(f"unknown model part {part!r}; expected one of {', '.join(PREFIXES)}")
    if part in TEXT_PARTS and module_path.startswith(_TEXT_TRANSFORMER_CHILDREN):
        module_path = "text_model." + module_path
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
        from .checkpoint import unet_original_paths

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
    """"lora" or "loha"; anything else (LoKr, diffusers' lora_A/lora_B) is refused by name."""
    if all(s in parts for s in LORA_SUFFIXES):
        return "lora"
    if all(s in parts for s in LOHA_SUFFIXES):
        return "loha"
    if any(s.startswith("lokr_") for s in parts):
        raise UserError("LoKr adapters (lokr_* tensors) are not supported; convert them to LoRA first")
    raise UserError(f"unrecognised adapter module with tensors {sorted(parts)}; expected "
                    f"{' + '.join(LORA_SUFFIXES)} (LoRA) or {' + '.join(LOHA_SUFFIXES)} (LoHa)")


def module_rank(parts: dict[str, torch.Tensor]) -> int:
    if module_kind(parts) == "lora":
        return parts["lora_down.weight"].shape[0]
    return parts["hada_w1_b"].shape[0]


def module_scale(parts: dict[str, torch.Tensor]) -> float:
    """alpha / rank; a module without `.alpha` loads as alpha = rank (scale 1), as in every UI."""
    rank = module_rank(parts)
    alpha = parts.get("alpha")
    return 1.0 if alpha is None else float(alpha) / rank


def module_delta(parts: dict[str, torch.Tensor], weight_shape) -> torch.Tensor:
    """The scaled weight change (fp32) in the base weight's shape [out, in] or [out, in, k, k]."""
    weight_shape = torch.Size(weight_shape)
    kind = module_kind(parts)
    scale = module_scale(parts)
    if kind == "lora":
        down = parts["lora_down.weight"].float()
        up = parts["lora_up.weight"].float()
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise UserError(f"lora_up with a {tuple(up.shape[2:])} kernel is not supported (expected 1x1)")
        # [out, r] @ [r, in*k*k]; the 3x3 kernel rides along in the flattened input axis.
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    elif "hada_t1" in parts:
        t1, t2 = parts["hada_t1"].float(), parts["hada_t2"].float()
        w1 = torch.einsum("ijkl,jr,ip->prkl", t1, parts["hada_w1_b"].float(), parts["hada_w1_a"].float())
        w2 = torch.einsum("ijkl,jr,ip->prkl", t2, parts["hada_w2_b"].float(), parts["hada_w2_a"].float())
        delta = w1 * w2
    else:
        w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
        w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
        delta = w1 * w2
    if delta.shape[0] != weight_shape[0] or delta.numel() != weight_shape.numel():
        raise UserError(f"adapter module of shape {tuple(delta.shape)} does not fit a base weight of shape "
                        f"{tuple(weight_shape)}: the adapter was trained for a different base model")
    return delta.reshape(weight_shape) * scale
