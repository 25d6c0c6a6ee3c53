"""LoRA / LoCon / LoHa / LoKr (and DoRA) adapters: choose target modules, inject them with peft, export and
import their tensors in the Kohya format (the one A1111, Forge, ComfyUI, InvokeAI and diffusers read),
and state the Kohya (`ss_*`) and model-spec metadata; `file.save_adapter` writes the file.

    g(x) = W x + (alpha / dim) * up(down(x))      up starts at zero: injection is the identity

peft holds the adapters during training (lora_A = Kohya's lora_down, lora_B = lora_up;
LoHa's hada_* and LoKr's lokr_* parameters have LyCORIS's names and shapes); `keys` names
them and each kind's unit (`kinds`) finds its tensors in the peft layer. DoRA (peft `use_dora`)
exports its magnitude as LyCORIS's `dora_scale` [out, 1(, 1, 1)] (the per-output-row layout
diffusers also loads): W' = m * (W0 + s B A) / ||W0 + s B A||_row.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sdlora import kohya_blocks
from sdlora.adapters import apply, keys, kinds, transformer_keys
from sdlora.data.buckets import resolution_pair
from sdlora.errors import UserError
from sdlora.models.families import FAMILIES

ADAPTER_NAME = "sdlora"

# Kohya's target containers (networks/lora.py): every Linear and 1x1 Conv2d inside them
# gets `dim`; 3x3 convs inside the ResNet containers get `conv_dim` (LoCon).
# FLUX.1's double- and single-stream blocks (kohya's DoubleStreamBlock / SingleStreamBlock) and SD3's
# joint blocks (kohya's SingleDiTBlock pairs, context_block and x_block) likewise.
TRANSFORMER_BLOCKS = ("Transformer2DModel", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                      "JointTransformerBlock")
RESNET_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# kohya's TEXT_ENCODER_TARGET_REPLACE_MODULE (lora_flux.py, lora_sd3.py): CLIP's attention and MLP, T5's
# self-attention (q, k, v, o) and gated feed-forward (wi_0, wi_1, wo).
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")
_ATTENTION_LAYERS = r"(to_q|to_k|to_v|to_out\.0)"
_PRESET_PATTERNS = {
    "attn2": re.compile(rf"\.attn2\.{_ATTENTION_LAYERS}$"),
    "attention": re.compile(rf"\.attn[12]\.{_ATTENTION_LAYERS}$"),
}


# ---------------------------------------------------------------------------------------------
# Which modules are adapted


def _layers_inside(model: nn.Module, block_classes: tuple[str, ...]) -> dict[str, nn.Module]:
    """{path: layer} for every Linear / Conv2d inside a module whose class is in block_classes."""
    layers: dict[str, nn.Module] = {}
    for block_path, block in model.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for sub_path, layer in block.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                layers[f"{block_path}.{sub_path}" if block_path else sub_path] = layer
    return layers


def _is_spatial_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def unet_target_paths(unet: nn.Module, preset: str, convs: bool = False) -> list[str]:
    """Module paths adapted in the U-Net, in named_modules() order.

    attn2: cross-attention q/k/v/out; attention: self- and cross-attention q/k/v/out;
    transformer (Kohya's default): every Linear and 1x1 conv inside each Transformer2DModel;
    all (or `convs`, LoCon): transformer plus every layer of the ResNet blocks and the
    down/upsamplers, 3x3 convs included (Kohya's `conv_dim`).
    """
    if preset not in ("attn2", "attention", "transformer", "all"):
        raise UserError(f"[network] unet_targets = {preset!r}: choose attn2, attention, transformer or all")
    layers = _layers_inside(unet, TRANSFORMER_BLOCKS)
    layers = {p: m for p, m in layers.items() if not _is_spatial_conv(m)}
    if preset in _PRESET_PATTERNS:
        layers = {p: m for p, m in layers.items() if _PRESET_PATTERNS[preset].search(p)}
    if preset == "all" or convs:
        layers.update(_layers_inside(unet, RESNET_BLOCKS))
    order = {path: i for i, (path, _) in enumerate(unet.named_modules())}
    return sorted(layers, key=order.__getitem__)


def text_encoder_target_paths(text_encoder: nn.Module) -> list[str]:
    """q/k/v/out_proj and mlp fc1/fc2 of every CLIP layer (Kohya's CLIPAttention + CLIPMLP); of T5,
    SelfAttention q/k/v/o and DenseReluDense wi_0/wi_1/wo of every block."""
    return list(_layers_inside(text_encoder, TEXT_ENCODER_BLOCKS))


# ---------------------------------------------------------------------------------------------
# Injection


def network_ranks(net, block: int | None = None) -> tuple[int, float, int, float]:
    """(dim, alpha, conv_dim, conv_alpha) of a [network] config with Kohya's defaults: alpha 0 means
    alpha = dim; conv_dim 0 means dim; conv_alpha 0 means conv_dim / 2.

    block: a U-Net block's (`kohya_blocks.block_index`), where network.block_dims / block_alphas /
    conv_block_dims / conv_block_alphas replace dim, alpha, conv_dim, conv_alpha when set."""
    pick = lambda values, default: values[block] if block is not None and values else default  # noqa: E731
    dim = pick(net.block_dims, net.dim)
    conv_dim = pick(net.conv_block_dims, net.conv_dim or net.dim)
    return (dim, pick(net.block_alphas, net.alpha or dim), conv_dim,
            pick(net.conv_block_alphas, net.conv_alpha or conv_dim / 2))


def unet_block_plan(network_cfg, unet: nn.Module, paths: list[str], log=print) -> tuple[dict, dict, list | None]:
    """kohya's block-wise [network] settings on the U-Net modules `paths`: ({path: (dim, alpha)} of the
    modules to create, {path: block}, one lr weight per block or None). A module whose block has
    rank 0, or an lr weight of 0 (at or below block_lr_zero_threshold), is not created, as in kohya."""
    sgm = keys.uses_sgm_names(unet)
    kohya_blocks.check_block_lengths(network_cfg, sgm)
    lr_weights = kohya_blocks.block_lr_weights(network_cfg, sgm, log)
    modules = dict(unet.named_modules())
    ranks, block_of = {}, {}
    for key, path in keys.module_keys(unet, "unet", paths).items():
        block = kohya_blocks.block_index(key, sgm)
        dim, alpha, conv_dim, conv_alpha = network_ranks(network_cfg, block)
        rank = (conv_dim, conv_alpha) if _is_spatial_conv(modules[path]) else (dim, alpha)
        if rank[0] and (lr_weights is None or lr_weights[block]):
            ranks[path], block_of[path] = rank, block
    return ranks, block_of, lr_weights


def text_encoder_lrs(cfg, base) -> list[float]:
    """The learning rate of each text encoder of `base` (BaseModel or dict with family and name), from
    train.text_encoder_lr: one rate, or one per encoder in the family's order (SDXL [te1, te2], FLUX.1
    [clip_l, t5]; a list of one is that rate for all, as kohya reads it); every one 0 when
    network.train_text_encoder is false, and T5's 0 unless network.train_t5 (kohya creates T5 adapters
    only with train_t5xxl). A text encoder is trained when its rate here is > 0: the adapters, the
    optimizer groups, the trainer and the metadata all read this list."""
    lr = cfg.train.text_encoder_lr
    slots = FAMILIES[_get(base, "family")].text_encoders
    count = len(slots)
    if cfg.network.train_t5 and not any(slot.name == "t5" for slot in slots):
        raise UserError(f"{cfg.source or 'config'}: [network] train_t5 = true: {_get(base, 'name')} has no T5 "
                        "text encoder; set train_t5 = false")
    if cfg.network.train_t5 and not cfg.network.train_text_encoder:
        raise UserError(f"{cfg.source or 'config'}: [network] train_t5 = true adds T5 to the trained text encoders, "
                        "but train_text_encoder = false trains none; set train_text_encoder = true (and "
                        "text_encoder_lr = [0, rate] for T5 alone) or train_t5 = false")
    if isinstance(lr, list) and len(lr) not in (1, count):
        order = f" or a pair [te1, te2]" if count == 2 and not slots[0].name else (
            f" or one per encoder [{', '.join(slot.name for slot in slots)}]" if count > 1 else "")
        raise UserError(f"{cfg.source}: [train] text_encoder_lr = {lr}: {_get(base, 'name')} has {count} text "
                        f"encoder(s); give one learning rate{order}")
    lrs = [float(x) for x in lr] * (count if len(lr) == 1 else 1) if isinstance(lr, list) else [float(lr)] * count
    if not cfg.network.train_text_encoder:
        return [0.0] * count
    return [0.0 if slot.name == "t5" and not cfg.network.train_t5 else rate for slot, rate in zip(slots, lrs)]


def text_dropout_rates(cfg, base) -> list[float]:
    """The probability that an example's outputs of each text encoder of `base` are zeros: [train]
    <name>_dropout_rate of the encoder's `TextEncoderSlot.name` (kohya's sd3 strategy: a dropped
    encoder's hidden states and pooled output are zeros, not an empty caption's); a rate for an
    encoder the family lacks is refused."""
    train, family = cfg.train, FAMILIES[_get(base, "family")]
    rates = {"clip_l": train.clip_l_dropout_rate, "clip_g": train.clip_g_dropout_rate, "t5": train.t5_dropout_rate}
    names = [slot.name for slot in family.text_encoders]
    for name, rate in rates.items():
        if rate and (name not in names or not family.per_encoder_text):
            has = f"its text encoders are {', '.join(names)}" if all(names) and family.per_encoder_text else \
                "it drops no encoder apart; use [dataset] caption_dropout_rate"
            raise UserError(f"{cfg.source or 'config'}: [train] {name}_dropout_rate = {rate:g}: {_get(base, 'name')} "
                            f"({family.title}) has no {name} text encoder ({has}); set {name}_dropout_rate = 0")
    return [rates[name] if name else 0.0 for name in names]


@dataclass(frozen=True)
class Settings:
    """[network] and [train] values as a training uses them, resolved once (`resolve_settings`) when the
    config and the base are known: Kohya's rank defaults applied (`network_ranks`) and one learning
    rate per text encoder of the base (`text_encoder_lrs`). The trainer resolves them and hands them
    to injection, the metadata, the report and the guards."""

    dim: int
    alpha: float
    conv_dim: int
    conv_alpha: float
    text_encoder_lrs: tuple[float, ...]
    text_dropout_rates: tuple[float, ...] = ()  # per text encoder (`text_dropout_rates`)

    @property
    def ranks(self) -> tuple[int, float, int, float]:
        """(dim, alpha, conv_dim, conv_alpha), as `network_ranks` gives them."""
        return self.dim, self.alpha, self.conv_dim, self.conv_alpha

    @property
    def trains_text_encoder(self) -> bool:
        return any(lr > 0 for lr in self.text_encoder_lrs)


def resolve_settings(cfg, base) -> Settings:
    return Settings(*network_ranks(cfg.network), tuple(text_encoder_lrs(cfg, base)),
                    tuple(text_dropout_rates(cfg, base)))


def _peft_config(network_cfg, paths: list[str], model: nn.Module, defaults: tuple[int, float, int, float],
                 ranks: dict | None = None):
    """The kind's peft config (`kinds.*.peft_config`) with explicit full paths; spatial convs get conv_dim /
    conv_alpha, or each path its (dim, alpha) from `ranks` (block-wise settings); defaults: the
    [network]'s (dim, alpha, conv_dim, conv_alpha) with Kohya's defaults applied."""
    dim, alpha, conv_dim, conv_alpha = defaults
    if ranks is None:
        modules = dict(model.named_modules())
        ranks = {p: (conv_dim, conv_alpha) for p in paths if _is_spatial_conv(modules[p])}
    rank_pattern = {re.escape(p): r for p, (r, _) in ranks.items()}
    alpha_pattern = {re.escape(p): a for p, (_, a) in ranks.items()}
    kind = kinds.for_network_type(network_cfg.type)
    if network_cfg.dora and not kind.DORA:
        raise UserError(f"[network] dora = true needs type lora or locon (peft has DoRA for LoRA only), "
                        f"not {network_cfg.type!r}")
    return kind.peft_config(network_cfg, dim, alpha, paths, rank_pattern, alpha_pattern)


@dataclass
class Network:
    """The adapters injected into a U-Net and text encoder(s), seen through Kohya's names."""

    kind: str  # "lora" (LoCon and DoRA included), "loha" or "lokr"
    models: dict[str, nn.Module]  # part ("unet", "te", "te1", "te2") -> model
    modules: dict[str, tuple[str, str]]  # kohya key -> (part, module path)
    frozen_parts: set[str] = field(default_factory=set)
    unet_blocks: dict[str, int] = field(default_factory=dict)  # kohya key -> block, with block lr weights only
    block_lr_weights: list[float] | None = None  # network.*_lr_weight, one per U-Net block
    # A transformer named as in its original (FLUX.1): Kohya key -> the diffusers modules it covers, whose
    # adapters `modules` holds under their diffusers paths; files hold them fused (`transformer_keys`).
    original_names: dict[str, transformer_keys.KohyaModule] = field(default_factory=dict)
    # The text parts in the family's order, the order of `text_encoder_lrs` (FLUX.1: te1 CLIP-L, te3 T5);
    # empty: the adapted ones, "te" or te1, te2.
    text_order: tuple[str, ...] = ()

    def layer(self, key: str) -> nn.Module:
        part, path = self.modules[key]
        return self.models[part].get_submodule(path)

    def exported_keys(self) -> list[str]:
        """Keys of the trained modules: those of a part frozen by param_groups are left out."""
        return [key for key, (part, _) in self.modules.items() if part not in self.frozen_parts]

    def _adapter_params(self, key: str) -> dict[str, nn.Parameter]:
        return kinds.named(self.kind).peft_tensors(self.layer(key), ADAPTER_NAME)

    def _file_factor(self, key: str, suffix: str) -> float:
        """What a tensor is multiplied by in the file (the kind's `file_factor`; peft's scale alpha / r)."""
        scale = self._alpha(key) / self.layer(key).r[ADAPTER_NAME]
        return kinds.named(self.kind).file_factor(suffix, self._adapter_params(key), scale)

    def _file_shape(self, key: str, suffix: str, param: torch.Tensor) -> tuple[int, ...]:
        """LyCORIS's layouts: dora_scale [out, 1] or [out, 1, 1, 1]; everything else as peft holds it."""
        if suffix == "dora_scale":
            return (param.numel(), *[1] * (self.layer(key).get_base_layer().weight.dim() - 1))
        return tuple(param.shape)

    def _alpha(self, key: str) -> float:
        return kinds.named(self.kind).peft_alpha(self.layer(key), ADAPTER_NAME)

    def parameters_of(self, part: str) -> list[nn.Parameter]:
        return [p for key, (pt, _) in self.modules.items() if pt == part for p in self._adapter_params(key).values()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for key in self.modules for p in self._adapter_params(key).values() if p.requires_grad]

    def param_groups(self, unet_lr: float, text_encoder_lrs: list[float]) -> list[dict]:
        """Optimizer groups; a part whose learning rate is 0 is frozen, left out and not exported.

        text_encoder_lrs: one rate per text encoder (`text_encoder_lrs`: [te], SDXL's [te1, te2], FLUX.1's
        [te1, te3] = [clip_l, t5])."""
        groups = []
        order = list(self.text_order) or [part for part in self.models if part != "unet"]
        for part in self.models:
            lr = unet_lr if part == "unet" else text_encoder_lrs[order.index(part)]
            params = self.parameters_of(part)
            if lr == 0:
                for p in params:
                    p.requires_grad_(False)
                self.frozen_parts.add(part)
                continue
            self.frozen_parts.discard(part)
            if part == "unet" and self.block_lr_weights is not None:
                groups += self._block_groups(lr)
                continue
            name = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder_1", "te2": "text_encoder_2",
                    "te3": "text_encoder_3"}[part]
            groups.append({"params": params, "lr": lr, "name": name})
        if not groups:
            raise UserError("[train] unet_lr and text_encoder_lr are both 0: nothing would be trained")
        return groups

    def _block_groups(self, unet_lr: float) -> list[dict]:
        """One group per U-Net block that has modules, at unet_lr x its weight, named as kohya names them."""
        by_block: dict[int, list[nn.Parameter]] = {}
        for key, block in self.unet_blocks.items():
            by_block.setdefault(block, []).extend(self._adapter_params(key).values())
        return [{"params": by_block[b], "lr": unet_lr * self.block_lr_weights[b], "name": f"unet_block{b}"}
                for b in sorted(by_block)]

    def freeze_text_layers(self, part: str, layers: range) -> list[str]:
        """Stop training the adapters of text-encoder layers `layers` of `part` (they stay exported); returns their keys."""
        frozen = []
        for key, (p, path) in self.modules.items():
            match = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
            if p == part and match and int(match[1]) in layers:
                for param in self._adapter_params(key).values():
                    param.requires_grad_(False)
                frozen.append(key)
        return frozen

    def module_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """One module's tensors as the file holds them (fp32, on the adapter's device), `alpha` included."""
        tensors = {suffix: (param.detach().float() * self._file_factor(key, suffix)).reshape(
            self._file_shape(key, suffix, param)) for suffix, param in self._adapter_params(key).items()}
        return tensors | {"alpha": torch.tensor(self._alpha(key))}

    def kohya_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """`<key>.lora_down.weight`, `<key>.lora_up.weight` (LoHa: `.hada_*`, LoKr: `.lokr_*`; DoRA: + `.dora_scale`),
        `<key>.alpha` (0-dim)."""
        if self.original_names:
            return self._original_state_dict(dtype)
        return {f"{key}.{suffix}": tensor.to("cpu", dtype) for key in self.exported_keys()
                for suffix, tensor in self.module_tensors(key).items()}

    def _diffusers_keys(self) -> dict[str, str]:
        """{diffusers module path: our key} of the denoiser's adapters."""
        return {path: key for key, (part, path) in self.modules.items() if part == "unet"}

    def _original_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The Kohya state dict of a transformer named as its original: each original module's adapter
        stacked from its diffusers parts' where the kind stacks exactly, else per part under ComfyUI's
        names (`transformer_keys.export_modules`), then the text encoders' as they are."""
        exported, key_of = set(self.exported_keys()), self._diffusers_keys()
        out = {}
        for module in self.original_names.values():
            if key_of[module.paths[0]] not in exported:
                continue
            parts = [self.module_tensors(key_of[path]) for path in module.paths]
            out |= {f"{key}.{suffix}": tensor.to("cpu", dtype)
                    for key, tensors in transformer_keys.export_modules(module, parts).items()
                    for suffix, tensor in tensors.items()}
        return out | {f"{key}.{suffix}": tensor.to("cpu", dtype) for key in exported if self.modules[key][0] != "unet"
                      for suffix, tensor in self.module_tensors(key).items()}

    def _diffusers_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A Kohya state dict of this network with the original's names -> its diffusers parts' keys
        (`transformer_keys.split_modules`, the inverse of `_original_state_dict`)."""
        modules = transformer_keys.split_modules(self.models["unet"], self.original_names,
                                                 keys.group_modules({keys.denoiser_key(k): t for k, t in tensors.items()}))
        return {f"{key}.{suffix}": t for key, parts in modules.items() for suffix, t in parts.items()}

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """kohya's max-norm regularisation (scale_weight_norms): each module still learning whose weight change
        dW = (alpha / r) * update (kinds.module_update; for DoRA the update inside the decomposition,
        as LyCORIS) has ||dW||_F > max_norm is scaled to max_norm. dW is multilinear in the module's n
        factors (LoRA: up, down; LoHa: four; LoKr: two to five), so each is multiplied by ratio^(1/n).

        Returns kohya's figures: (modules scaled, mean and max of the norms after scaling)."""
        scaled, norms = 0, []
        for key in self.exported_keys():
            if not any(p.requires_grad for p in self._adapter_params(key).values()):
                continue  # no longer learning (stop_text_encoder_training, unread text layers): left as it is
            parts = self.module_tensors(key)
            parts.pop("dora_scale", None)  # DoRA's magnitude is not part of dW
            base = self.layer(key).get_base_layer()
            # a quantize.QuantizedLayer says its shape: reading its .weight would dequantise it
            norm = kinds.module_update(parts, getattr(base, "shape", None) or base.weight.shape).norm()
            clamped = norm.clamp(min=max_norm / 2)  # kohya's guard: no division by a near-zero norm
            ratio = float(clamped.clamp(max=max_norm) / clamped)
            if ratio != 1:
                scaled += 1
                factors = [p for suffix, p in self._adapter_params(key).items() if suffix != "dora_scale"]
                for p in factors:
                    p.mul_(ratio ** (1 / len(factors)))
            norms.append(float(norm) * ratio)
        return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a Kohya state dict of the same network into the adapters (resume, init_weights), its
        modules matched to the layers as the adapters' engine matches them (`apply.canonical`)."""
        if self.original_names:
            tensors = self._diffusers_state_dict(tensors)
        groups, unmatched = apply.canonical(keys.group_modules(tensors), self.models)
        expected = set(self.exported_keys())
        unknown, missing = sorted(set(unmatched) | (set(groups) - expected)), sorted(expected - set(groups))
        if unknown or missing:
            raise UserError(f"the adapter does not match this network ({self.kind}, {len(expected)} modules): "
                            f"{len(unknown)} unexpected modules (e.g. {unknown[:3]}), {len(missing)} missing "
                            f"(e.g. {missing[:3]}); use the same [network] type, unet_targets and "
                            f"train_text_encoder as the run that wrote it")
        for key, parts in groups.items():
            if kinds.module_kind(parts) != self.kind:
                raise UserError(f"{key}: the adapter is {kinds.module_kind(parts)}, this network is {self.kind}")
            if "alpha" not in parts:
                # Scale 1 (diffusers' files bake theirs into lora_A): the same change at this network's scale
                # alpha / rank, with one factor divided by that scale.
                factor = next(suffix for suffix in self._adapter_params(key) if suffix != "dora_scale")
                if factor in parts:
                    parts = {**parts, factor: parts[factor] * (kinds.module_rank(parts) / self._alpha(key))}
            alpha = float(parts["alpha"]) if "alpha" in parts else self._alpha(key)
            if abs(alpha - self._alpha(key)) > 1e-3 * max(1.0, alpha):
                raise UserError(f"{key}: alpha {alpha:g} in the adapter, {self._alpha(key):g} in [network]; "
                                f"set network.alpha / conv_alpha to the adapter's values")
            with torch.no_grad():
                for suffix, param in self._adapter_params(key).items():
                    if suffix not in parts or parts[suffix].shape != self._file_shape(key, suffix, param):
                        found = tuple(parts[suffix].shape) if suffix in parts else "missing"
                        raise UserError(f"{key}.{suffix}: shape {found} in the adapter, "
                                        f"{self._file_shape(key, suffix, param)} here; set network.dim / conv_dim "
                                        f"(and dora) to the adapter's")
                    param.copy_(parts[suffix].reshape(param.shape) / self._file_factor(key, suffix))


