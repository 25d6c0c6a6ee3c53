"""model.quantize: the frozen base held in fp8 (nf4 on CUDA), adapters trained and exported as usual."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train import make_style

from sdlora.adapters import network as lora
from sdlora.config import config_from_dict, load_config
from sdlora.errors import UserError
from sdlora.models import arch, quantize
from sdlora.training.loop import Trainer


def small_unet(dtype=torch.float32):
    torch.manual_seed(0)
    return arch.build_unet("sd_v1", reduced=True).to(dtype).requires_grad_(False)


def test_fp8_storage_halves_the_frozen_weights_bytes_against_fp16():
    unet = small_unet(torch.float16)
    fp16_bytes = sum(m.weight.numel() * 2 for m in unet.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d))
    report = quantize.quantize_frozen(unet, "fp8")
    assert report["bytes_before"] == fp16_bytes
    layers = [m for m in unet.modules() if isinstance(m, quantize.QuantizedLayer)]
    assert len(layers) == report["layers"] > 0
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in unet.modules())
    assert all(m.qweight.dtype == torch.float8_e4m3fn for m in layers)
    # one byte a weight plus one fp32 scale per output channel
    scales = sum(m.scale.numel() * 4 for m in layers)
    assert report["bytes_after"] == fp16_bytes // 2 + scales
    assert report["bytes_after"] / fp16_bytes < 0.55


def test_fp8_layers_compute_the_same_function_and_pass_gradients_to_the_input():
    unet = small_unet()
    quantized = copy.deepcopy(unet)
    quantize.quantize_frozen(quantized, "fp8")
    x = torch.randn(1, 4, 8, 8)
    cond = arch.unet_conditioning(unet, 1, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    expected = unet(x, t, **cond).sample
    x_q = x.clone().requires_grad_(True)
    got = quantized(x_q, t, **cond).sample
    # e4m3 keeps 3 mantissa bits (~3% rms per weight); through the whole U-Net ~10%
    assert (got - expected).norm() / expected.norm() < 0.15
    got.sum().backward()
    x_ref = x.clone().requires_grad_(True)
    unet(x_ref, t, **cond).sample.sum().backward()
    assert (x_q.grad - x_ref.grad).norm() / x_ref.grad.norm() < 0.15
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2]  # one Linear: a few %
    q_layer = quantized.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2]
    h = torch.randn(16, layer.in_features)
    assert (q_layer(h) - layer(h)).norm() / layer(h).norm() < 0.04


def test_quantized_base_composes_with_peft_and_the_adapters_train():
    unet = small_unet()
    network = lora.inject(unet, None, config_from_dict({"network": {"dim": 4, "alpha": 4,
                                                                    "train_text_encoder": False}}).network)
    report = quantize.quantize_frozen(unet, "fp8")
    adapted = [network.layer(k) for k in network.modules]
    assert all(isinstance(m.base_layer, quantize.QuantizedLayer) for m in adapted)
    assert all(m.lora_A[lora.ADAPTER_NAME].weight.dtype == torch.float32 for m in adapted)
    assert report["layers"] > len(adapted)  # the unadapted convs and linears too
    params = network.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond, t = arch.unet_conditioning(unet, 2, generator=g), torch.tensor([300, 700])
    losses = []
    for _ in range(8):
        loss = F.mse_loss(unet(latents + noise, t, **cond).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


def test_nf4_without_cuda_or_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="nf4.*CUDA.*fp8"):
        quantize.require("nf4")
    with pytest.raises(UserError, match="choose one of none, fp8, nf4"):
        quantize.require("int3")


def test_training_on_an_fp8_base_exports_an_adapter_for_the_unquantized_base(tmp_path, mini_base_dir):
    from diffusers import StableDiffusionPipeline

    cfg = load_config(make_style(tmp_path, mini_base_dir), ["model.quantize=fp8", "train.epochs=1"])
    trainer = Trainer(cfg, log=lambda m: None)
    result = trainer.run()
    assert isinstance(trainer.base.unet.conv_in, quantize.QuantizedLayer)
    tensors = load_file(result.adapter)
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert all(v.dtype == torch.float32 for v in tensors.values())  # save_precision, as without quantize
    pipe = StableDiffusionPipeline.from_pretrained(mini_base_dir, safety_checker=None)
    pipe.load_lora_weights(str(result.adapter))  # the plain base takes it
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
