"""The trainer's speed settings, applied to the U-Net in one place (`apply`): the attention
kernel (`train.attention`), TF32 (`train.tf32`), channels-last (`train.channels_last`) and
torch.compile of the transformer blocks (`train.compile`). `sdlora bench --suite gpu`
measures each against the plain step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from sdlora.errors import UserError

if TYPE_CHECKING:  # torch loads where a function needs it: the CLI tunes the allocator (below) before parsing
    import torch
    from torch import nn


def require_attention(kind: str, where: str = "train.attention") -> None:
    """One-line UserError when the attention kernel cannot run here."""
    if kind == "sdpa":
        return
    if kind != "xformers":
        raise UserError(f"{where} = {kind!r}: choose sdpa or xformers")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        raise UserError(f"{where} = 'xformers' needs the xformers package: pip install 'sdlora[xformers]' "
                        "(a build matching your torch), or use attention = 'sdpa'") from None
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{where} = 'xformers' needs a CUDA GPU (xformers has no CPU kernels); "
                        "use attention = 'sdpa'")


def set_attention(unet: nn.Module, kind: str, where: str = "train.attention") -> None:
    """sdpa: PyTorch's scaled_dot_product_attention (diffusers' AttnProcessor2_0);
    xformers: xformers' memory-efficient attention, which needs the package and a CUDA GPU."""
    require_attention(kind, where)
    if kind == "sdpa":
        from diffusers.models.attention_processor import (
            Attention,
            AttnProcessor2_0,
            JointAttnProcessor2_0,
        )

        # U-Nets' Attention modules; FLUX's FluxAttention and SD3's joint attention (JointAttnProcessor2_0, which
        # AttnProcessor2_0 would break: it drops the text stream) compute with PyTorch's SDPA by default.
        attention = [m for m in unet.modules() if isinstance(m, Attention)]
        if attention and not any(isinstance(m.processor, JointAttnProcessor2_0) for m in attention):
            unet.set_attn_processor(AttnProcessor2_0())
    else:
        unet.enable_xformers_memory_efficient_attention()


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions (10-bit mantissa products,
    fp32 accumulation); mixed-precision steps are unaffected. A process-wide setting."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """The U-Net's BasicTransformerBlocks (self-attention, cross-attention, feed-forward)."""
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def compile_blocks(unet: nn.Module, backend: str | Callable = "inductor") -> int:
    """torch.compile each transformer block in place (`nn.Module.compile`); returns how many.

    Blocks rather than the whole U-Net: the blocks hold the adapters and most of the FLOPs,
    they repeat (one compiled graph per distinct shape), and graph breaks elsewhere in the
    U-Net (peft, diffusers' conditioning) cannot undo the gain.
    """
    blocks = transformer_blocks(unet)
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def apply(tc, unet: nn.Module, device: torch.device) -> list[str]:
    """Apply [train] attention, tf32, channels_last and compile to `unet`; returns what was turned on."""
    done = []
    set_attention(unet, tc.attention)
    if tc.attention != "sdpa":
        done.append(f"{tc.attention} attention")
    if device.type == "cuda":
        set_tf32(tc.tf32)
        if tc.tf32:
            done.append("TF32")
    if tc.channels_last:
        import torch

        unet.to(memory_format=torch.channels_last)
        done.append("channels-last")
    if tc.compile:
        done.append(f"torch.compile of {compile_blocks(unet)} transformer blocks")
    return done


# glibc's mallopt parameters (malloc.h) and the values sdlora sets: see tune_cpu_allocator.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # 1 GiB: buffers below it come from the heap and are reused
TRIM_THRESHOLD = (1 << 31) - 1  # 2 GiB (mallopt takes a C int): free heap top kept for the next step


def tune_cpu_allocator() -> bool:
    """Keep glibc from handing big training buffers back to the kernel after every use.

    A CPU training step allocates and frees the same large buffers each time (oneDNN's re-laid
    3x3 conv weights, up to 59 MB each for SD1.5, activation gradients). glibc serves every
    block above its mmap threshold, which adapts only up to 32 MiB, with a fresh mmap and
    returns it with munmap on free, so the kernel zero-fills each 4 KiB page again on the next
    step: ~625k minor page faults per SD1.5 step at 256 px. Raising the mmap threshold to 1 GiB
    and the trim threshold to 2 GiB keeps those blocks in the heap for reuse: ~7-9k faults per
    step, 2.61 -> 1.97-1.99 s per step (1.31x) at the same peak memory (`sdlora bench`,
    README). Applied once per process; MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the
    environment take precedence, and other C libraries are left alone. Returns whether it applied.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in
                                                   ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
