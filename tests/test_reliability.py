"""Hostile and unlucky users (issue 12): every failure ends in one line naming the file and the
fix, nothing is written outside the output folder, nothing non-finite is exported, no pickle is
read, and an interrupted training loses nothing."""

import errno
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import make_style

from sdlora import digest, io, run
from sdlora.adapters.file import save_adapter
from sdlora.cli import main
from sdlora.config import config_from_dict, load_config
from sdlora.data.caption import DEFAULT_VOCABULARY
from sdlora.models import checkpoint, load
from sdlora.training.examples import collect_examples
from sdlora.training.loop import train
from sdlora.training.state import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SMALL = '[sample]\nprompts = ["clrscn"]\nseeds = [1]\nsteps = 1\nwidth = 64\nheight = 64\nlora_scales = [0.0]'


def one_line_error(capsys, code: int, expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sdlora:")]
    assert code != 0 and lines and expected in lines[-1], err[-2000:]
    assert "Traceback" not in err
    return lines[-1]


def small_adapter(path: Path, **change) -> Path:
    """A two-module Kohya LoRA (U-Net to_k of the mini base's shapes), with tensors changed by `change`."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": torch.randn(4, 32) * 0.1, f"{key}.lora_up.weight": torch.randn(32, 4) * 0.1,
               f"{key}.alpha": torch.tensor(2.0)}
    tensors.update({f"{key}.{suffix}": value for suffix, value in change.items()})
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", "ss_base_model_version": "sd_v1"})
    return path


# 1. non-finite training ------------------------------------------------------------------------


def test_diverging_training_stops_with_the_step_and_the_cause_and_exports_nothing(tmp_path, mini_base_dir, capsys):
    path = make_style(tmp_path, mini_base_dir)
    code = main(["train", str(path), "--set", "train.unet_lr=1e4", "--set", "train.text_encoder_lr=1e4"])
    line = one_line_error(capsys, code, "training stopped at step")
    assert "last finite loss" in line and "learning rate" in line
    out = tmp_path / "out"
    assert not (out / "style.safetensors").exists()
    for adapter in out.glob("*.safetensors"):  # whatever was saved before the divergence is finite
        assert all(torch.isfinite(t).all() for t in load_file(adapter).values())


@pytest.mark.parametrize("override", ["train.unet_lr=nan", "train.max_grad_norm=nan", "network.alpha=inf",
                                      "sample.lora_scales=[0.0, nan]"])
def test_config_refuses_nan_and_infinity(tmp_path, mini_base_dir, capsys, override):
    path = make_style(tmp_path, mini_base_dir)
    line = one_line_error(capsys, main(["config", "check", str(path), "--set", override]), "not a finite number")
    assert override.split("=")[0].split(".")[1] in line


def test_non_finite_adapters_are_reported_by_inspect_and_refused_elsewhere(tmp_path, mini_base_dir, capsys):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    bad = small_adapter(tmp_path / "nan.safetensors", **{"lora_up.weight": torch.full((32, 4), math.nan)})
    assert main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "NON-FINITE" in out and f"{key}: lora_up.weight" in out

    assert main(["resize", str(bad), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 2
    one_line_error(capsys, 2, "NaN or infinite")
    assert main(["merge", str(mini_base_dir), str(bad), str(tmp_path / "m.safetensors")]) == 2
    one_line_error(capsys, 2, "NaN or infinite")
    assert not (tmp_path / "r.safetensors").exists() and not (tmp_path / "m.safetensors").exists()
    cfg = make_style(tmp_path, mini_base_dir, extra=SAMPLE_SMALL)
    one_line_error(capsys, main(["sample", str(cfg), "--lora", str(bad)]), "NaN or infinite")
    assert not list((tmp_path / "out").rglob("*.png"))
    with pytest.raises(Exception, match="NaN or infinite"):  # and nothing writes one
        save_adapter(tmp_path / "x.safetensors", load_file(bad), {})


# 2. training state without pickle --------------------------------------------------------------


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_unpickles_and_a_damaged_state_gets_one_line(tmp_path, mini_base_dir, capsys):
    path = make_style(tmp_path, mini_base_dir)
    folder = tmp_path / "out" / "state"
    folder.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"x": RunsCode(marker)}, folder / "training_state.pt")
    line = one_line_error(capsys, main(["train", str(path), "--resume"]), "training_state.pt")
    assert not marker.exists() and "pickle" in line

    (folder / STATE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    line = one_line_error(capsys, main(["train", str(path), "--resume"]), "is damaged")
    assert "without --resume" in line


# 3. Ctrl-C, SIGTERM and save_every_n_steps -----------------------------------------------------


def test_ctrl_c_saves_the_state_at_the_step_and_resume_continues(tmp_path, mini_base_dir, capsys,
                                                                 interrupt_at_step):
    path = make_style(tmp_path, mini_base_dir)
    out = tmp_path / "out"
    interrupt_at_step(6)  # epoch 2, after the epoch-1 adapter was saved
    assert main(["train", str(path)]) == 130
    err = capsys.readouterr().err
    assert "after step 6" in err and "--resume" in err and "Traceback" not in err
    from sdlora.training.state import load_state

    saved = load_state(out / "state" / STATE_FILE)
    assert saved["step"] == 6 and saved["adapters"] == ["style-000001.safetensors"] and saved["seconds"] > 0

    cfg = load_config(path)
    result = train(cfg, resume=True, log=lambda m: None)
    assert result.steps == 8 and len(result.losses) == 8
    assert result.seconds > saved["seconds"]  # the whole training, not the resumed part
    report = (out / "report.md").read_text()
    assert "`style-000001.safetensors`" in report and "`style.safetensors`" in report


def test_kill_9_then_resume_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path, mini_base_dir):
    import time

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings = ["--set", "train.epochs=3", "--set", "train.save_every_n_steps=2"]
    full = train(load_config(make_style(tmp_path / "a", mini_base_dir), [s for s in settings if s != "--set"]),
                       log=lambda m: None)
    path = make_style(tmp_path / "b", mini_base_dir)
    proc = subprocess.Popen([sys.executable, "-m", "sdlora.cli", "train", str(path), *settings],
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = tmp_path / "b" / "out" / "state" / STATE_FILE
    deadline = time.time() + 120
    while not state_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the last save is all there is
    proc.wait()
    assert main(["train", str(path), *settings, "--resume"]) == 0
    resumed = load_file(tmp_path / "b" / "out" / "style.safetensors")
    expected = load_file(full.adapter)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_sigterm_stops_cleanly_with_143(tmp_path, mini_base_dir, capsys, interrupt_at_step):
    def default(signum, frame):  # instead of the default action (the end of this test process)
        raise RuntimeError("SIGTERM reached no handler of the trainer")

    path = make_style(tmp_path, mini_base_dir)
    previous = signal.signal(signal.SIGTERM, default)
    try:
        interrupt_at_step(2, signal.SIGTERM)
        assert main(["train", str(path)]) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "SIGTERM" in capsys.readouterr().err
    assert (tmp_path / "out" / "state" / STATE_FILE).is_file()
    assert main(["train", str(path), "--resume"]) == 0


def test_save_every_n_steps_writes_kohya_named_adapters_and_state(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir), ["train.save_every_n_steps=3",
                                                            "train.save_every_n_epochs=0"])
    result = train(cfg, log=lambda m: None)
    names = [p.name for p in result.adapters]
    assert names == ["style-step00000003.safetensors", "style-step00000006.safetensors", "style.safetensors"]
    assert load_file(result.adapters[0]).keys() == load_file(result.adapter).keys()


# 4. paths stay inside their folder -------------------------------------------------------------


@pytest.mark.parametrize("override, field", [("output.output_name=../../x", "output_name"),
                                             ("output.output_name=/tmp/x", "output_name"),
                                             ('name=""', "name"), ("name=.hidden", "name")])
def test_names_that_are_not_file_names_are_refused(tmp_path, mini_base_dir, capsys, override, field):
    path = make_style(tmp_path, mini_base_dir)
    line = one_line_error(capsys, main(["train", str(path), "--set", override]), "cannot be a file name")
    assert field in line
    assert not list(tmp_path.parent.glob("x*")) and not list(tmp_path.rglob("*.safetensors"))


def test_sample_file_names_from_adapter_metadata_stay_in_the_samples_folder(tmp_path, mini_base_dir):
    from sdlora.sampling import sampler

    adapter = tmp_path / "a.safetensors"
    tensors = load_file(small_adapter(tmp_path / "plain.safetensors"))
    save_file(tensors, str(adapter), metadata={"ss_output_name": "../../escaped"})
    cfg = load_config(make_style(tmp_path, mini_base_dir, extra=SAMPLE_SMALL.replace("[0.0]", "[1.0]")))
    result = sampler.run_sample(cfg, [(adapter, None)], log=lambda m: None)
    folder = (tmp_path / "out" / "samples").resolve()
    assert result.images and all(p.path.resolve().parent == folder for p in result.images)
    assert not list(tmp_path.parent.rglob("escaped*"))


# 5. one training per output folder -------------------------------------------------------------


def test_a_second_training_on_the_same_folder_stops_naming_the_holder(tmp_path, mini_base_dir, capsys):
    path = make_style(tmp_path, mini_base_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from sdlora.io import output_lock
            with output_lock({str(tmp_path / 'out')!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line_error(capsys, main(["train", str(path)]), "in use by another sdlora training")
        assert f"pid {holder.pid}" in line
        assert not (tmp_path / "out" / "style.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock is recovered by the next run.
    assert main(["train", str(path)]) == 0
    assert f"pid {holder.pid}" in capsys.readouterr().out


# 6. captions never replace other files ---------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".JPG", ".webp", ".safetensors", "txt"])
def test_caption_extension_must_be_a_text_type(tmp_path, mini_base_dir, capsys, ext):
    path = make_style(tmp_path, mini_base_dir)
    one_line_error(capsys, main(["config", "check", str(path), "--set", f"dataset.caption_extension={ext!r}"]),
                   "caption_extension")


def test_captions_are_not_written_over_a_file_that_is_not_a_caption(tmp_path, mini_base_dir, capsys):
    path = make_style(tmp_path, mini_base_dir, n=1, captions=False)
    data = tmp_path / "images" / "img0.dat"
    data.write_bytes(b"\x00\x01 the user's binary data")
    code = main(["dataset", str(path), "--retag", "--set", 'dataset.caption_extension=".dat"',
                 "--set", f'caption.vocabulary="{DEFAULT_VOCABULARY}"'])
    assert "img0.dat" in one_line_error(capsys, code, "not a caption file")
    assert data.read_bytes() == b"\x00\x01 the user's binary data"


# 7. the up-to-date check knows the base by content ---------------------------------------------


def test_a_different_base_copied_over_the_same_path_is_not_up_to_date(tmp_path, mini_base_dir):
    import shutil

    from sdlora.tiny.configs import build_pipeline

    base = tmp_path / "base"
    shutil.copytree(mini_base_dir, base)
    (tmp_path / "style").mkdir()
    cfg = load_config(make_style(tmp_path / "style", base), ["train.max_train_steps=1"])
    final = train(cfg, log=lambda m: None).adapter
    assert run.adapter_up_to_date(cfg, final)
    other = tmp_path / "other"
    build_pipeline("mini", seed=1).save_pretrained(other)
    shutil.rmtree(base)
    shutil.copytree(other, base)
    assert not run.adapter_up_to_date(cfg, final)


def test_the_base_digest_is_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    weights, store = tmp_path / "model.safetensors", tmp_path / "digests.json"
    weights.write_bytes(b"weights")
    first = digest.stored_digest(weights, store)
    digest._DIGESTS.clear()
    monkeypatch.setattr(digest, "_sha256", lambda p: pytest.fail("hashed again"))
    assert digest.stored_digest(weights, store) == first


# 8. one line for every expected failure --------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "dataset", "sample"])
def test_disk_full_is_one_line_naming_the_file(tmp_path, mini_base_dir, capsys, monkeypatch, command):
    path = make_style(tmp_path, mini_base_dir, captions=command != "dataset", extra=SAMPLE_SMALL)
    args = {"train": [], "sample": ["--lora", str(small_adapter(tmp_path / "a.safetensors"))],
            "dataset": ["--set", f'caption.vocabulary="{DEFAULT_VOCABULARY}"']}[command]

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    line = one_line_error(capsys, main([command, str(path), *args]), "disk is full")
    assert str(tmp_path) in line and ".tmp" not in line
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_non_utf8_captions_are_read_and_the_file_named(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2))
    (tmp_path / "images" / "img1.txt").write_bytes("clrscn, caf\xe9".encode("latin-1"))
    messages = []
    examples = collect_examples(cfg, log=messages.append)
    assert examples[1].tags == ["clrscn", "caf\xe9"]
    assert any("img1.txt" in m and "not UTF-8" in m for m in messages)


@pytest.mark.parametrize("override, field", [("train.seed=-1", "seed"), ("train.seed=4294967296", "seed"),
                                             ('sample.seeds=["a"]', "seeds[0]"), ("sample.prompts=[1]", "prompts[0]"),
                                             ("caption.blacklist=[1]", "blacklist[0]"),
                                             ("sample.seeds=[1, -2]", "seeds[1]")])
def test_wrong_seeds_and_list_elements_are_config_errors(tmp_path, mini_base_dir, capsys, override, field):
    path = make_style(tmp_path, mini_base_dir)
    assert field in one_line_error(capsys, main(["config", "check", str(path), "--set", override]), field)


def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "style.toml"
    path.write_bytes('trigger = "caf\xe9"\n'.encode("latin-1"))
    assert str(path) in one_line_error(capsys, main(["config", "check", str(path)]), "not UTF-8")


@pytest.mark.parametrize("change, expected", [
    ({"lora_up.weight": torch.randn(32, 3)}, "disagree on the rank"),
    ({"alpha": torch.tensor([2.0, 2.0])}, "alpha must be one number"),
])
def test_malformed_adapters_are_one_line(tmp_path, capsys, change, expected):
    bad = small_adapter(tmp_path / "bad.safetensors", **change)
    one_line_error(capsys, main(["inspect", str(bad)]), expected)
    one_line_error(capsys, main(["resize", str(bad), str(tmp_path / "r.safetensors"), "--rank", "1"]), expected)


def test_inspect_plot_to_an_unwritable_path_is_one_line(tmp_path, capsys):
    adapter = small_adapter(tmp_path / "a.safetensors")
    (tmp_path / "file").write_text("not a folder")
    plot = tmp_path / "file" / "plot.png"
    assert str(plot) in one_line_error(capsys, main(["inspect", str(adapter), "--plot", str(plot)]), "plot.png")


def test_damaged_caches_and_dataset_report_are_rebuilt_and_said(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, extra="text_encoder_lr = 0\nmax_train_steps = 1"),
                      ["dataset.shuffle_caption=false"])
    train(cfg, log=lambda m: None)
    entries = list((tmp_path / "out" / "cache").rglob("*.safetensors"))
    assert any("text" in p.parts for p in entries) and any("latents" in p.parts for p in entries)
    for p in entries:
        p.write_bytes(b"damaged")
    (tmp_path / "out" / "dataset_manifest.json").write_text("{damaged")
    messages = []
    cfg = load_config(cfg.source, ["dataset.shuffle_caption=false", "train.overwrite=true"])
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        train(cfg, log=messages.append)
    said = "\n".join(messages) + printed.getvalue()
    assert "dataset_manifest.json is damaged" in said
    assert said.count("was damaged") == len(entries)


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from sdlora import config

    monkeypatch.setattr(config, "reference_markdown", lambda: 1 / 0)
    assert main(["config", "keys"]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "bug in sdlora" in err and "report" in err


# 9. temp files and file modes ------------------------------------------------------------------


def test_temp_files_of_killed_saves_are_removed_by_the_next_training(tmp_path, mini_base_dir):
    path = make_style(tmp_path, mini_base_dir)
    out = tmp_path / "out"
    (out / "state").mkdir(parents=True)
    dead = out / ".style.safetensors.999999999-k1ll3d.tmp"
    dead.write_bytes(b"half")
    stale_state = out / "state" / ".training_state.safetensors.999999999-x.tmp"
    stale_state.write_bytes(b"half")
    alive = out / f".report.md.{os.getpid()}-mine.tmp"  # a live writer's file stays
    alive.write_bytes(b"writing")
    assert main(["train", str(path), "--set", "train.max_train_steps=1"]) == 0
    assert not dead.exists() and not stale_state.exists() and alive.exists()


def test_saved_files_and_folders_get_the_umask_mode(tmp_path, mini_base_dir):
    old = os.umask(0o022)
    try:
        base = load.load_base(config_from_dict({"model": {"base": str(mini_base_dir)}}).model)
        single = checkpoint.save_single_file(base, tmp_path / "merged.safetensors")
        killed = tmp_path / ".merged.999999999-abcd"  # a folder save killed midway
        (killed / "unet").mkdir(parents=True)
        folder = checkpoint.save_diffusers(base, tmp_path / "merged")
        io.atomic_save_file({"x": torch.zeros(1)}, tmp_path / "cache" / "entry.safetensors")
    finally:
        os.umask(old)
    assert oct(single.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "cache" / "entry.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert not killed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "merged",
                                                                                   "merged.safetensors"]
