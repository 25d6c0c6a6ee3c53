"""A quantised frozen base (QLoRA's idea, kohya's fp8 base): `model.quantize = "fp8" | "nf4"`.

Every frozen Linear and Conv2d of the U-Net and text encoder is replaced by a `QuantizedLayer`
that holds its weight quantised and dequantises it per call, in the forward and again in the
backward (so no dequantised weight is kept alive between them):

    fp8:  W = q * s,  q = float8_e4m3fn(W / s),  s = max|W[o]| / 448 per output channel o
          (1 byte a weight + one fp32 scale per channel; works on any device); a weight whose every
          value is a float8_e4m3fn value (an fp8-stored checkpoint's, upcast on load) is kept as it
          is, s = 1, rather than rounded a second time
    nf4:  bitsandbytes' 4-bit NormalFloat with a per-64-block absmax (CUDA only)

Adapters are injected first and stay full precision: the peft layer's `base_layer` is what
gets quantised, its lora_A / lora_B are not (they require grad), so the exported file is the
same as with an unquantised base and loads on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.errors import UserError

FORMATS = ("none", "fp8", "nf4")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def require(fmt: str, where: str = "model.quantize") -> None:
    """One-line UserError when `fmt` cannot run here (nf4 without bitsandbytes or CUDA)."""
    if fmt not in FORMATS:
        raise UserError(f"{where} = {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "nf4":
        return
    if not torch.cuda.is_available():
        raise UserError(f"{where} = 'nf4' needs a CUDA GPU (bitsandbytes' 4-bit kernels); "
                        "use quantize = 'fp8' on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"{where} = 'nf4' needs bitsandbytes: pip install 'sdlora[bnb]', "
                        "or use quantize = 'fp8'") from None


def _pack(weight: torch.Tensor, fmt: str):
    """(stored tensor, scale or bitsandbytes QuantState) for a weight (out, ...)."""
    w = weight.detach()
    if fmt == "fp8":
        stored = w.to(FP8)
        if not w.is_meta and torch.equal(stored.to(w.dtype), w):  # fp8-stored already: kept as it is (meta: sizes only)
            return stored, torch.ones(w.shape[0], device=w.device)
        amax = w.float().abs().reshape(w.shape[0], -1).amax(dim=1)
        scale = (amax / FP8_MAX).clamp(min=1e-12)  # (out,)
        q = (w.float() / scale.view(-1, *[1] * (w.dim() - 1))).to(FP8)
        return q, scale
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.to("cuda", torch.bfloat16).contiguous(), quant_type="nf4")
    return packed, state


class _DequantizedOp(torch.autograd.Function):
    """y = op(x, dequant(W), b) with the gradient to x only; saves nothing but the layer."""

    @staticmethod
    def forward(ctx, x, layer: "QuantizedLayer", bias):
        w = layer.dequantize(x.dtype)
        ctx.layer, ctx.x_shape = layer, x.shape
        b = bias.to(x.dtype) if bias is not None else None
        if layer.conv is None:
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, **layer.conv)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        w = layer.dequantize(grad.dtype)
        if layer.conv is None:
            grad_x = grad @ w
        else:
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, **layer.conv)
        return grad_x, None, None


class QuantizedLayer(nn.Module):
    """A frozen nn.Linear / nn.Conv2d with its weight stored in `fmt` (see the module docstring).

    `weight` is the dequantised weight (for code that reads it, e.g. peft's merge); the forward
    computes in the autocast dtype when autocast is on, else in the input's dtype.
    """

    def __init__(self, layer: nn.Module, fmt: str):
        super().__init__()
        self.fmt, self.shape, self.dtype = fmt, tuple(layer.weight.shape), layer.weight.dtype
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                         "groups": layer.groups}
            self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        else:
            self.in_features, self.out_features = layer.in_features, layer.out_features
        stored, scale = _pack(layer.weight, fmt)
        self.register_buffer("qweight", stored)
        if fmt == "fp8":
            self.register_buffer("scale", scale)
        else:
            self.quant_state = scale
        self.bias = layer.bias

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.fmt == "fp8":
            scale = self.scale.view(-1, *[1] * (self.qweight.dim() - 1))
            return (self.qweight.to(torch.float32) * scale).to(dtype)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.qweight, self.quant_state).view(self.shape).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize(self.dtype)

    def stored_bytes(self) -> int:
        n = self.qweight.numel() * self.qweight.element_size()
        if self.fmt == "fp8":
            return n + self.scale.numel() * self.scale.element_size()
        return n + self.quant_state.absmax.numel() * self.quant_state.absmax.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # meta: none
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        return _DequantizedOp.apply(x.to(dtype), self, self.bias)

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={self.shape}"


def quantize_frozen(model: nn.Module, fmt: str) -> dict:
    """Replace every frozen nn.Linear / nn.Conv2d of `model` by a QuantizedLayer, in place.

    Trainable layers (peft's lora_A / lora_B) are left alone, so call this after injecting
    adapters. Returns {"layers", "bytes_before", "bytes_after"} of the replaced weights.
    """
    require(fmt)
    report = {"layers": 0, "bytes_before": 0, "bytes_after": 0}
    if fmt == "none":
        return report
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) in (nn.Linear, nn.Conv2d) and not child.weight.requires_grad]
    for parent, name, child in targets:
        layer = QuantizedLayer(child, fmt)
        setattr(parent, name, layer)
        report["layers"] += 1
        report["bytes_before"] += child.weight.numel() * child.weight.element_size()
        report["bytes_after"] += layer.stored_bytes()
    return report
