"""Memory of LoRA training on a transformer family (FLUX.1, SD3.5), per resolution and precision,
counted on the meta device: shapes and dtypes without storage, so the full 12B-parameter FLUX.1
costs no RAM. What the device holds during one training step at batch 1:

    frozen weights   the base's frozen parameters and buffers: bf16 2 B each; model.quantize = "fp8"
                     1 B per Linear weight + an fp32 scale per output channel (biases, norms and
                     embeddings stay bf16); with blocks_to_swap, less the swapped blocks' frozen
                     tensors plus the two largest of them (the block running, the one on its way in)
    adapters         the trained parameters in fp32 + their fp32 gradients + AdamW's two fp32
                     moments: 16 B per adapter parameter
    activations      what autograd saves for the backward in one forward (saved_tensors_hooks over
                     the family's own `predict`, all in bf16 as bf16 autocast computes it, attention
                     as the flash kernel saves it); with gradient checkpointing the saved tensors
                     outside the blocks + every block's inputs (what checkpoint keeps) + the largest
                     block's saved tensors (recomputed inside its backward)

Computed, not measured: the CUDA context (~0.3-0.5 GiB), the caching allocator's slack, the
transient buffers of one operation (attention and matmul workspaces, a dequantised fp8 weight),
and the text encoders and VAE (their outputs are cached and they leave the device before
training). A GPU measures the real peaks: `sdlora bench --suite gpu`'s FLUX.1 / SD3.5 rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from sdlora.adapters import network
from sdlora.config import NetworkConfig
from sdlora.models.arch import part_config
from sdlora.models.blockswap import enable as enable_block_swap
from sdlora.models.blockswap import frozen_tensors, swap_plan, tensor_bytes
from sdlora.models.families import FAMILIES
from sdlora.models.families.base import TextConditioning
from sdlora.models.quantize import quantize_frozen
from sdlora.tiny.configs import (
    FLOW_LATENT_CHANNELS,
    MINI_FLUX_TRANSFORMER,
    MINI_SD35_MEDIUM_TRANSFORMER,
)

GIB = 2**30
ADAPTER_BYTES_PER_PARAM = 4 * 4  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True)
class FullTransformer:
    """A family's denoiser at its published size, and the text sequence and latents it trains on."""

    family: str  # its FAMILIES key: the rows light up when the family is registered
    cls_name: str  # diffusers' class
    config: dict
    text_tokens: int  # the conditioning's sequence length
    latent_channels: int = 16
    reduced: dict = field(default_factory=dict)  # the test-size config (`tiny.configs`) of CPU smoke runs
    reduced_latent_channels: int = FLOW_LATENT_CHANNELS


# The published sizes are the configs sdlora ships for the families' single files (`arch.part_config`):
# FLUX.1-dev's 19 double and 38 single blocks, 24 heads x 128, with the guidance embedding; T5's length for
# dev: 512 (kohya's). SD3.5 Medium: 24 MMDiT-X blocks (dual attention in the first 13), 1536 wide; its text
# sequence is CLIP's 77 tokens followed by T5's 256 (diffusers' StableDiffusion3Pipeline).
FULL_TRANSFORMERS = (
    FullTransformer("flux1_dev", "FluxTransformer2DModel", part_config("flux1_dev", "transformer"), 512,
                    reduced=dict(MINI_FLUX_TRANSFORMER, num_layers=4, num_single_layers=6)),
    FullTransformer("sd35_medium", "SD3Transformer2DModel", part_config("sd35_medium", "transformer"), 77 + 256,
                    reduced=dict(MINI_SD35_MEDIUM_TRANSFORMER, num_layers=4)),
)


def registered() -> list[FullTransformer]:
    """The full transformers whose family sdlora has."""
    return [t for t in FULL_TRANSFORMERS if t.family in FAMILIES]


def frozen_bytes(model: nn.Module) -> int:
    return (sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
            + tensor_bytes(model.buffers()))


def lora_on_meta(cls_name: str, config: dict, network_cfg: NetworkConfig, fmt: str = "none"):
    """(the family's transformer at its full size on the meta device, frozen in bf16 or fp8 as the
    trainer leaves it, with bf16 adapters on the [network] targets; its Network)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name).from_config(config)
    model = nn.Module.to(model, torch.bfloat16)  # diffusers' .to warns about casting a model it did not load
    # the adapters stay bf16 here: under bf16 autocast they compute in bf16 and share their input with the
    # base layer's; their fp32 master weights count apart (ADAPTER_BYTES_PER_PARAM)
    net = network.inject(model, None, network_cfg, log=lambda line: None)
    quantize_frozen(model, fmt)
    return model, net


class FlashAttention(TorchFunctionMode):
    """scaled_dot_product_attention as the flash kernel runs it on a GPU (saving q, k, v, the output and
    its log-sum-exp), not as the meta device would (the math path, saving fp32 attention matrices)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            qkv = [*args[:3], *[kwargs.pop(k) for k in ("query", "key", "value") if k in kwargs]]
            if kwargs.get("attn_mask") is None and not kwargs.get("enable_gqa"):
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    *qkv, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), scale=kwargs.get("scale"))[0]
            return func(*qkv, **kwargs)
        return func(*args, **kwargs)


