"""`sdlora bench`: the CPU figures and the GPU suite, run end to end at toy sizes (smoke, not
measurements), with the figures traced back to the timer."""

import contextlib
import io
import json
import math

import pytest
import torch

from sdlora import cli
from sdlora.adapters import keys
from sdlora.bench import parts as bench
from sdlora.bench import suite as benchsuite

GUARDED_HERE = {  # rows that need what this machine may lack, and the one line that says so
    "xformers": "xformers",
    "adamw8bit": "bitsandbytes",
    "quantize nf4": "nf4",
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """`sdlora bench --suite gpu --json PATH` on this (CUDA-less) machine: the reduced suite."""
    out = tmp_path_factory.mktemp("bench") / "bench_gpu.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["bench", "--suite", "gpu", "--json", str(out), "--peak-tflops", "1"]) == 0
    return json.loads(out.read_text()), stdout.getvalue()


def test_gpu_suite_has_every_row_and_only_positive_timed_figures(suite):
    result, _ = suite
    assert result["reduced"] is True and result["device"] == "cpu" and result["peak_tflops"] == 1.0
    names = [row["name"] for row in result["rows"]]
    for expected in ("sd15 fp32 sdpa b1", "sd15 fp32 sdpa b2", "sd15 fp32 xformers b1",
                     "sdxl fp32 b1 checkpointing off",
                     "sdxl fp32 b1 checkpointing on", "sd15 fp32 b2 adamw, unquantized (reference)",
                     "sd15 fp32 b2 adamw8bit", "sd15 fp32 b2 quantize fp8", "sd15 fp32 b2 quantize nf4",
                     "sampler 64x64", "lever tf32 (fp32 b2)", "lever channels_last (fp32 b2)",
                     "lever fused AdamW (adapter parameters)", "lever pinned latents (b2)",
                     "lever no host sync per step (fp32 b2)"):
        assert expected in names
    for row in result["rows"]:
        guard = next((why for key, why in GUARDED_HERE.items() if key in row["name"]), None)
        if row["status"] != "ok":
            assert guard and guard in row["error"] and "\n" not in row["error"], row
            continue
        figures = row["figures"]
        assert figures and row["seconds"] > 0
        for key, value in figures.items():
            if isinstance(value, (int, float)):
                assert math.isfinite(value) and value > 0, (row["name"], key, value)
    by_name = {row["name"]: row for row in result["rows"]}
    sd15 = by_name["sd15 fp32 sdpa b2"]["figures"]
    assert {"samples_per_s", "mfu", "lora_overhead_ratio", "peak_memory_mb"} <= set(sd15)
    # MFU is FLOPs per sample x samples/s / peak, with FLOPs counted from the architecture
    assert sd15["mfu"] == pytest.approx(result["flops_per_sample"]["sd15"] * sd15["samples_per_s"] / 1e12)
    fp8 = by_name["sd15 fp32 b2 quantize fp8"]["figures"]
    assert fp8["frozen_weight_mb"] < 0.3 * fp8["frozen_weight_mb_unquantized"]  # 1 byte against fp32's 4
    assert fp8["loss_last"] < fp8["loss_first"]  # it trains


def test_gpu_suite_prints_a_markdown_table(suite):
    result, stdout = suite
    assert "| row | status | samples/s | MFU | LoRA overhead | peak MB | other |" in stdout
    assert len([line for line in stdout.splitlines() if line.startswith("| sd")]) == len(
        [row for row in result["rows"] if row["name"].startswith("sd")])


class QuarterSecondClock:
    """A clock that advances 0.25 s per reading: every timed call takes 0.25 s."""
    now = 0.0

    @classmethod
    def perf_counter(cls):
        cls.now += 0.25
        return cls.now


def test_figures_are_computed_from_the_timer(monkeypatch):
    monkeypatch.setattr(bench, "time", QuarterSecondClock)
    s = benchsuite.Suite("cpu", reduced=True, budget_s=1e9, peak=2.0, log=lambda m: None)
    t = benchsuite.Trainee("sd_v1", s.shapes, "cpu", torch.float32, 2, s.shapes.sd15_latent)
    figures = s.train_figures(t, "sd15", "sd_v1", s.shapes.sd15_latent)
    # seconds_of reads the clock twice around a run of `steps` steps: 0.25 s per run
    assert figures["seconds_per_step"] == pytest.approx(0.25 / s.shapes.steps)
    assert figures["samples_per_s"] == pytest.approx(2 * s.shapes.steps / 0.25)
    assert figures["lora_overhead_ratio"] == pytest.approx(1.0)
    assert figures["mfu"] == pytest.approx(s.flops["sd15"] * figures["samples_per_s"] / 2e12)
    assert s.flops["sd15"] > 1e6  # counted, not given


def test_a_failing_row_is_one_line_and_the_suite_goes_on():
    s = benchsuite.Suite("cpu", reduced=True, budget_s=1e9, peak=None, log=lambda m: None)

    def broken():
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    assert s.row("broken", broken) is None
    assert s.row("fine", lambda: {"x": 1.0}) == {"x": 1.0}
    broken_row, fine_row = s.result["rows"]
    assert broken_row["status"] == "error" and broken_row["error"] == "RuntimeError: CUDA out of memory."
    assert fine_row["status"] == "ok"
    s.budget_s = 0.0
    s.row("late", lambda: {"x": 1.0})
    assert s.result["rows"][-1]["status"] == "skipped"


def test_peak_table_knows_the_h200_and_says_nothing_for_unknown_gpus():
    assert benchsuite.peak_tflops("NVIDIA H200") == 989.0
    assert benchsuite.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert benchsuite.peak_tflops("Some Future GPU") is None


def test_bench_json_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "figures.json"
    out.write_text("mine")
    assert cli.main(["bench", "--suite", "cpu", "--parts", "none", "--json", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "mine"


def test_training_bench_figures_follow_from_the_timer(monkeypatch):
    monkeypatch.setattr(bench, "time", QuarterSecondClock)
    figures = bench.bench_training("tiny", batch=2, latent=8, repeats=1)
    # a step, a VAE encode and each fwd+bwd all take 0.25 s
    assert figures["train_samples_per_s"] == pytest.approx(2 / 0.25)
    assert figures["train_samples_per_s_uncached"] == pytest.approx(2 / 0.5)
    assert figures["vae_share_uncached"] == pytest.approx(0.5)
    assert figures["lora_overhead_ratio"] == pytest.approx(1.0)
    assert figures["peak_memory_mb"] > 0


def test_sampler_bench_ratios_follow_from_the_timer(monkeypatch):
    monkeypatch.setattr(bench, "time", QuarterSecondClock)
    figures = bench.bench_sampler(steps=2, width=64, height=64, repeats=1, unet_repeats=1)
    for label in ("base", "fused", "unfused"):
        assert figures[f"{label}_s_per_image"] == pytest.approx(0.25)
        assert figures[f"{label}_unet_call_s"] == pytest.approx(0.25)
    for label in ("fused", "unfused"):  # no extra U-Net time: an image with the adapter costs the same
        assert figures[f"{label}_over_base_unet_call"] == pytest.approx(1.0)
        assert figures[f"{label}_over_base"] == pytest.approx(1.0)


def test_first_step_bench_times_a_cold_training_run():
    figures = bench.bench_first_step("tiny", images=2, resolution=64, steps=3)
    assert figures["time_to_first_step_s"] > 0 and figures["steps_per_s"] > 0 and figures["peak_memory_mb"] > 0


def test_bench_json_has_no_nan_even_when_a_figure_diverged(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a: {"train": {"loss": float("nan"), "samples_per_s": 2.0}})
    out = tmp_path / "figures.json"
    assert cli.main(["bench", "--parts", "train", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"train": {"loss": None, "samples_per_s": 2.0}}


def test_training_flops_are_counted_from_the_architecture():
    """SD1.5 at 512 px with Kohya's default targets: ~0.81 TFLOP forward, ~1.75 forward + backward
    (no weight gradients for the frozen base)."""
    assert 1.6e12 < benchsuite.training_flops("sd_v1", 64) < 1.9e12


def test_sd15_shape_table_is_kohyas_192_unet_and_72_text_encoder_modules():
    shapes = bench.sd15_module_shapes()
    parts = [keys.part_of(k) for k in shapes]
    assert parts.count("unet") == 192 and parts.count("te") == 72
    assert shapes["lora_unet_mid_block_attentions_0_proj_in"] == (1280, 1280, 1, 1)  # SD1.x 1x1 conv
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1"] == (3072, 768)


@pytest.mark.slow
def test_bench_resize_reports_seconds_for_264_modules():
    result = bench.bench_resize()
    assert result["modules"] == 264 and result["resize_seconds"] > 0
    assert 1 <= result["new_rank_min"] <= result["new_rank_max"] <= 128
