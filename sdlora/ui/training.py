"""The Train and Results pages' work: `sdlora train` / `sdlora sample` in their own processes,
and what the trainer writes read back (TensorBoard scalars, previews, adapters, the log).

A training is `python -m sdlora.cli train CONFIG --set ...` started with an argument list
(never a shell string) in its own session, so closing the browser tab or stopping the UI does
not stop it. The output folder's lock (`io.output_lock`, held by the trainer) keeps two
trainings off one folder; the UI also records the process it started in
`<output.dir>/.sdlora-ui-train.json`, so a reopened page finds it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.config import Config
from sdlora.data.buckets import resolution_pair
from sdlora.data.dataset import current_manifest
from sdlora.errors import UserError
from sdlora.io import LOCK_FILE, atomic_write_text, pid_alive
from sdlora.sampling.grids import epoch_files, label_slug
from sdlora.sampling.metrics import colourfulness, palette_distance
from sdlora.training.examples import collect_examples, planned_steps

RECORD = ".sdlora-ui-train.json"
LOG = "ui_train.log"  # the training process's stdout and stderr
SAMPLE_FOLDER = "ui_samples"


@dataclass
class Plan:
    images: int
    repeats: list[int]
    epochs: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    seconds_per_step: float | None  # measured by the last training in this folder
    text: str


def plan(cfg: Config) -> Plan:
    """"What will happen": images x repeats x epochs / batch = steps, and the time it takes at the speed
    the last training in this output folder ran (`sdlora bench --parts first_step` measures a first one)."""

    examples = [ex for ex in collect_examples(cfg, log=lambda m: None) if not ex.held_out]
    tc = cfg.train
    per_epoch, total, epochs = planned_steps(tc, examples)
    repeats = sorted({ex.repeats for ex in examples})
    seen = sum(ex.repeats for ex in examples)
    rate, where = seconds_per_step(scalars(cfg).get("loss", [])), f"the last training in {cfg.output_dir.name}"
    if rate is None:
        rate, where = bench_seconds_per_step(cfg), f"`sdlora bench` on this base, {BENCH_JSON}"
    lines = [f"{len(examples)} images x {'/'.join(map(str, repeats))} repeats = {seen} images per epoch; "
             f"batch {tc.batch_size} x {tc.gradient_accumulation_steps} accumulation -> {per_epoch} steps per epoch",
             f"{epochs} epochs -> {total} steps" + (f" (train.max_train_steps = {tc.max_train_steps})"
                                                    if tc.max_train_steps else "")]
    if rate:
        lines.append(f"estimated time: {_duration(rate * total)} at {1 / rate:.2f} steps/s ({where}), plus loading "
                     "and caching")
    else:
        lines.append("estimated time: not measured yet for this base; Measure speed runs `sdlora bench --parts "
                     "first_step` on it (or the ETA shows after the first steps)")
    return Plan(len(examples), repeats, epochs, tc.batch_size, per_epoch, total, rate, "\n".join(lines))


BENCH_JSON = "bench_first_step.json"  # in output.dir: `sdlora bench --parts first_step` for this base


def measure_speed(cfg: Config, cwd: Path, timeout: float = 1800) -> float:
    """`sdlora bench --parts first_step` on this config's base at its resolution and batch size 1
    (4 generated images); returns seconds per step."""

    side = max(resolution_pair(cfg.dataset.resolution))
    out = cfg.output_dir / BENCH_JSON
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "sdlora.cli", "bench", "--parts", "first_step", "--first-step-base", cfg.model.base,
          "--first-step-resolution", str(side), "--json", str(out), "--overwrite"], cwd, timeout)
    rate = bench_seconds_per_step(cfg)
    if rate is None:
        raise UserError(f"{out}: the benchmark measured no steps/s; run it again")
    return rate


def bench_seconds_per_step(cfg: Config) -> float | None:
    """Seconds per step from this base's `sdlora bench` figures, scaled by the batch (measured at batch 1)."""
    try:
        figures = json.loads((cfg.output_dir / BENCH_JSON).read_text(encoding="utf-8"))["first_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if figures.get("model") != cfg.model.base or not figures.get("steps_per_s"):
        return None
    return cfg.train.batch_size * cfg.train.gradient_accumulation_steps / figures["steps_per_s"]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60} min" if seconds >= 3600 else \
        f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def seconds_per_step(loss_points: list[tuple[int, float, float]]) -> float | None:
    """Seconds per optimizer step over the last (up to) 20 logged steps of one session."""
    points = loss_points[-20:]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return max(points[-1][2] - points[0][2], 0.0) / (points[-1][0] - points[0][0]) or None


