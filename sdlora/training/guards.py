"""What stops a training: a non-finite loss or gradient (`check_finite`, before it reaches the
weights) and SIGINT / SIGTERM, honoured at a step boundary (`StopRequest`)."""

from __future__ import annotations

import math
import signal
import threading

import torch

from sdlora.adapters.network import network_ranks
from sdlora.config import Config
from sdlora.errors import UserError
from sdlora.training.state import STATE_FILE


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, honoured at a step boundary after the state was saved."""

    def __init__(self, signum: int, step: int, cfg: Config):
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        where = f" {cfg.source}" if cfg.source else " CONFIG"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; the training state is saved "
                         f"in {cfg.output_dir / 'state' / STATE_FILE}: continue with `sdlora train{where} --resume` "
                         "(and the same --set options)")


class StopRequest:
    """SIGINT / SIGTERM handlers for the training loop.

    Once the loop runs (`armed`), a signal only sets a flag that the loop reads at its next step
    boundary, where it saves the state and stops (`TrainingStopped`); a second signal, or one
    before the loop starts, stops at once. Several processes stop at the same step: the loop
    takes the largest flag over all of them.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log):
        self.signum, self.armed, self.previous, self.log = 0, False, {}, log

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if not self.armed or self.signum:
            raise KeyboardInterrupt(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: saving the training state at the end of this step, then "
                 "stopping (press Ctrl-C again to stop at once, without saving)")

    def requested(self, accelerator) -> int:
        """The signal to stop for (0: none), the same in every process."""
        if accelerator.num_processes == 1:
            return self.signum
        flags = accelerator.gather(torch.tensor([self.signum], device=accelerator.device))
        return int(flags.max())


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: nothing of the step was applied or written."""


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||concat(tensors)||_2, what clip_grad_norm_ returns (torch.nn.utils.get_total_norm from torch 2.6)."""
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def check_finite(cfg: Config, step: int, epoch: int, loss: float, grad_norm: float, losses: list[float],
                 overflow_skips: bool, settings=None) -> None:
    """Stop training on a NaN/inf loss or gradient norm, saying where, why and what to change.

    settings: the training's resolved `network.Settings` (None: resolved from cfg for the message).
    overflow_skips: fp16's gradient scaler skips steps whose gradients overflow and lowers its
    scale, so an infinite gradient is expected there now and then; a non-finite loss is not.
    """
    if math.isfinite(loss) and (math.isfinite(grad_norm) or overflow_skips):
        return
    tc = cfg.train
    dim, alpha = (settings.dim, settings.alpha) if settings else network_ranks(cfg.network)[:2]  # the trainer's, or these
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    last = f"last finite loss {losses[-1]:.4f} at step {step - 1}" if losses else "no step had finished"
    if tc.mixed_precision == "fp16":
        cause = ("fp16 overflowed: set train.mixed_precision = \"bf16\" (or \"no\"), or lower the learning rates "
                 f"(unet_lr {tc.unet_lr:g}, text_encoder_lr {tc.text_encoder_lr})")
    else:
        cause = (f"the learning rates are too high for this network (unet_lr {tc.unet_lr:g}, text_encoder_lr "
                 f"{tc.text_encoder_lr}; 1e-4 to 1e-3 is usual for AdamW), or network.alpha / network.dim "
                 f"({alpha:g} / {dim}) scales the adapters too strongly: lower them, "
                 f"keep train.max_grad_norm at 1.0")
    raise TrainingDiverged(
        f"{cfg.source or 'training'}: training stopped at step {step} (epoch {epoch}): {what} ({last}). "
        f"Likely cause: {cause}; then train again without --resume. Nothing of this step was saved: the "
        f"adapters and state already in {cfg.output_dir} are from before it.")
