"""A full disk, a quota or a file-size limit during training and sampling (issue 20): one line
naming the file and the fix, exit code 2, no traceback, no damaged file under a final name, and
the files of the last good run left as they were.

The limit is the kernel's: RLIMIT_FSIZE in a child process (with SIGXFSZ ignored, a write past it
fails with EFBIG, as a full disk fails with ENOSPC), so every writer is exercised as it is, the
libraries' ones (safetensors, PIL, tensorboard) included."""

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import make_style

from sdlora.cli import main

SAMPLE = '[sample]\nprompts = ["clrscn"]\nseeds = [1]\nsteps = 1\nwidth = 64\nheight = 64\nlora_scales = [0.0, 1.0]'
REPO = Path(__file__).resolve().parents[1]


def _limited(max_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # otherwise the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return preexec


def _run_limited(max_bytes: int, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdlora.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=_limited(max_bytes), timeout=600)


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".sdlora")}


def _assert_one_line(proc, path: Path):
    err = proc.stderr
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("sdlora:")]
    assert len(errors) == 1 and errors[0].startswith(f"sdlora: error: {path}: ") and "file-size limit" in errors[0]


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name != ".sdlora-train.lock"]


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no file-size limit on this OS")
def test_a_failed_write_during_training_keeps_the_last_good_state(tmp_path, mini_base_dir, capsys):
    config = make_style(tmp_path, mini_base_dir, extra=SAMPLE)
    out = tmp_path / "out"
    assert main(["train", str(config)]) == 0  # the last good run: adapters and training state
    good = _snapshot(out)
    state, adapter = out / "state" / "training_state.safetensors", out / "style.safetensors"
    epoch_adapter = out / "style-000001.safetensors"
    assert state.stat().st_size > 2 * adapter.stat().st_size  # the limits below fall between them

    # The training state (fp32 adapter + AdamW moments) is past the limit, the adapters are not.
    proc = _run_limited(2 * adapter.stat().st_size, "train", str(config), "--set", "train.overwrite=true")
    _assert_one_line(proc, state)
    assert state.read_bytes() == good[state] and adapter.read_bytes() == good[adapter]
    assert not _temp_files(out)

    # The first adapter save is past the limit (the run above rewrote the epoch-1 adapter whole).
    good = _snapshot(out)
    proc = _run_limited(adapter.stat().st_size // 2, "train", str(config), "--set", "train.overwrite=true")
    _assert_one_line(proc, epoch_adapter)
    assert {p: p.read_bytes() for p in good if p.suffix == ".safetensors"} == {
        p: b for p, b in good.items() if p.suffix == ".safetensors"}
    assert not _temp_files(out)


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no file-size limit on this OS")
def test_a_failed_write_during_sampling_keeps_the_earlier_images(tmp_path, mini_base_dir, capsys):
    from test_reliability import small_adapter

    config = make_style(tmp_path, mini_base_dir, extra=SAMPLE)
    lora = small_adapter(tmp_path / "a.safetensors")
    assert main(["sample", str(config), "--lora", str(lora)]) == 0
    samples = tmp_path / "out" / "samples"
    good = _snapshot(samples)
    first = min(good, key=lambda p: p.name)
    assert len(good) >= 3 and all(p.suffix == ".png" for p in good)

    proc = _run_limited(min(p.stat().st_size for p in good) // 2, "sample", str(config), "--lora", str(lora))
    failed = next(line for line in proc.stderr.splitlines() if line.startswith("sdlora: error: "))
    path = Path(failed.removeprefix("sdlora: error: ").split(": ")[0])
    _assert_one_line(proc, path)
    assert path in good and _snapshot(samples) == good and first.read_bytes() == good[first]
    assert not _temp_files(samples)


@pytest.mark.parametrize("message", [
    "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors 0.4+
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
])
def test_a_folder_save_failing_in_safetensors_names_the_folder_and_keeps_the_old_one(tmp_path, message):
    """`sdlora merge` to a diffusers folder: save_pretrained's safetensors writer fails on a full disk."""
    import errno

    from safetensors import SafetensorError

    from sdlora.io import atomic_folder, os_error_message

    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(OSError) as e, atomic_folder(folder) as tmp:
        (tmp / "unet").mkdir()
        raise SafetensorError(message)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(folder)
    assert "disk is full" in os_error_message(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and (folder / "model_index.json").read_text() == "{}"


def test_a_safetensors_error_that_is_no_write_failure_stays_what_it_is(tmp_path):
    from safetensors import SafetensorError

    from sdlora.io import atomic_path, os_error_of

    error = SafetensorError("Error while deserializing header: HeaderTooLarge")
    assert os_error_of(error) is None
    with pytest.raises(SafetensorError), atomic_path(tmp_path / "a.safetensors"):
        raise error
    assert list(tmp_path.iterdir()) == []


def test_a_retag_backup_cut_short_by_a_full_disk_leaves_no_half_backup(tmp_path, monkeypatch, capsys):
    import errno

    from test_dataset import demo_copy, write_config

    from sdlora.data import dataset

    images = demo_copy(tmp_path / "images", {"scene_00.png", "scene_01.png"})
    config = write_config(tmp_path, "images")
    assert main(["dataset", str(config)]) == 0
    (images / "scene_01.txt").write_text("my own words, clrscn\n")

    def copy_half_then_fail(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataset.shutil, "copy2", copy_half_then_fail)
    assert main(["dataset", str(config), "--retag"]) == 2
    assert "disk is full" in capsys.readouterr().err
    assert not list(images.glob("*.bak-*")) and not list(images.glob(".*"))
    assert (images / "scene_01.txt").read_text() == "my own words, clrscn\n"