def scalars(cfg: Config, since: float = 0.0) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall time)] from the trainer's TensorBoard logs (`<output.dir>/logs`),
    written at or after `since`; a step logged twice (a resumed run) keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = cfg.output_dir / "logs" / "sdlora"
    if not folder.is_dir():
        return {}
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {}
        for e in acc.Scalars(tag):
            if e.wall_time >= since:
                by_step[e.step] = (e.step, e.value, e.wall_time)
        out[tag] = sorted(by_step.values())
    return out


def record(cfg: Config) -> dict | None:
    path = cfg.output_dir / RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def lock_holder(cfg: Config) -> int | None:
    """The pid of the training holding the output folder's lock (it writes its pid there), if it runs."""
    try:
        text = (cfg.output_dir / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and _running(int(text)) else None


_children: dict[int, subprocess.Popen] = {}  # processes this UI started: polled so they do not linger as zombies


def _running(pid: int) -> bool:
    """A process this UI started is polled (a finished child is a zombie until then, and a zombie's
    pid answers a signal); any other pid is asked by signal 0."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    return pid_alive(pid)


def running_pid(cfg: Config) -> int | None:
    """The training running on this output folder: the lock's holder, or the process this UI started."""
    holder = lock_holder(cfg)
    if holder:
        return holder
    rec = record(cfg)
    return rec["pid"] if rec and rec.get("kind") == "train" and _running(rec["pid"]) else None


def start(cfg: Config, config_path: Path, overrides: list[str], resume: bool, cwd: Path, total_steps: int = 0) -> int:
    """Start `sdlora train` in its own process; refused while a training holds the folder.
    total_steps (from `plan`) lets the page show progress and an ETA."""
    busy = running_pid(cfg)
    if busy:
        raise UserError(f"{cfg.output_dir} is in use by another sdlora training (pid {busy}); wait for it to finish, "
                        "stop it, or set another output.dir")
    argv = [sys.executable, "-m", "sdlora.cli", "train", str(config_path)]
    for text in overrides:
        argv += ["--set", text]
    if resume:
        argv.append("--resume")
    rec = record(cfg) or {}
    since = rec.get("since", time.time()) if resume else time.time()
    return _spawn(cfg, argv, cwd, {"kind": "train", "overrides": overrides, "resume": resume, "since": since,
                                   "total_steps": total_steps})


def _spawn(cfg: Config, argv: list[str], cwd: Path, info: dict) -> int:
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out / LOG, "wb") as log:
        child = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)  # its own session: a closed tab stops nothing
    _children[child.pid] = child
    atomic_write_text(out / RECORD, json.dumps({**info, "pid": child.pid, "argv": argv, "started": time.time()}))
    return child.pid


def stop(cfg: Config) -> int:
    """SIGINT to the training: it saves its state at the next step boundary and stops (resumable)."""
    pid = running_pid(cfg)
    if not pid:
        raise UserError("no training is running on this output folder")
    os.kill(pid, signal.SIGINT)
    return pid


@dataclass
class Status:
    state: str  # idle | running | finished | stopped | failed
    step: int = 0
    total: int = 0
    eta: str = ""
    loss: list[tuple[int, float]] = field(default_factory=list)
    lr: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    validation: list[tuple[int, float]] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    log_tail: str = ""
    message: str = ""


def status(cfg: Config) -> Status:
    rec = record(cfg)
    pid = running_pid(cfg)
    tail = log_tail(cfg)
    if pid:
        state = "running"
    elif rec is None or rec.get("kind") != "train":
        state = "idle"
    elif "adapter: " in tail and "report: " in tail:
        state = "finished"
    elif "stopped by SIG" in tail:
        state = "stopped"
    else:
        state = "failed"
    since = rec.get("since", 0.0) if rec else 0.0
    logged = scalars(cfg, since)
    loss = logged.get("loss", [])
    total = rec.get("total_steps", 0) if rec else 0
    s = Status(state, loss[-1][0] if loss else 0, total, log_tail=tail)
    s.loss = [(step, value) for step, value, _ in loss]
    s.lr = {tag[3:]: [(step, v) for step, v, _ in points] for tag, points in logged.items() if tag.startswith("lr/")}
    s.validation = [(step, v) for step, v, _ in logged.get("loss/validation", [])]
    rate = seconds_per_step(loss)
    if state == "running" and rate and total:
        s.eta = _duration(rate * max(total - s.step, 0))
    s.previews = previews(cfg)
    errors = [line for line in tail.splitlines() if line.startswith("sdlora: ")]
    s.message = errors[-1] if errors and state in ("failed", "stopped") else ""
    return s


