"""`sdlora bench` runs and reports every figure (tiny sizes: a smoke test, not a measurement)."""

from sdlora import bench, cli
from sdlora.sample import bench_sampler


def test_training_bench_reports_overhead_and_vae_share():
    figures = bench.bench_training("tiny", batch=1, latent=8, repeats=1)
    assert figures["lora_overhead_ratio"] > 0 and figures["train_samples_per_s"] > 0
    assert 0 < figures["vae_share_uncached"] < 1 and figures["vae_share_cached"] == 0.0
    assert figures["peak_memory_mb"] > 0


def test_sampler_bench_reports_per_image_and_unet_ratios():
    figures = bench_sampler(steps=1, width=64, height=64, repeats=1, unet_repeats=1)
    for key in ("base_s_per_image", "fused_s_per_image", "unfused_s_per_image", "fused_over_base",
                "unfused_over_base", "fused_over_base_unet_call", "unfused_over_base_unet_call"):
        assert figures[key] > 0, key


def test_bench_command_prints_a_table(capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda parts, device: {"train_tiny": {"lora_overhead_ratio": 1.05}})
    assert cli.main(["bench", "--parts", "train"]) == 0
    assert "lora_overhead_ratio" in capsys.readouterr().out