class SavedForBackward:
    """The bytes autograd saves during a forward: outside the blocks, per block, and the blocks' inputs."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        self.exclude = {id(t) for t in [*model.parameters(), *model.buffers()]}
        self.seen: dict[int, torch.Tensor] = {}  # held: a freed storage's id could come back
        self.outside, self.per_block, self.inputs = 0, [0] * len(blocks), 0
        self.current: int | None = None
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(
                lambda module, args, kwargs, i=i: self._enter(i, [*args, *kwargs.values()]), with_kwargs=True))
            self.handles.append(block.register_forward_hook(lambda *_: setattr(self, "current", None)))

    def _new(self, t: torch.Tensor) -> int:
        """The bytes of t's whole tensor (a view's base) the first time it is seen; 0 for weights."""
        whole = t if t._base is None else t._base
        key = id(whole)
        if key in self.exclude or key in self.seen:
            return 0
        self.seen[key] = whole
        return whole.numel() * whole.element_size()

    def _enter(self, i: int, args) -> None:
        self.current = i
        self.inputs += sum(self._new(a) for a in args if isinstance(a, torch.Tensor))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        n = self._new(t)
        if self.current is None:
            self.outside += n
        else:
            self.per_block[self.current] += n
        return t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def training_step_bytes(family, model: nn.Module, resolution: int, text_tokens: int, latent_channels: int,
                        step: bool = False) -> dict:
    """One forward (and, with `step`, its backward and an AdamW step) of `model` on the meta device at
    `resolution` px, batch 1: {activations, activations_checkpointed} in bytes."""
    blocks, _ = swap_plan(family.swap_blocks(model, 0))
    text_width = model.config.joint_attention_dim
    pooled_width = model.config.pooled_projection_dim
    side = resolution // 8  # the VAE's 8x downscale
    latents = torch.randn(1, latent_channels, side, side, device="meta")
    text = TextConditioning(torch.randn(1, text_tokens, text_width, device="meta"),
                            torch.randn(1, pooled_width, device="meta"))
    saved = SavedForBackward(model, blocks)
    try:
        with FlashAttention(), torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            pred = family.predict(model, latents, torch.rand(1, device="meta"), text, None, torch.bfloat16)
    finally:
        saved.remove()
    if step:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
        with FlashAttention():
            pred.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    total = saved.outside + sum(saved.per_block)
    return {"activations": total,
            "activations_checkpointed": saved.outside + saved.inputs + max(saved.per_block)}


def swap_bytes(family, model: nn.Module, blocks_to_swap: int) -> tuple[int, int]:
    """(bytes of the swapped blocks' frozen tensors, the two largest of them: what stays in flight)."""
    blocks, swapped = swap_plan(family.swap_blocks(model, blocks_to_swap))
    sizes = sorted(tensor_bytes(frozen_tensor_values(blocks[i])) for i in swapped)
    return sum(sizes), sum(sizes[-2:])


def frozen_tensor_values(block: nn.Module) -> list[torch.Tensor]:
    return [getattr(module, name) for module, name in frozen_tensors(block)]


def memory_table(full: FullTransformer, resolutions=(512, 768, 1024), blocks_to_swap: int = 16,
                 network_cfg: NetworkConfig | None = None) -> list[dict]:
    """Rows {precision, resolution, frozen / adapter / activation GiB, totals with gradient checkpointing
    and without} for bf16 and fp8, each also with `blocks_to_swap` (see the module docstring). One full
    training step (forward, backward, AdamW) runs at the first resolution of each precision."""
    family = FAMILIES[full.family]
    network_cfg = network_cfg or NetworkConfig(train_text_encoder=False)
    rows = []
    for fmt, label in (("none", "bf16"), ("fp8", "fp8")):
        model, net = lora_on_meta(full.cls_name, full.config, network_cfg, fmt)
        adapters = sum(p.numel() for p in net.trainable_parameters()) * ADAPTER_BYTES_PER_PARAM
        frozen = frozen_bytes(model)
        activations = {r: training_step_bytes(family, model, r, full.text_tokens, full.latent_channels,
                                              step=r == resolutions[0]) for r in resolutions}
        variants = [(label, frozen)]
        if blocks_to_swap:
            swapped, in_flight = swap_bytes(family, model, blocks_to_swap)
            variants.append((f"{label} + blocks_to_swap {blocks_to_swap}", frozen - swapped + in_flight))
        for name, resident in variants:
            for r in resolutions:
                a = activations[r]
                rows.append({"precision": name, "resolution": r, "frozen_gib": resident / GIB,
                             "adapters_gib": adapters / GIB,
                             "activations_checkpointed_gib": a["activations_checkpointed"] / GIB,
                             "activations_gib": a["activations"] / GIB,
                             "total_checkpointed_gib": (resident + adapters + a["activations_checkpointed"]) / GIB,
                             "total_gib": (resident + adapters + a["activations"]) / GIB})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| precision | px | frozen weights | adapters + grads + AdamW | activations (checkpointing) "
             "| total (checkpointing) | total (no checkpointing) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['resolution']} | {r['frozen_gib']:.1f} | {r['adapters_gib']:.2f} | "
              f"{r['activations_checkpointed_gib']:.2f} | {r['total_checkpointed_gib']:.1f} | {r['total_gib']:.1f} |"
              for r in rows]
    return "\n".join(lines) + "\n(GiB, batch 1; computed on the meta device, see sdlora/bench/memory.py)"