def inject(unet: nn.Module, text_encoder, network_cfg, log=print, settings: Settings | None = None,
           text_order: tuple[str, ...] = ()) -> Network:
    """Freeze the base models and add adapters (peft, adapter name "sdlora") per `network_cfg`.

    `text_encoder` is one model, a (te1, te2) pair (SDXL) or None; text-encoder adapters are
    created only when network_cfg.train_text_encoder is true. Or {part: model} (`keys.text_parts`) of
    exactly the encoders to adapt, with `text_order` the family's parts in order (FLUX.1: CLIP-L te1,
    and T5 te3 only when it trains, as kohya creates them). settings: the training's resolved
    `Settings` (None: the ranks are resolved here from network_cfg).
    """
    from peft import inject_adapter_in_model

    defaults = settings.ranks if settings else network_ranks(network_cfg)

    if isinstance(text_encoder, dict):
        text_encoders, names = list(text_encoder.values()), list(text_encoder)
    else:
        text_encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        text_encoders = [te for te in text_encoders if te is not None]
        names = ["te"] if len(text_encoders) == 1 else [f"te{i + 1}" for i in range(len(text_encoders))]
        if not network_cfg.train_text_encoder:
            names = []
    for te in text_encoders:
        te.requires_grad_(False)  # the base is never trained, adapted or not
    models: dict[str, nn.Module] = {"unet": unet}
    models.update(zip(names, text_encoders))
    modules: dict[str, tuple[str, str]] = {}
    ranks, block_of, lr_weights = None, {}, None
    for part, model in models.items():
        model.requires_grad_(False)
        if part == "unet":
            paths = unet_target_paths(model, network_cfg.unet_targets, convs=kinds.adapts_convs(network_cfg.type))
            paths = _selected_blocks(model, network_cfg, paths)
        else:
            paths = text_encoder_target_paths(model)
        if not paths:
            raise UserError(f"[network] unet_targets = {network_cfg.unet_targets!r} selects no module of the "
                            f"{type(model).__name__} ({part}); is it a Stable Diffusion model?")
        if part == "unet" and kohya_blocks.uses_blocks(network_cfg):
            ranks, block_of, lr_weights = unet_block_plan(network_cfg, model, paths, log)
            paths = [p for p in paths if p in ranks]
            if not paths:
                raise UserError("[network] block_dims / *_lr_weight leave no U-Net block with adapters: give some "
                                "block a rank above 0 and a weight above block_lr_zero_threshold")
        config = _peft_config(network_cfg, paths, model, defaults, ranks if part == "unet" else None)
        if part == "unet":
            model.add_adapter(config, adapter_name=ADAPTER_NAME)  # diffusers' own path: set_adapters etc. work
        else:
            # transformers' add_adapter wants a newer peft; diffusers' own text-encoder loader
            # injects with peft directly, as here.
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        modules.update({key: (part, path) for key, path in keys.module_keys(model, part, paths).items()})
    blocks_by_key = {key: block_of[path] for key, (part, path) in modules.items() if part == "unet" and block_of}
    network = Network(kind=kinds.for_network_type(network_cfg.type).NAME, models=models,
                      modules=modules, unet_blocks=blocks_by_key if lr_weights else {}, block_lr_weights=lr_weights,
                      text_order=tuple(text_order))
    names = transformer_keys.names_of(unet)
    if names is not None:
        network.original_names = _original_names(unet, names, network_cfg, set(modules.values()))
    return network


