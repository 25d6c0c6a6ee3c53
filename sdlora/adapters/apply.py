"""The one engine that applies adapters to a model: sampling, merging and init-from-adapter use it.

    W = W0 + sum_i w_i * dW_i       dW_i = kinds.module_delta (any kind; DoRA's from W0)

A file's modules are matched to the model's Linear/Conv2d layers by their Kohya keys (an SDXL
U-Net's layers answer to their SGM and their diffusers-path keys; a FLUX.1 file's fused LoRA modules
are split onto diffusers' layers first, `transformer_keys.split_modules`) and every shape is checked
before any weight changes. Then one layer at a time: its sum is accumulated in fp32 from W0 and
written back in the weight's own dtype, so no set of full-size changes is ever held and merging
peaks near the base's own size. A multiplier is a number, or (te, unet) as A1111's
`<lora:name:te:unet>`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sdlora.adapters import keys, kinds, transformer_keys
from sdlora.adapters.file import read_adapter
from sdlora.errors import UserError


def model_layers(parts: dict[str, nn.Module], aliases: bool = True) -> dict[str, nn.Module]:
    """{kohya key: layer} for every Linear/Conv2d of each part ({"unet": ..., "te": ...}, `keys.model_parts`);
    with aliases, an SDXL U-Net's layers under their diffusers-path keys too (`keys.loadable_module_map`)."""
    layers = {}
    module_map = keys.loadable_module_map if aliases else keys.kohya_module_map
    for part, model in parts.items():
        for key, path in module_map(model, part).items():
            layers[key] = model.get_submodule(path)
    return layers


def base_weight(layer: nn.Module) -> nn.Parameter:
    from peft.tuners.tuners_utils import BaseTunerLayer

    # A layer with peft adapters keeps the original one as its base layer.
    return (layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer).weight


def canonical(modules: dict[str, dict], parts: dict[str, nn.Module]) -> tuple[dict[str, dict], list[str]]:
    """(modules under the keys the model names its layers by, the keys that match no layer):
    SDXL files keyed by diffusers paths reach the same layers as SGM-keyed ones."""
    layers = model_layers(parts)
    names = {id(layer): key for key, layer in model_layers(parts, aliases=False).items()}
    matched = {names[id(layers[key])]: module for key, module in modules.items() if key in layers}
    return matched, sorted(k for k in modules if k not in layers)


def read_for_model(path, parts: dict[str, nn.Module]) -> tuple[dict[str, dict], dict[str, str]]:
    """({kohya key as the model names it: tensors}, metadata) of an adapter file whose every module
    matches a layer of the model and fits its weight; otherwise one line naming the file and a module."""
    path = Path(path)
    tensors, metadata = read_adapter(path)
    modules = keys.group_modules(tensors)
    try:
        for module in modules.values():
            kinds.kind_of(module)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    denoiser = parts["unet"]
    names = transformer_keys.names_of(denoiser)
    if names is not None:  # named as the original (FLUX.1): fused modules split onto diffusers' as diffusers does
        originals = transformer_keys.kohya_modules(denoiser, names, outer=True)
        modules = transformer_keys.split_modules(denoiser, originals, modules)
    matched, unmatched = canonical(modules, parts)
    if unmatched:
        trained_for = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "unknown"
        raise UserError(f"{path}: {len(unmatched)} of {len(modules)} adapter modules match no layer of the base "
                        f"model (e.g. {unmatched[:2]}); it was trained for another architecture "
                        f"(file says: {trained_for}). Use the base it was trained on ([model] base)")
    layers = model_layers(parts, aliases=False)
    for key, module in matched.items():
        try:
            kinds.check_shape(module, base_weight(layers[key]).shape)
        except UserError as e:
            raise UserError(f"{path}: {key}: {e}") from None
    return matched, metadata


def part_multiplier(weight: float | tuple[float, float], text_encoder: bool) -> float:
    """An adapter's multiplier on one part: a number is both parts'; (te, unet) is A1111's
    `<lora:name:te:unet>`, te for the text encoder(s), unet for the U-Net."""
    if isinstance(weight, tuple):
        return weight[0] if text_encoder else weight[1]
    return weight


@torch.no_grad()
def set_weight(weight: torch.Tensor, original: torch.Tensor, changes) -> None:
    """weight = W0 + sum w * module_delta for (module tensors, w) in `changes`, summed in fp32 from
    W0 = `original` and written in the weight's dtype (weight 0: W0 exactly)."""
    base = original.to(weight.device)
    merged = base.to(torch.float32, copy=True)  # never an alias of W0
    for module, w in changes:
        if w:
            merged += w * kinds.module_delta(module, weight.shape, base)
    weight.copy_(merged.to(weight.dtype))


def merge_files(parts: dict[str, nn.Module], adapters: list[tuple[Path, float]]) -> dict[str, int]:
    """Bake adapter files into the model in place, one layer at a time: W = W0 + sum multiplier * dW.

    Returns {adapter path: modules merged}. Every file is read and checked first, so a module that
    matches no layer, or does not fit, leaves the model unchanged.
    """
    files = [(path, multiplier, read_for_model(path, parts)[0]) for path, multiplier in adapters]
    layers = model_layers(parts, aliases=False)
    touched = dict.fromkeys(key for _, _, modules in files for key in modules)
    for key in touched:
        in_text_encoder = keys.part_of(key) in keys.TEXT_PARTS
        weight = base_weight(layers[key])
        set_weight(weight, weight, [(modules[key], part_multiplier(m, in_text_encoder))
                                    for _, m, modules in files if key in modules])
    return {str(path): len(modules) for path, _, modules in files}


class Patcher:
    """Adapters merged into the weights and taken out again (A1111's way): W = W0 + sum_i w_i * dW_i.

    W0 waits on the CPU (as A1111 keeps its backups) and each dW_i is formed when its layer is
    set, from the adapter's factors, so no set of full-size deltas is ever held at once.
    An adapter is anything with `modules` ({kohya key as the model names it: tensors}).
    """

    def __init__(self, parts: dict[str, nn.Module]):
        self.layers = model_layers(parts, aliases=False)
        self.originals: dict[str, torch.Tensor] = {}  # kohya key -> W0 on the CPU
        self.modules: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # id(adapter) -> kohya key -> tensors

    def add(self, adapter) -> None:
        modules = {}
        for key, module in adapter.modules.items():
            weight = base_weight(self.layers[key])
            self.originals.setdefault(key, weight.detach().to("cpu", copy=True))
            modules[key] = {name: t.to(weight.device) for name, t in module.items()}
        self.modules[id(adapter)] = modules

    def remove(self, adapter) -> None:
        self.modules.pop(id(adapter), None)

    def apply(self, weights: dict[int, float | tuple[float, float]]) -> None:
        """Set every patched weight to W0 + sum of the weighted deltas (weight 0: W0 exactly)."""
        for key, original in self.originals.items():
            in_text_encoder = keys.part_of(key) in keys.TEXT_PARTS
            set_weight(base_weight(self.layers[key]), original,
                       [(modules[key], part_multiplier(weights.get(adapter_id, 0.0), in_text_encoder))
                        for adapter_id, modules in self.modules.items() if key in modules])

    @torch.no_grad()
    def restore(self) -> None:
        """Put every patched weight back to W0 (the base model as loaded)."""
        for key, original in self.originals.items():
            base_weight(self.layers[key]).copy_(original)
        self.originals.clear()
        self.modules.clear()