def bench_memory(blocks_to_swap: int = 16) -> dict:
    """`sdlora bench --parts flow_memory`: {family: {"PRECISION PXpx": total GiB with gradient checkpointing}}."""
    return {f"{full.family}_memory_gib": {f"{r['precision']} {r['resolution']}px": round(r["total_checkpointed_gib"], 2)
                                          for r in memory_table(full, blocks_to_swap=blocks_to_swap)}
            for full in registered()}


def random_transformer(full: FullTransformer, device, reduced: bool = False, seed: int = 0) -> nn.Module:
    """The family's transformer at random weights, allocated once in bf16 on `device` (never an fp32
    copy first: the full FLUX.1 is 24 GB in bf16)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, full.cls_name).from_config(full.reduced if reduced else full.config)
    model = nn.Module.to(model, torch.bfloat16).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.normal_(0.0, 0.02, generator=generator)
    return model.requires_grad_(False)


class FlowStep:
    """One LoRA training step of a transformer family as the trainer runs it: bf16 base (or fp8 with
    `quantize`), fp32 adapters on the [network] targets, bf16 autocast, gradient checkpointing,
    blocks_to_swap, AdamW; a fixed batch of 1 at `resolution` px with random text conditioning."""

    def __init__(self, full: FullTransformer, device: str, resolution: int, reduced: bool = False,
                 quantize: str = "none", blocks_to_swap: int = 0, checkpointing: bool = True, seed: int = 0):
        from diffusers.training_utils import cast_training_params

        self.device, self.family = device, FAMILIES[full.family]
        self.model = model = random_transformer(full, device, reduced, seed)
        self.network = network.inject(model, None, NetworkConfig(train_text_encoder=False), log=lambda line: None)
        cast_training_params(model, dtype=torch.float32)
        quantize_frozen(model, quantize)
        self.swap = enable_block_swap(self.family, model, blocks_to_swap, device, "sdlora bench")
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        self.optimizer = torch.optim.AdamW(self.network.trainable_parameters(), lr=1e-4)
        g = torch.Generator(device).manual_seed(seed)
        side = resolution // 8
        channels = full.reduced_latent_channels if reduced else full.latent_channels
        self.latents = torch.randn(1, channels, side, side, device=device, generator=g)
        self.noise = torch.randn(1, channels, side, side, device=device, generator=g)
        tokens = 8 if reduced else full.text_tokens
        self.text = TextConditioning(
            torch.randn(1, tokens, model.config.joint_attention_dim, device=device, generator=g),
            torch.randn(1, model.config.pooled_projection_dim, device=device, generator=g))
        self.sigmas = torch.full((1,), 0.5, device=device)

    def step(self) -> torch.Tensor:
        """Rectified flow at sigma 0.5: noisy = (1 - s) x + s noise, target noise - x."""
        noisy = (1 - 0.5) * self.latents + 0.5 * self.noise
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            pred = self.family.predict(self.model, noisy, self.sigmas, self.text, None, torch.bfloat16)
        loss = F.mse_loss(pred.float(), self.noise - self.latents)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