def _selected_blocks(denoiser: nn.Module, network_cfg, paths: list[str]) -> list[str]:
    """`paths` less the transformer blocks' modules that [network] train_blocks, train_*_block_indices and
    train_modulation leave out (`transformer_keys.unselected_paths`); a U-Net has no such blocks."""
    names = transformer_keys.names_of(denoiser)
    if names is None:
        if transformer_keys.selects_blocks(network_cfg):
            raise UserError("[network] train_blocks, train_double_block_indices, train_single_block_indices, "
                            "train_block_indices and train_modulation choose transformer blocks (FLUX.1, SD3.x); "
                            "this base is a U-Net: leave them at their defaults")
        return paths
    left_out = transformer_keys.unselected_paths(denoiser, names, network_cfg)
    selected = [p for p in paths if p not in left_out]
    if paths and not selected:
        raise UserError("[network] train_blocks / train_double_block_indices / train_single_block_indices / "
                        "train_block_indices select no transformer block: name at least one")
    return selected


def _original_names(transformer: nn.Module, names, network_cfg, adapted: set[tuple[str, str]]) -> dict:
    """{Kohya key: KohyaModule} of the adapted modules of a transformer named as its original; every part
    of a fused module must be adapted."""
    modules = {k: m for k, m in transformer_keys.kohya_modules(transformer, names, outer=True).items()
               if any(("unet", p) in adapted for p in m.paths)}
    partial = [k for k, m in modules.items() if not all(("unet", p) in adapted for p in m.paths)]
    if partial:
        raise UserError(f"[network] unet_targets = {network_cfg.unet_targets!r} adapts part of the fused module(s) "
                        f"{', '.join(partial[:3])}; use unet_targets = \"transformer\" (kohya's default)")
    return modules


