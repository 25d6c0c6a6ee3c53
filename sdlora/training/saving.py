"""What a training writes besides its logs: adapter files (every save_every_n_epochs / _steps and
the final one, with kohya's metadata), the resumable state, and the preview grids. The loop
says when; `Saver` knows how."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.adapters import keys, kinds
from sdlora.adapters.file import save_adapter
from sdlora.adapters.network import Settings, adapter_metadata
from sdlora.config import Config
from sdlora.errors import UserError
from sdlora.models.families import FAMILIES
from sdlora.models.load import DTYPES
from sdlora.sampling import sampler
from sdlora.training import state as training_state
from sdlora.training.examples import TrainingData
from sdlora.training.optimizers import warmup_steps
from sdlora.training.state import OLD_STATE_FILE, STATE_FILE
from sdlora.training.stats import (
    config_hash,
    dataset_dirs,
    dataset_stats,
    tag_frequency,
)


@dataclass
class Progress:
    """Wall-clock bookkeeping that spans sessions: a resumed run reports the whole training."""

    started_at: float  # unix time the training (not this session) began
    seconds_before: float  # training time of earlier sessions
    session_started: float
    adapters: list[Path]  # every adapter file written, in order

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.session_started

    def resumed(self, state: dict, out: Path) -> None:
        self.started_at = float(state.get("training_started_at", self.started_at))
        self.seconds_before = float(state.get("seconds", 0.0))
        self.adapters[:0] = [out / name for name in state.get("adapters", []) if (out / name).is_file()]


class Saver:
    """The adapters, the training state and the previews of one training session.

    plan: (optimizer steps per epoch, total steps, epochs), `examples.planned_steps`."""

    def __init__(self, cfg: Config, base, settings: Settings, network, optimizer, lr_scheduler, data: TrainingData,
                 plan: tuple[int, int, int], progress: Progress, log=print):
        self.cfg, self.base, self.settings, self.network = cfg, base, settings, network
        self.data, self.progress, self.log = data, progress, log
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.steps_per_epoch, self.total_steps, self.epochs = plan
        if cfg.output.format == "diffusers" and (kinds.for_network_type(cfg.network.type) is not kinds.lora
                                                 or cfg.network.dora):
            raise UserError(f"[output] format = \"diffusers\" holds LoRA and LoCon only, not [network] type = "
                            f"{cfg.network.type!r}{' with dora' if cfg.network.dora else ''}; set format = \"kohya\"")

    def adapter(self, path: Path, epoch: int, step: int) -> None:
        """The Kohya-format adapter at `path` in train.save_precision, with kohya's ss_* metadata."""
        cfg, examples = self.cfg, self.data.examples
        stats = {"epoch": epoch, "num_epochs": self.epochs, "steps": step, "max_train_steps": self.total_steps,
                 "num_batches_per_epoch": self.steps_per_epoch, "training_started_at": self.progress.started_at,
                 "training_finished_at": time.time(), "config_hash": config_hash(cfg, self.data.dataset),
                 "lr_warmup_steps": warmup_steps(cfg.train, self.total_steps),
                 "total_batch_size": cfg.train.batch_size * cfg.train.gradient_accumulation_steps,
                 **dataset_stats(examples)}
        metadata = adapter_metadata(cfg, self.base, stats, tag_frequency(examples),
                                    dataset_dirs(examples, reg=False), settings=self.settings)
        metadata["sdlora_config_hash"] = stats["config_hash"]  # `sdlora run` skips retraining on a match
        dtype = DTYPES[cfg.train.save_precision]
        if cfg.output.format == "diffusers":  # the scale baked into lora_A in fp32, then rounded once
            tensors = {k: v.to(dtype) for k, v in keys.to_diffusers_names(
                self.network.kohya_state_dict(torch.float32), self.network.models,
                FAMILIES[self.base.family].denoiser_part).items()}
            metadata["format"] = "pt"  # what diffusers' own files carry
        else:
            tensors = self.network.kohya_state_dict(dtype)
        save_adapter(path, tensors, metadata, overwrite=True)

    def state(self, epoch: int, batch_in_epoch: int, step: int, losses: list[float]) -> None:
        """Everything --resume needs to continue bit for bit, as data (`state.py`): no pickle."""
        out = self.cfg.output_dir
        progress = self.progress
        state = {
            "adapter": self.network.kohya_state_dict(torch.float32),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step, "losses": losses,
            "config_hash": config_hash(self.cfg, self.data.dataset),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            # for the report and the metadata of a resumed run: the whole training, not the last session
            "training_started_at": progress.started_at, "seconds": progress.seconds(),
            "adapters": [str(p.relative_to(out)) for p in progress.adapters],
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        training_state.save_state(state, out / "state" / STATE_FILE)

    def load_state(self) -> dict:
        """--resume: the saved state put back into the adapters, the optimizer, the scheduler and the
        random generators; returns it (epoch, batch_in_epoch, step, losses, ...)."""
        folder = self.cfg.output_dir / "state"
        path = folder / STATE_FILE
        if not path.is_file():
            if (folder / OLD_STATE_FILE).is_file():
                raise UserError(f"--resume: {folder / OLD_STATE_FILE} is an older sdlora's pickled state, which is "
                                "not read (a pickle can run code); start again without --resume")
            raise UserError(f"--resume: no training state at {path}; start without --resume")
        fix = ("delete it and start again without --resume (the adapters saved so far are kept; "
               "set train.overwrite = true or another output.output_name)")
        try:
            state = training_state.load_state(path)
        except training_state.DamagedState as e:
            raise UserError(f"--resume: {path} is damaged ({e}); {fix}") from None
        if state.get("config_hash") != config_hash(self.cfg, self.data.dataset):
            raise UserError(f"--resume: {path} was written for a different config or dataset; "
                            "resume with the same settings, or start a new run without --resume")
        try:
            self.network.load_kohya_state_dict(state["adapter"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            if "cuda" in state["rng"] and torch.cuda.device_count() == len(state["rng"]["cuda"]):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            state["epoch"], state["batch_in_epoch"], state["step"] = (int(state[k]) for k in
                                                                      ("epoch", "batch_in_epoch", "step"))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"--resume: {path} is damaged ({type(e).__name__}: {e}); {fix}") from None
        self.progress.resumed(state, self.cfg.output_dir)
        return state

    def preview(self, epoch: int, step: int, last: bool) -> None:
        """sample.every_n_epochs: a preview grid of this epoch's adapter (the final epoch's is the run's)."""
        every = self.cfg.sample.every_n_epochs
        if not every or epoch % every or last or not self.cfg.sample.prompts:
            return
        path = self.cfg.adapter_path(epoch)
        if not path.exists():  # written for the preview only: not one of the run's adapters
            self.adapter(path, epoch, step)
        grid = sampler.preview(self.cfg, path, epoch, self.cfg.output_dir / "previews")
        self.log(f"preview: {grid}")
