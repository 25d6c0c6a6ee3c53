"""[train] attention / tf32 / channels_last / compile (speed.py) and the fused AdamW switch."""

import importlib.util
from pathlib import Path

import pytest
import torch
from test_train import make_style

from sdlora.cli import main
from sdlora.config import config_from_dict
from sdlora.models import arch
from sdlora.training import speed
from sdlora.training.optimizers import make_optimizer


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None,
                    reason="xformers and CUDA are both here: nothing is missing")
def test_xformers_attention_is_read_and_says_what_is_missing(tmp_path, mini_base_dir, capsys):
    cfg = make_style(tmp_path, mini_base_dir)
    assert main(["train", str(cfg), "--set", "train.attention=xformers"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdlora:")]
    assert len(errors) == 1 and "train.attention = 'xformers' needs" in errors[0]
    assert "Traceback" not in errors[0]
    assert not (tmp_path / "out" / "style.safetensors").exists()


def test_sdpa_attention_sets_pytorchs_processor_everywhere():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = arch.build_unet("sd_v1", reduced=True)
    unet.set_attn_processor(AttnProcessor())
    speed.set_attention(unet, "sdpa")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


def test_compiled_transformer_blocks_compute_the_same():
    torch.manual_seed(0)
    unet = arch.build_unet("sd_v1", reduced=True).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    cond = arch.unet_conditioning(unet, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unet(x, t, **cond).sample
        blocks = speed.transformer_blocks(unet)
        graphs = []

        def backend(graph, example_inputs):  # what torch.compile hands a backend; runs the graph as is
            graphs.append(graph)
            return graph.forward
        assert speed.compile_blocks(unet, backend=backend) == len(blocks) > 0
        torch.testing.assert_close(unet(x, t, **cond).sample, expected)
    assert graphs  # the blocks ran compiled


def test_apply_turns_on_channels_last_and_reports_it():
    unet = arch.build_unet("sd_v1", reduced=True)
    tc = config_from_dict({"train": {"channels_last": True}}).train
    assert speed.apply(tc, unet, torch.device("cpu")) == ["channels-last"]
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_adamw_is_fused_when_asked():
    tc = config_from_dict({}).train
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(tc, [{"params": params, "lr": 1e-3}], None, fused=True).defaults["fused"] is True
    assert not make_optimizer(tc, [{"params": params, "lr": 1e-3}], None).defaults["fused"]


FAULTS_OF_A_CONV_STEP = """
import contextlib, io, resource, sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "cli":
    from sdlora.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        main(["config", "keys"])
conv = torch.nn.Conv2d(1280, 1280, 3, padding=1).requires_grad_(False)  # SD1.5's largest 3x3 conv, 59 MB
x = torch.randn(1, 1280, 8, 8)
def step():
    conv(x.clone().requires_grad_(True)).square().mean().backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def test_the_cli_keeps_big_training_buffers_instead_of_refaulting_them():
    """oneDNN re-lays a 59 MB conv weight per call; glibc's default mmaps and unmaps that buffer,
    so each call zero-fills ~14k pages again (twice: forward and backward)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    faults = {how: int(subprocess.run([sys.executable, "-c", FAULTS_OF_A_CONV_STEP, how], env=env, check=True,
                                      capture_output=True, text=True).stdout.split()[-1]) for how in ("plain", "cli")}
    assert faults["plain"] > 10_000  # glibc's default on this machine
    assert faults["cli"] < faults["plain"] / 10


def test_the_allocator_setting_yields_to_the_environment(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert speed.tune_cpu_allocator() is False