# ---------------------------------------------------------------------------------------------
# Metadata


def _get(base, name: str):
    return base[name] if isinstance(base, dict) else getattr(base, name)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


def one_or_dynamic(values, fmt=str) -> str:
    """The one value every module shares, as text, or Kohya's "dynamic" when they differ."""
    distinct = sorted(set(values))
    return fmt(distinct[0]) if len(distinct) == 1 else "dynamic"


def network_fields(dim: str, alpha: str, algo: str | None = None, dora: bool = False,
                   args: dict | None = None) -> dict[str, str]:
    """The `ss_network_*` fields of an adapter file, however it was made (trained, extracted, resized,
    converted). A plain LoRA / LoCon is Kohya's own "networks.lora"; a LyCORIS algorithm (`algo`:
    loha, lokr, ...) or DoRA is "lycoris.kohya" with `algo` in the args (DoRA rides on LyCORIS's
    locon unless `algo` says otherwise) and `dora_wd`; `args` follow (conv_dim, dropout, ...)."""
    if dora and algo is None:
        algo = "locon"
    network_args = ({"algo": algo} if algo else {}) | ({"dora_wd": "True"} if dora else {}) | (args or {})
    return {
        "ss_network_module": "lycoris.kohya" if algo else "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(network_args),
    }


def network_metadata(base, output_name: str, network: dict[str, str], description: str,
                     finished: float | None = None) -> dict[str, str]:
    """What every adapter file states however it was made (trained, extracted): its network
    (`network_fields`), its base model and Stability's `modelspec.*`; every value a string.

    base: a BaseModel or dict with family, prediction_type, name, model_hash; finished: unix seconds.
    """
    family = _get(base, "family")
    if family not in FAMILIES:
        raise ValueError(f"adapter_metadata: unknown base family {family!r}; expected one of {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    prediction = spec.modelspec_prediction_type(_get(base, "prediction_type"))
    return {
        **network,
        "ss_base_model_version": spec.base_model_version,
        "ss_v2": str(spec.ss_v2),
        "ss_output_name": output_name,
        "ss_sd_model_name": str(_get(base, "name")),
        "ss_new_sd_model_hash": str(_get(base, "model_hash") or ""),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{spec.architecture}/lora",
        "modelspec.implementation": spec.implementation,
        "modelspec.title": output_name,
        "modelspec.date": _iso(time.time() if finished is None else finished),
        **({} if prediction is None else {"modelspec.prediction_type": prediction}),
        "modelspec.description": description,
    }


def adapter_metadata(cfg, base, stats: dict, tag_frequency: dict | None = None, dataset_dirs: dict | None = None,
                     thumbnail: str | None = None, settings: Settings | None = None) -> dict[str, str]:
    """Kohya `ss_*` and Stability `modelspec.*` metadata; every value a string.

    cfg: the Config; base: a BaseModel or dict with family, prediction_type, name, model_hash;
    stats: num_train_images, num_epochs, epoch, steps, and optionally max_train_steps,
    num_batches_per_epoch, training_started_at / training_finished_at (unix seconds),
    session_id, optimizer (its description); tag_frequency: {dataset dir basename: {tag: n}};
    dataset_dirs: {basename: {"n_repeats": n, "img_count": n}}; thumbnail: a data: URL.
    """
    missing = [k for k in ("num_train_images", "num_epochs", "epoch", "steps") if k not in stats]
    if missing:
        raise ValueError(f"adapter_metadata: stats lacks {', '.join(missing)}")
    net, train, data = cfg.network, cfg.train, cfg.dataset
    width, height = resolution_pair(data.resolution)
    settings = settings or resolve_settings(cfg, base)
    alpha, conv_dim, conv_alpha = settings.alpha, settings.conv_dim, settings.conv_alpha
    network_args = {}
    if kinds.writes_conv_args(net.type) or net.unet_targets == "all":
        network_args.update(conv_dim=str(conv_dim), conv_alpha=f"{conv_alpha:g}")
    if net.dropout:
        network_args["dropout"] = f"{net.dropout:g}"
    network_args.update(kohya_blocks.kohya_args(net))  # block_dims, down_lr_weight, ... as kohya spells them
    network_args.update(kohya_blocks.selection_args(net))  # train_blocks, ... as lora_flux spells them
    names = transformer_keys.NAMES_BY_CLASS.get(FAMILIES[_get(base, "family")].denoiser_class)
    if names is not None and not net.train_modulation:
        network_args.update(dict.fromkeys(names.modulation_args, "0"))
    if net.train_t5 and any(settings.text_encoder_lrs):
        network_args["train_t5xxl"] = "True"  # lora_flux / lora_sd3's network_args
    now = time.time()
    started, finished = stats.get("training_started_at", now), stats.get("training_finished_at", now)
    te_lrs = settings.text_encoder_lrs
    description = (f"{net.type} (dim {net.dim}, alpha {alpha:g}) trained by sdlora on "
                   f"{stats['num_train_images']} images, {stats['steps']} steps")
    algo = kinds.for_network_type(net.type).LYCORIS_ALGO  # LoRA and LoCon are Kohya's own networks.lora
    network = network_fields(str(net.dim), f"{alpha:g}", algo, net.dora, network_args)
    meta = network_metadata(base, cfg.output_name, network, description, finished)
    meta |= {
        "ss_network_dropout": f"{net.dropout:g}",
        "ss_network_train_unet_only": str(not any(te_lrs)),
        "ss_resolution": f"({width}, {height})",
        "ss_clip_skip": str(cfg.model.clip_skip),
        "ss_num_train_images": str(stats["num_train_images"]),
        "ss_num_epochs": str(stats["num_epochs"]),
        "ss_epoch": str(stats["epoch"]),
        "ss_steps": str(stats["steps"]),
        "ss_max_train_steps": str(stats.get("max_train_steps", stats["steps"])),
        "ss_num_batches_per_epoch": str(stats.get("num_batches_per_epoch", "")),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_learning_rate": f"{train.unet_lr:g}",
        "ss_unet_lr": f"{train.unet_lr:g}",
        # one rate, or SDXL's two when they differ
        "ss_text_encoder_lr": ", ".join(f"{lr:g}" for lr in (te_lrs if len(set(te_lrs)) > 1 else te_lrs[:1])),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(stats.get("lr_warmup_steps", "")),
        "ss_optimizer": str(stats.get("optimizer", train.optimizer)),
        "ss_max_grad_norm": f"{train.max_grad_norm:g}",
        "ss_seed": str(train.seed),
        "ss_min_snr_gamma": f"{train.min_snr_gamma:g}",
        "ss_noise_offset": f"{train.noise_offset:g}",
        # kohya writes str() of its arguments: "None" when an option is off
        "ss_adaptive_noise_scale": str(train.adaptive_noise_scale or None),
        "ss_multires_noise_iterations": str(train.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(train.multires_noise_discount),
        "ss_scale_weight_norms": str(train.scale_weight_norms or None),
        "ss_stop_text_encoder_training": str(train.stop_text_encoder_training or None),
        "ss_mixed_precision": train.mixed_precision,
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_cache_latents": "True",  # latents are always cached (cache.LatentCache)
        "ss_enable_bucket": str(data.enable_bucket),
        "ss_min_bucket_reso": str(data.min_bucket_reso),
        "ss_max_bucket_reso": str(data.max_bucket_reso),
        "ss_bucket_no_upscale": str(data.bucket_no_upscale),
        "ss_shuffle_caption": str(data.shuffle_caption),
        "ss_keep_tokens": str(data.keep_tokens),
        "ss_max_token_length": str(data.max_token_length),
        "ss_flip_aug": str(data.flip_aug),
        "ss_caption_dropout_rate": f"{data.caption_dropout_rate:g}",
        "ss_caption_tag_dropout_rate": f"{data.caption_tag_dropout_rate:g}",
        "ss_tag_frequency": json.dumps(tag_frequency or {}),
        "ss_dataset_dirs": json.dumps(dataset_dirs or {}),
        "ss_reg_dataset_dirs": json.dumps(stats.get("reg_dataset_dirs", {})),
        "ss_num_reg_images": str(stats.get("num_reg_images", 0)),
        "ss_prior_loss_weight": f"{train.prior_loss_weight:g}",
        "ss_bucket_info": json.dumps(stats.get("bucket_info")),
        "ss_total_batch_size": str(stats.get("total_batch_size", train.batch_size * train.gradient_accumulation_steps)),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(finished),
        "ss_session_id": str(stats.get("session_id", secrets.randbelow(2**31))),
        "modelspec.resolution": f"{width}x{height}",
    }
    meta |= FAMILIES[_get(base, "family")].kohya_metadata(train)
    if network["ss_network_module"] == "lycoris.kohya":  # a family's own network module is plain LoRA's
        meta["ss_network_module"] = network["ss_network_module"]
    if cfg.trigger:
        meta["modelspec.trigger_phrase"] = cfg.trigger
    if thumbnail:
        meta["modelspec.thumbnail"] = thumbnail
    return meta