def log_tail(cfg: Config, lines: int = 30) -> str:
    try:
        text = (cfg.output_dir / LOG).read_bytes()[-20000:].decode("utf-8", "replace")
    except OSError:
        return ""
    # tqdm redraws its bar with carriage returns: keep the last drawing of each line
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def previews(cfg: Config) -> list[Path]:
    """In-training preview grids, oldest first (`<output.dir>/previews/epochNNNNNN/`)."""
    return sorted((cfg.output_dir / "previews").glob("epoch*/*.png"))


def grids(cfg: Config) -> list[Path]:
    """Every grid the sampler wrote for this style (samples, epoch comparisons, UI samples), newest first."""
    out = cfg.output_dir
    found = [p for p in out.glob("*/*.png") if "grid" in p.stem] + previews(cfg)
    return sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)


def adapters(cfg: Config) -> list[Path]:
    """The adapters in the output folder: the final one, epochs, steps, resized copies."""
    return sorted(cfg.output_dir.glob("*.safetensors"))


def sample(cfg: Config, config_path: Path, prompt: str, adapter: Path | None, scale: float, seed: int,
           cwd: Path, steps: int | None = None, timeout: float = 1800) -> list[Path]:
    """`sdlora sample` for one prompt (A1111 syntax) at the config's size (1080x720 by default) with one
    adapter at one scale; returns the images it wrote."""
    folder = cfg.output_dir / SAMPLE_FOLDER / time.strftime("%Y%m%d-%H%M%S")
    argv = [sys.executable, "-m", "sdlora.cli", "sample", str(config_path), "--prompt", prompt,
            "--seeds", str(int(seed)), "--out", str(folder), "--lora-dir", str(cfg.output_dir)]
    if adapter is not None:
        argv += ["--lora", str(adapter), "--scales", f"{float(scale):g}"]
    if steps:
        argv += ["--steps", str(int(steps))]
    _run(argv, cwd, timeout)
    return sorted(p for p in folder.glob("*.png") if "grid" not in p.stem)


EPOCHS_FOLDER = "ui_epochs"


def compare_epochs(cfg: Config, config_path: Path, cwd: Path, steps: int | None = None,
                   timeout: float = 3600) -> tuple[list[Path], list[dict]]:
    """`sdlora sample CONFIG --epochs-dir OUTPUT`: the config's prompts x seeds with every epoch's adapter
    (and the final one) side by side; returns the grids and the style figures per epoch: the mean
    colourfulness of its images and their palette distance to the style set (CIELAB delta-E,
    `metrics.palette_distance`, the figure `sdlora run` reports for the final adapter)."""
    from PIL import Image

    folder = cfg.output_dir / EPOCHS_FOLDER
    argv = [sys.executable, "-m", "sdlora.cli", "sample", str(config_path), "--epochs-dir", str(cfg.output_dir),
            "--out", str(folder)]
    if steps:
        argv += ["--steps", str(int(steps))]
    _run(argv, cwd, timeout)
    style = current_manifest(cfg, log=lambda m: None).style_images()
    rows = []
    for label, _ in epoch_files(cfg.output_dir, cfg.output_name):
        images = [Image.open(p) for p in sorted(folder.glob(f"epochs_{label_slug(label)}_p*_seed*.png"))]
        if images:
            rows.append({"adapter": label, "images": len(images),
                         "colourfulness": sum(map(colourfulness, images)) / len(images),
                         "palette distance to the style set": palette_distance(images, style)})
    rows.append({"adapter": "style set", "images": len(style),
                 "colourfulness": sum(map(colourfulness, style)) / len(style), "palette distance to the style set": 0.0})
    return sorted(folder.glob("epochs_grid_seed*.png")), rows


def _run(argv: list[str], cwd: Path, timeout: float) -> None:
    """A CLI command in a new process; its one-line error becomes this UserError."""
    done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if line.startswith("sdlora")]
        raise UserError(errors[-1].removeprefix("sdlora: error: ") if errors else
                        f"{argv[3]} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
