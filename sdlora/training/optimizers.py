"""The optimizer table: train.optimizer -> the class that updates the adapters, and the warmup."""

from __future__ import annotations

import importlib

import torch

from sdlora.errors import UserError

# optimizer name -> (module, class, the sdlora extra that installs it, defaults kohya users expect)
OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", None, {}),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bnb", {}),
    "lion": ("lion_pytorch", "Lion", "lion", {}),
    # Adafactor with the given learning rates (kohya_ss's preset); relative_step=True would ignore them.
    "adafactor": ("transformers.optimization", "Adafactor", None,
                  {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
    # Prodigy estimates the step size itself: learning rates of ~1.0 are its convention.
    "prodigy": ("prodigyopt", "Prodigy", "prodigy", {}),
    # Schedule-free AdamW: the trainer switches it to eval() (averaged weights) before validating and saving.
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree", {}),
}


def make_optimizer(tc, groups: list[dict], source, fused: bool = False) -> torch.optim.Optimizer:
    """train.optimizer over the adapter groups, with weight_decay and train.optimizer_args passed through.
    fused: AdamW's one-CUDA-kernel update (PyTorch's fastest implementation)."""
    module, name, extra, defaults = OPTIMIZERS[tc.optimizer]
    if fused and tc.optimizer == "adamw":
        defaults = {**defaults, "fused": True}
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"{source}: [train] optimizer = '{tc.optimizer}' needs {package}"
                        f"{' (and a CUDA GPU)' if extra == 'bnb' else ''}: pip install 'sdlora[{extra}]', "
                        "or use optimizer = 'adamw'") from None
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in tc.optimizer_args.items()}
    try:
        return cls(groups, **{"weight_decay": tc.weight_decay, **defaults, **args})
    except TypeError as e:
        raise UserError(f"{source}: [train] optimizer_args {tc.optimizer_args} do not fit {name}: {e}") from None


def warmup_steps(tc, total_steps: int) -> int:
    """train.lr_warmup_steps, or lr_warmup_ratio x total steps."""
    return tc.lr_warmup_steps or round(tc.lr_warmup_ratio * total_steps)
