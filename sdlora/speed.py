"""The trainer's speed settings, applied to the U-Net in one place (`apply`): the attention
kernel (`train.attention`), TF32 (`train.tf32`), channels-last (`train.channels_last`) and
torch.compile of the transformer blocks (`train.compile`). `sdlora bench --suite gpu`
measures each against the plain step.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError


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
    if not torch.cuda.is_available():
        raise UserError(f"{where} = 'xformers' needs a CUDA GPU (xformers has no CPU kernels); "
                        "use attention = 'sdpa'")


def set_attention(unet: nn.Module, kind: str, where: str = "train.attention") -> None:
    """sdpa: PyTorch's scaled_dot_product_attention (diffusers' AttnProcessor2_0);
    xformers: xformers' memory-efficient attention, which needs the package and a CUDA GPU."""
    require_attention(kind, where)
    if kind == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    else:
        unet.enable_xformers_memory_efficient_attention()


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions (10-bit mantissa products,
    fp32 accumulation); mixed-precision steps are unaffected. A process-wide setting."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """The U-Net's BasicTransformerBlocks (self-attention, cross-attention, feed-forward)."""
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def compile_blocks(unet: nn.Module, backend: str = "inductor") -> int:
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
        unet.to(memory_format=torch.channels_last)
        done.append("channels-last")
    if tc.compile:
        done.append(f"torch.compile of {compile_blocks(unet)} transformer blocks")
    return done
