"""[train] attention / tf32 / channels_last / compile (speed.py) and the fused AdamW switch."""

import torch

from sdlora import arch, speed, train
from sdlora.cli import main
from sdlora.config import config_from_dict

from test_train import make_style


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
        assert speed.compile_blocks(unet, backend="eager") == len(blocks) > 0
        assert all(b._compiled_call_impl is not None for b in blocks)
        torch.testing.assert_close(unet(x, t, **cond).sample, expected)


def test_apply_turns_on_channels_last_and_reports_it():
    unet = arch.build_unet("sd_v1", reduced=True)
    tc = config_from_dict({"train": {"channels_last": True}}).train
    assert speed.apply(tc, unet, torch.device("cpu")) == ["channels-last"]
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_adamw_is_fused_when_asked():
    tc = config_from_dict({}).train
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert train.make_optimizer(tc, [{"params": params, "lr": 1e-3}], None, fused=True).defaults["fused"] is True
    assert not train.make_optimizer(tc, [{"params": params, "lr": 1e-3}], None).defaults["fused"]
