"""Every adapter kind people share: the weight change sdlora computes against a reference written
from each format's published formula (never from sdlora's code), key styles converted on load,
and the kinds sdlora does not read refused by name."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sdlora.adapters import apply, keys, kinds
from sdlora.adapters import network as lora
from sdlora.adapters.file import read_adapter
from sdlora.bench.parts import random_adapter, sd15_module_shapes
from sdlora.errors import UserError
from sdlora.lowrank import svd, tools
from sdlora.lowrank.inspect import inspect


def rand(*shape, seed=None):
    return torch.randn(*shape, generator=None if seed is None else torch.Generator().manual_seed(seed))


# References from the papers / LyCORIS's stated maths, in numpy ---------------------------------


def ref_dora(W0, dW, m, axis):
    """Liu et al. 2024: W' = m * V / ||V||, V = W0 + dW, the norm per output row (axis 0) or input column (1)."""
    V = W0 + dW
    if axis == 0:
        norm = np.sqrt((V.reshape(V.shape[0], -1) ** 2).sum(1)).reshape(-1, *[1] * (V.ndim - 1))
    else:
        norm = np.sqrt((np.moveaxis(V, 1, 0).reshape(V.shape[1], -1) ** 2).sum(1)).reshape(1, -1, *[1] * (V.ndim - 2))
    return m.reshape(norm.shape) * V / norm - W0


def ref_lokr(w1, w2):
    """delta[(i, j), (m, n), ...] = w1[i, m] * w2[j, n, ...] (the Kronecker product of the two factors)."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = np.zeros((a * b, c * d, *w2.shape[2:]))
    for i in range(a):
        for m in range(c):
            out[i * b:(i + 1) * b, m * d:(m + 1) * d] = w1[i, m] * w2
    return out


def np_(t):
    return t.double().numpy()


# DoRA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("conv", [False, True])
def test_dora_delta_is_the_weight_decomposed_update(axis, conv):
    torch.manual_seed(0)
    shape = (6, 5, 3, 3) if conv else (6, 5)
    down = torch.randn(2, *shape[1:])
    up = torch.randn(6, 2, *([1, 1] if conv else []))
    W0 = torch.randn(shape)
    m_shape = [1] * len(shape)
    m_shape[axis] = shape[axis]
    m = torch.rand(m_shape) + 0.5
    parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.0), "dora_scale": m}
    dW = np_(up.reshape(6, 2) @ down.reshape(2, -1)).reshape(shape) * 0.5
    expected = ref_dora(np_(W0), dW, np_(m), axis)
    delta = kinds.module_delta(parts, shape, W0)
    np.testing.assert_allclose(delta.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert kinds.module_variant(parts) == "lora+dora"
    # The adapted weight has exactly the stored magnitude along the axis.
    adapted = (W0 + delta).movedim(axis, 0)
    torch.testing.assert_close(adapted.reshape(shape[axis], -1).norm(dim=1), m.flatten(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="base weight"):
        kinds.module_delta(parts, shape)


def test_dora_on_loha_and_a_wrong_magnitude_shape():
    torch.manual_seed(0)
    parts = {"hada_w1_a": torch.randn(6, 2), "hada_w1_b": torch.randn(2, 5), "hada_w2_a": torch.randn(6, 2),
             "hada_w2_b": torch.randn(2, 5), "dora_scale": torch.rand(6, 1) + 0.5}
    W0 = torch.randn(6, 5)
    dW = np_(parts["hada_w1_a"] @ parts["hada_w1_b"]) * np_(parts["hada_w2_a"] @ parts["hada_w2_b"])
    np.testing.assert_allclose(np_(kinds.module_delta(parts, (6, 5), W0)),
                               ref_dora(np_(W0), dW, np_(parts["dora_scale"]), 0), rtol=1e-4, atol=1e-5)
    parts["dora_scale"] = torch.ones(7, 1)
    with pytest.raises(UserError, match="different base model"):
        kinds.module_delta(parts, (6, 5), W0)


# Tucker LoCon ---------------------------------------------------------------------------------


def test_tucker_locon_acts_like_its_three_convolutions():
    torch.manual_seed(0)
    down, mid, up = torch.randn(3, 5, 1, 1), torch.randn(3, 3, 3, 3), torch.randn(8, 3, 1, 1)
    parts = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up, "alpha": torch.tensor(1.5)}
    delta = kinds.module_delta(parts, (8, 5, 3, 3))
    x = torch.randn(1, 5, 7, 7)
    # LyCORIS's forward: up(mid(down(x))) * alpha / rank, mid carrying the base conv's kernel and padding.
    expected = 0.5 * F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), expected, rtol=1e-4, atol=1e-4)
    assert kinds.module_variant(parts) == "lora+tucker"


# LoKr -----------------------------------------------------------------------------------------


def test_lokr_linear_with_and_without_low_rank_factors():
    torch.manual_seed(0)
    w1, w2a, w2b = torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 5)
    parts = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}
    assert kinds.module_kind(parts) == "lokr" and kinds.module_rank(parts) == 2
    np.testing.assert_allclose(np_(kinds.module_delta(parts, (8, 15))), ref_lokr(np_(w1), np_(w2a @ w2b)) * 0.5,
                               rtol=1e-5, atol=1e-6)
    # Both factors full: no rank, scale 1 whatever alpha says (LyCORIS writes alpha = dim; the UIs use 1).
    full = {"lokr_w1": w1, "lokr_w2": torch.randn(4, 5), "alpha": torch.tensor(4.0)}
    assert kinds.module_rank(full) is None and kinds.module_scale(full) == 1.0
    np.testing.assert_allclose(np_(kinds.module_delta(full, (8, 15))), ref_lokr(np_(w1), np_(full["lokr_w2"])),
                               rtol=1e-5, atol=1e-6)
    # w1 low-rank too (decompose_both): the rank is w1_b's.
    both = {"lokr_w1_a": torch.randn(2, 3), "lokr_w1_b": torch.randn(3, 3), "lokr_w2_a": w2a, "lokr_w2_b": w2b,
            "alpha": torch.tensor(6.0)}
    assert kinds.module_scale(both) == 2.0
    np.testing.assert_allclose(np_(kinds.module_delta(both, (8, 15))),
                               ref_lokr(np_(both["lokr_w1_a"] @ both["lokr_w1_b"]), np_(w2a @ w2b)) * 2,
                               rtol=1e-5, atol=1e-5)


def test_lokr_convs_plain_and_tucker():
    torch.manual_seed(0)
    w1 = torch.randn(2, 2)
    w2a, w2b = torch.randn(3, 2), torch.randn(2, 4 * 9)  # w2_b [r, d * k * k]
    plain = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}
    np.testing.assert_allclose(np_(kinds.module_delta(plain, (6, 8, 3, 3))),
                               ref_lokr(np_(w1), np_(w2a @ w2b).reshape(3, 4, 3, 3)), rtol=1e-5, atol=1e-5)
    t2, ta, tb = torch.randn(2, 2, 3, 3), torch.randn(2, 3), torch.randn(2, 4)  # Tucker: w2_a [r, b], w2_b [r, d]
    tucker = {"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": ta, "lokr_w2_b": tb}
    w2 = np.einsum("ijkl,ip,jq->pqkl", np_(t2), np_(ta), np_(tb))
    np.testing.assert_allclose(np_(kinds.module_delta(tucker, (6, 8, 3, 3))), ref_lokr(np_(w1), w2),
                               rtol=1e-5, atol=1e-5)
    assert kinds.module_variant(tucker) == "lokr+tucker"


# Spectra from the factors ----------------------------------------------------------------------


def _kinds():
    torch.manual_seed(0)
    return {
        "lora": ({"lora_down.weight": torch.randn(3, 20), "lora_up.weight": torch.randn(12, 3)}, (12, 20)),
        "tucker": ({"lora_down.weight": torch.randn(3, 4, 1, 1), "lora_mid.weight": torch.randn(3, 3, 3, 3),
                    "lora_up.weight": torch.randn(12, 3, 1, 1)}, (12, 4, 3, 3)),
        "loha": ({"hada_w1_a": torch.randn(12, 3), "hada_w1_b": torch.randn(3, 20), "hada_w2_a": torch.randn(12, 3),
                  "hada_w2_b": torch.randn(3, 20)}, (12, 20)),
        "loha_tucker": ({"hada_w1_a": torch.randn(2, 12), "hada_w1_b": torch.randn(2, 4), "hada_t1": torch.randn(2, 2, 3, 3),
                         "hada_w2_a": torch.randn(2, 12), "hada_w2_b": torch.randn(2, 4),
                         "hada_t2": torch.randn(2, 2, 3, 3)}, (12, 4, 3, 3)),
        "lokr": ({"lokr_w1": torch.randn(3, 4), "lokr_w2_a": torch.randn(4, 2), "lokr_w2_b": torch.randn(2, 5)}, (12, 20)),
        "lokr_full_conv": ({"lokr_w1": torch.randn(3, 2), "lokr_w2": torch.randn(4, 2, 3, 3)}, (12, 4, 3, 3)),
    }


@pytest.mark.parametrize("name", list(_kinds()))
def test_spectrum_from_the_factors_is_the_dense_svd(name):
    parts, shape = _kinds()[name]
    dense = kinds.module_update(parts, shape).reshape(shape[0], -1).double()
    S_dense = torch.linalg.svdvals(dense)
    S, top = svd.module_spectrum(parts)
    n = min(S.numel(), S_dense.numel())
    torch.testing.assert_close(S[:n].double(), S_dense[:n], rtol=1e-4, atol=1e-4)
    assert float(torch.cat([S[n:].double(), S_dense[n:], torch.zeros(1)]).abs().max()) < 1e-4 * float(S[0])
    for k in (1, 3):  # the top-k factors are the best rank-k approximation (Eckart-Young)
        up, down = top(k)
        error = float((dense - (up @ down).double()).norm())
        torch.testing.assert_close(error, float(S_dense[k:].norm()), rtol=1e-3, atol=1e-4)


# Key styles -------------------------------------------------------------------------------------


def _peft_unet_and_te(seed=0):
    """A mini U-Net and text encoder with random peft LoRA adapters (what diffusers' trainers save)."""
    from peft import LoraConfig

    from sdlora.tiny.configs import build_components

    _, text_encoder, _, unet, _ = build_components("mini", seed=0)
    gen = torch.Generator().manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "proj_in"]))
    from peft import inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "fc1"]), text_encoder)
    with torch.no_grad():
        for model in (unet, text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return unet, text_encoder


def test_a_diffusers_saved_lora_reads_as_the_same_kohya_modules(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    unet, text_encoder = _peft_unet_and_te()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 2}, text_encoder_lora_adapter_metadata={"r": 4, "lora_alpha": 2})
    notes = []
    tensors, _ = read_adapter(tmp_path / "pytorch_lora_weights.safetensors", log=notes.append)
    assert any("converted from diffusers" in n for n in notes)
    groups = keys.group_modules(tensors)
    for part, model in (("unet", unet), ("te", text_encoder)):
        adapted = {p: m for p, m in model.named_modules() if hasattr(m, "lora_A")}
        assert adapted
        for path, layer in adapted.items():
            parts = groups[keys.kohya_key(part, path)]
            expected = layer.get_delta_weight("default")  # peft's own delta: scale lora_alpha / r = 0.5
            torch.testing.assert_close(kinds.module_delta(parts, expected.shape), expected, rtol=1e-5, atol=1e-6)
    assert len(groups) == sum(1 for m in unet.modules() if hasattr(m, "lora_A")) + \
        sum(1 for m in text_encoder.modules() if hasattr(m, "lora_A"))


@pytest.mark.parametrize("style", ["lora_A", "lora.down", "lora_linear_layer", "processor"])
def test_older_diffusers_key_styles(tmp_path, style):
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    unet_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    te_path = "text_model.encoder.layers.0.self_attn.q_proj"
    names = {
        "lora_A": (f"unet.{unet_path}.to_out.0.lora_A.weight", f"unet.{unet_path}.to_out.0.lora_B.weight"),
        "lora.down": (f"unet.{unet_path}.to_out.0.lora.down.weight", f"unet.{unet_path}.to_out.0.lora.up.weight"),
        "lora_linear_layer": (f"text_encoder.{te_path}.lora_linear_layer.down.weight",
                              f"text_encoder.{te_path}.lora_linear_layer.up.weight"),
        "processor": (f"unet.{unet_path}.processor.to_out_lora.down.weight",
                      f"unet.{unet_path}.processor.to_out_lora.up.weight"),
    }[style]
    path = tmp_path / "a.safetensors"
    save_file({names[0]: down, names[1]: up}, str(path))
    tensors, _ = read_adapter(path, log=lambda m: None)
    key = (keys.kohya_key("te", te_path) if style == "lora_linear_layer"
           else keys.kohya_key("unet", f"{unet_path}.to_out.0"))
    assert set(tensors) == {f"{key}.lora_down.weight", f"{key}.lora_up.weight"}
    assert torch.equal(tensors[f"{key}.lora_down.weight"], down)


def _peft_pipeline_with_patterns(seed=0, use_dora=False):
    """A mini pipeline with random peft LoRA (or DoRA) in U-Net and text encoder, per-module ranks and alphas."""
    from peft import LoraConfig, inject_adapter_in_model

    from sdlora.tiny.configs import build_pipeline

    pipe = build_pipeline("mini", seed=0)
    pipe.unet.add_adapter(LoraConfig(
        r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "proj_in", "conv2"],
        rank_pattern={"to_k": 2, "conv2": 3}, alpha_pattern={"to_k": 8, "down_blocks.0.resnets.0.conv2": 6},
        use_dora=use_dora))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "fc1"], use_rslora=True,
                                       rank_pattern={"fc1": 2}, alpha_pattern={"q_proj": 1}, use_dora=use_dora),
                            pipe.text_encoder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return pipe


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_rank_and_alpha_patterns_merge_as_diffusers_fuses_them(tmp_path, use_dora):
    """peft's per-module alpha (alpha_pattern, in diffusers' lora_adapter_metadata) and rsLoRA, with and
    without DoRA: sdlora merge gives every weight diffusers' load_lora_weights + fuse_lora gives, every
    module changes as peft's own layer does, merged and sampled, and inspect shows each module's alpha."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    from sdlora.cli import main
    from sdlora.sampling.sampler import AdapterSet
    from sdlora.tiny.configs import build_pipeline

    build_pipeline("mini", seed=0).save_pretrained(tmp_path / "base")
    pipe = _peft_pipeline_with_patterns(use_dora=use_dora)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    adapter = tmp_path / "lora" / "pytorch_lora_weights.safetensors"

    reference = build_pipeline("mini", seed=0)
    reference.load_lora_weights(tmp_path / "lora")
    reference.fuse_lora()
    reference.unload_lora_weights()
    assert main(["merge", str(tmp_path / "base"), str(adapter), str(tmp_path / "merged"),
                 "--save-precision", "fp32"]) == 0
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", safety_checker=None)
    base = build_pipeline("mini", seed=0)
    # diffusers 0.42 leaves a text encoder's DoRA magnitudes at peft's initial norm(W0) instead of
    # loading them (its fused weights then differ from peft's own layers), so there peft is the reference.
    fused_by_diffusers = ("unet",) if use_dora else ("unet", "text_encoder")
    changed = 0
    for component in fused_by_diffusers:
        expected = dict(getattr(reference, component).named_parameters())
        got = dict(getattr(merged, component).named_parameters())
        for name, before in getattr(base, component).named_parameters():
            if not torch.equal(expected[name], before):
                changed += 1
                error = (got[name] - expected[name]).abs().max() / (expected[name] - before).abs().max()
                assert error <= 1e-5, f"{component}.{name}: relative error {float(error):.3g}"
    assert changed == sum(1 for c in fused_by_diffusers for m in getattr(pipe, c).modules() if hasattr(m, "lora_A"))
    sampled = build_pipeline("mini", seed=0)
    adapters = AdapterSet(sampled, fuse=False)  # as `sdlora sample` applies it (diffusers' peft layers unless DoRA)
    adapters.add(adapter)
    adapters.set_weights([1.0])
    gen = torch.Generator().manual_seed(1)
    for component in ("unet", "text_encoder"):
        for path, layer in getattr(pipe, component).named_modules():
            if not hasattr(layer, "lora_A"):
                continue
            base_layer, merged_layer = layer.get_base_layer(), getattr(merged, component).get_submodule(path)
            sampled_layer = getattr(sampled, component).get_submodule(path)
            shape = (3, base_layer.in_features) if isinstance(base_layer, torch.nn.Linear) else \
                (1, base_layer.in_channels, 8, 8)
            x = torch.randn(shape, generator=gen)
            with torch.no_grad():
                expected = layer(x) - base_layer(x)
                for got in (merged_layer(x) - base_layer(x), sampled_layer(x) - base_layer(x)):
                    assert float((got - expected).norm() / expected.norm()) <= 1e-5, f"{component}.{path}"

    alphas = {m["key"]: m["alpha"] for m in inspect(adapter)["modules"]}  # what `sdlora inspect` prints
    for key, alpha in alphas.items():
        if key.endswith("to_k"):
            assert alpha == pytest.approx(8)  # alpha_pattern
        elif key == keys.kohya_key("unet", "down_blocks.0.resnets.0.conv2"):
            assert alpha == pytest.approx(6)  # a pattern naming one module's full path
        elif key.startswith("lora_unet"):
            assert alpha == pytest.approx(2)  # lora_alpha (conv2's rank 3 from rank_pattern)
        else:  # rsLoRA: scale alpha / sqrt(r), so Kohya's alpha (scale * r) is alpha * sqrt(r)
            assert alpha == pytest.approx((1 if key.endswith("q_proj") else 4) * (4 if key.endswith("q_proj") else 2) ** 0.5)


def test_sampling_through_diffusers_keeps_each_modules_alpha(tmp_path):
    """A Kohya file whose attention modules' alphas differ (a resized file, peft's alpha_pattern): diffusers
    0.42 alone would give every module the most common alpha; sampled, each changes by alpha / r * up @ down."""
    from sdlora.sampling.sampler import AdapterSet
    from sdlora.tiny.configs import build_pipeline

    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    ranks_alphas = {"to_q": (4, 2.0), "to_k": (2, 8.0), "to_v": (4, 2.0), "to_out.0": (4, 2.0)}
    modules = {keys.kohya_key("unet", f"{attn}.{name}"): {"lora_down.weight": rand(r, 32, seed=r),
                                                            "lora_up.weight": rand(32, r, seed=r + 1),
                                                            "alpha": torch.tensor(alpha)}
               for name, (r, alpha) in ranks_alphas.items()}
    path = _file(tmp_path / "alphas.safetensors", modules)
    pipe, base = build_pipeline("mini", seed=0), build_pipeline("mini", seed=0)
    adapters = AdapterSet(pipe, fuse=False)
    adapter = adapters.add(path)
    adapters.set_weights([1.0])
    assert adapter.name  # loaded by diffusers, not patched
    x = rand(3, 32, seed=9)
    for name, (r, alpha) in ranks_alphas.items():
        parts = modules[keys.kohya_key("unet", f"{attn}.{name}")]
        expected = F.linear(x, alpha / r * parts["lora_up.weight"] @ parts["lora_down.weight"])
        with torch.no_grad():
            got = pipe.unet.get_submodule(f"{attn}.{name}")(x) - base.unet.get_submodule(f"{attn}.{name}")(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_model_saved_adapter_reads_its_unprefixed_config(tmp_path):
    """`UNet2DConditionModel.save_lora_adapter` writes unprefixed keys and config: its alphas apply too."""
    pipe = _peft_pipeline_with_patterns()
    pipe.unet.save_lora_adapter(tmp_path)
    tensors, _ = read_adapter(tmp_path / "pytorch_lora_weights.safetensors", log=lambda m: None)
    groups = keys.group_modules(tensors)
    for path, layer in pipe.unet.named_modules():
        if hasattr(layer, "lora_A"):
            expected = layer.get_delta_weight("default")  # peft's own change, its per-module scale
            torch.testing.assert_close(kinds.module_delta(groups[keys.kohya_key("unet", path)], expected.shape),
                                       expected, rtol=1e-5, atol=1e-6)


def test_peft_dora_magnitude_becomes_dora_scale(tmp_path):
    path = tmp_path / "dora.safetensors"
    p = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{p}.lora_A.weight": torch.randn(2, 8), f"{p}.lora_B.weight": torch.randn(6, 2),
               f"{p}.lora_magnitude_vector": torch.rand(6)}, str(path))
    tensors, _ = read_adapter(path, log=lambda m: None)
    key = keys.kohya_key("unet", p.removeprefix("unet."))
    assert tensors[f"{key}.dora_scale"].shape == (6, 1)
    assert kinds.dora.dora_axis(tensors[f"{key}.dora_scale"], (6, 8)) == 0


def test_bundled_embeddings_are_left_out_with_a_note(tmp_path):
    path = tmp_path / "bundle.safetensors"
    key = "lora_unet_mid_block_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.randn(2, 8), f"{key}.lora_up.weight": torch.randn(8, 2),
               "bundle_emb.mychar.string_to_param.*": torch.randn(2, 768)}, str(path))
    notes = []
    tensors, _ = read_adapter(path, log=notes.append)
    assert set(tensors) == {f"{key}.lora_down.weight", f"{key}.lora_up.weight"}
    assert notes == ["note: bundle.safetensors: 1 bundled embedding(s) ignored (mychar); only the LoRA part is loaded"]


# Renders: each kind changes the image exactly as the reference network does ---------------------


@pytest.fixture(scope="module")
def mini_cfg(tmp_path_factory):
    from sdlora.config import config_from_dict
    from sdlora.tiny.configs import build_pipeline

    folder = tmp_path_factory.mktemp("mini_base")
    build_pipeline("mini", seed=0).save_pretrained(folder)
    return config_from_dict({"model": {"base": str(folder)}, "output": {"dir": str(folder / "out")},
                             "sample": {"prompts": ["a red house"], "width": 64, "height": 64, "steps": 3,
                                        "seeds": [5], "hires": "off"}})


def _module(kind: str, W0: torch.Tensor, gen) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """(Kohya tensors of one module of `kind` fitting W0, the reference W' - W0 from the formula)."""
    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=gen) * s

    out, fan_in, kernel = W0.shape[0], W0.shape[1], tuple(W0.shape[2:])
    rank, alpha = 2, 1.0
    conv3 = kernel == (3, 3)
    W = np_(W0)
    if kind == "lokr":
        w1, w2a, w2b = r(2, 2, s=1.0), r(out // 2, rank), r(rank, fan_in // 2 * int(np.prod(kernel or (1,))))
        parts = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}
        w2 = np_(w2a @ w2b).reshape(out // 2, fan_in // 2, *kernel)
        return {**parts, "alpha": torch.tensor(alpha)}, ref_lokr(np_(w1), w2) * alpha / rank
    if kind == "tucker" and conv3:
        down, mid, up = r(rank, fan_in, 1, 1), r(rank, rank, 3, 3), r(out, rank, 1, 1)
        parts = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
        dW = np.einsum("pi,ijkl,jq->pqkl", np_(up)[:, :, 0, 0], np_(mid), np_(down)[:, :, 0, 0])
        return {**parts, "alpha": torch.tensor(alpha)}, dW * alpha / rank
    if kind.startswith("loha"):
        cols = fan_in * int(np.prod(kernel or (1,)))
        parts = {"hada_w1_a": r(out, rank), "hada_w1_b": r(rank, cols), "hada_w2_a": r(out, rank),
                 "hada_w2_b": r(rank, cols)}
        dW = (np_(parts["hada_w1_a"] @ parts["hada_w1_b"]) * np_(parts["hada_w2_a"] @ parts["hada_w2_b"])).reshape(W.shape)
    else:  # lora (and the Linear / 1x1 modules of the Tucker file)
        parts = {"lora_down.weight": r(rank, fan_in, *kernel), "lora_up.weight": r(out, rank, *([1, 1] if kernel else []))}
        dW = (np_(parts["lora_up.weight"]).reshape(out, rank) @ np_(parts["lora_down.weight"]).reshape(rank, -1)).reshape(W.shape)
    parts["alpha"] = torch.tensor(alpha)
    dW = dW * alpha / rank
    if kind.endswith("dora"):
        axis = 1 if kernel else 0  # both of LyCORIS's layouts: per input column for convs, per output row else
        m_shape = [1] * W.ndim
        m_shape[axis] = W.shape[axis]
        norms = np.sqrt((np.moveaxis(W, axis, 0).reshape(W.shape[axis], -1) ** 2).sum(1)).reshape(m_shape)
        m = norms * (1 + 0.5 * np_(torch.rand(m_shape, generator=gen)))
        parts["dora_scale"] = torch.tensor(m, dtype=torch.float32)
        return parts, ref_dora(W, dW, m, axis)
    return parts, dW


def _render(cfg, loras=(), base=None):
    from sdlora.sampling import sampler as sample

    sampler = sample.Sampler(cfg, base=base)
    for path, weight in loras:
        sampler.adapters.add(path, weight)
    sampler.adapters.set_scale(1.0)
    images, _ = sampler.render(["a red house"], [5], 64, 64, 3)
    sampler.adapters.close()
    return np.asarray(images[0], dtype=np.int16)


@pytest.mark.parametrize("kind", ["lora_dora", "tucker", "lokr", "loha_dora"])
def test_each_kind_renders_as_the_reference_network(mini_cfg, tmp_path, kind):
    from sdlora.models.load import load_base

    base = load_base(mini_cfg.model)
    gen = torch.Generator().manual_seed(1)
    tensors, reference = {}, {}
    for part, model in (("unet", base.unet), ("te", base.text_encoder)):
        for key, path in keys.kohya_module_map(model, part).items():
            if key.endswith(("attn2_to_k", "resnets_0_conv1", "attentions_0_proj_in", "self_attn_q_proj")):
                layer = model.get_submodule(path)
                parts, delta = _module(kind, layer.weight.detach(), gen)
                tensors.update({f"{key}.{name}": t for name, t in parts.items()})
                reference[layer] = delta
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    base_render = _render(mini_cfg, base=base)
    for multiplier in (1.0, 0.5) if kind == "lora_dora" else (1.0,):  # DoRA: the multiplier scales W' - W0
        with torch.no_grad():  # the reference network: W0 + w (W' - W0), A1111's and ComfyUI's rule
            patched = load_base(mini_cfg.model)
            layers = {n: m for n, m in base.unet.named_modules()} | {n: m for n, m in base.text_encoder.named_modules()}
            names = {id(m): n for n, m in layers.items()}
            targets = dict(patched.unet.named_modules()) | dict(patched.text_encoder.named_modules())
            for layer, delta in reference.items():
                target = targets[names[id(layer)]]
                target.weight.copy_(target.weight + multiplier * torch.tensor(delta, dtype=torch.float32))
        expected = _render(mini_cfg, base=patched)
        got = _render(mini_cfg, [(path, multiplier)])
        assert np.abs(got - expected).max() <= 1
        assert np.abs(got - base_render).mean() > 1  # the adapter visibly changes the render


# resize / inspect / convert / merge on every kind -----------------------------------------------

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _file(path, modules: dict[str, dict[str, torch.Tensor]], metadata=None):
    save_file({f"{k}.{n}": t for k, parts in modules.items() for n, t in parts.items()}, str(path), metadata)
    return path


def test_resize_of_tucker_locon_writes_a_valid_3x3_lora_with_the_same_change(tmp_path):
    torch.manual_seed(0)
    tucker = {"lora_down.weight": torch.randn(4, 8, 1, 1), "lora_mid.weight": torch.randn(4, 4, 3, 3),
              "lora_up.weight": torch.randn(6, 4, 1, 1), "alpha": torch.tensor(2.0)}
    src = _file(tmp_path / "t.safetensors", {CONV: tucker}, {"ss_network_module": "lycoris.kohya",
                                                             "ss_network_args": json.dumps({"algo": "locon"})})
    report = tools.resize(src, tmp_path / "r.safetensors", rank=4)
    tensors, metadata = read_adapter(tmp_path / "r.safetensors")
    parts = keys.group_modules(tensors)[CONV]
    assert parts["lora_down.weight"].shape == (4, 8, 3, 3) and parts["lora_up.weight"].shape == (6, 4, 1, 1)
    # The Tucker change has rank <= 4 as a [6, 72] matrix: rank 4 keeps it whole.
    torch.testing.assert_close(kinds.module_delta(parts, (6, 8, 3, 3)), kinds.module_delta(tucker, (6, 8, 3, 3)),
                               rtol=1e-4, atol=1e-4)
    assert report.modules[0].kind == "lora+tucker"
    assert metadata["ss_network_module"] == "networks.lora"


def test_resize_keeps_dora_and_says_so_truthfully(tmp_path):
    torch.manual_seed(0)
    dora = {"lora_down.weight": torch.randn(8, 16), "lora_up.weight": torch.randn(12, 8) * 0.1,
            "alpha": torch.tensor(8.0), "dora_scale": torch.rand(12, 1) + 0.5}
    args = json.dumps({"algo": "lora", "dora_wd": "True"})
    src = _file(tmp_path / "d.safetensors", {LINEAR: dora}, {"ss_network_module": "lycoris.kohya",
                                                             "ss_network_args": args, "ss_network_dim": "8"})
    tools.resize(src, tmp_path / "r.safetensors", rank=8)
    tensors, metadata = read_adapter(tmp_path / "r.safetensors")
    parts = keys.group_modules(tensors)[LINEAR]
    assert torch.equal(parts["dora_scale"], dora["dora_scale"])
    assert json.loads(metadata["ss_network_args"])["dora_wd"] == "True"
    W0 = torch.randn(12, 16)
    torch.testing.assert_close(kinds.module_delta(parts, (12, 16), W0), kinds.module_delta(dora, (12, 16), W0),
                               rtol=1e-4, atol=1e-4)
    # A file claiming dora_wd without any dora_scale: the resized file no longer claims it.
    plain = {k: v for k, v in dora.items() if k != "dora_scale"}
    src = _file(tmp_path / "p.safetensors", {LINEAR: plain}, {"ss_network_args": args})
    tools.resize(src, tmp_path / "p2.safetensors", rank=2)
    assert "dora_wd" not in json.loads(read_adapter(tmp_path / "p2.safetensors")[1]["ss_network_args"])


def test_resize_and_inspect_of_lokr_and_loha(tmp_path, capsys):
    from sdlora.cli import main

    parts, shape = _kinds()["lokr"]
    loha, _ = _kinds()["loha"]
    src = _file(tmp_path / "k.safetensors", {LINEAR: {**parts, "alpha": torch.tensor(1.0)},
                                            "lora_te_text_model_encoder_layers_0_mlp_fc1": loha})
    assert main(["inspect", str(src), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    by_key = {m["key"]: m for m in summary["modules"]}
    assert by_key[LINEAR]["kind"] == "lokr" and by_key[LINEAR]["rank"] == 2
    S = torch.linalg.svdvals(kinds.module_delta({**parts, "alpha": torch.tensor(1.0)}, shape))
    np.testing.assert_allclose(by_key[LINEAR]["singular_values"][:4], S[:4].numpy(), rtol=1e-4)
    assert main(["resize", str(src), str(tmp_path / "r.safetensors"), "--energy", "1.0"]) == 0
    assert "loha, lokr modules; the output is a LoRA file" in capsys.readouterr().out
    resized = keys.group_modules(read_adapter(tmp_path / "r.safetensors")[0])
    torch.testing.assert_close(kinds.module_delta(resized[LINEAR], shape),
                               kinds.module_delta({**parts, "alpha": torch.tensor(1.0)}, shape), rtol=1e-4, atol=1e-4)


def test_convert_writes_a_kohya_file_that_reads_back_the_same(tmp_path, capsys):
    from sdlora.cli import main

    p = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    down, up = torch.randn(2, 8), torch.randn(6, 2)
    src = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"{p}.lora_A.weight": down, f"{p}.lora_B.weight": up}, str(src),
              {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 1, "unet.r": 2})})
    out = tmp_path / "kohya.safetensors"
    assert main(["convert", str(src), str(out)]) == 0
    raw = read_adapter(out, log=lambda m: None)
    key = keys.kohya_key("unet", p.removeprefix("unet."))
    assert set(raw[0]) == {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"}
    assert float(raw[0][f"{key}.alpha"]) == 1.0  # diffusers' lora_alpha 1 at rank 2: scale 0.5
    meta = raw[1]
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "2", "1")
    assert "lora_adapter_metadata" not in meta and meta["ss_output_name"] == "kohya"
    assert main(["convert", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_merge_bakes_dora_from_the_base_weight(tmp_path):
    from sdlora.config import ModelConfig
    from sdlora.models.load import load_base
    from sdlora.tiny.configs import build_pipeline

    folder = tmp_path / "base"
    build_pipeline("mini", seed=0).save_pretrained(folder)
    base = load_base(ModelConfig(base=str(folder)), dtype=torch.float32)
    layer = base.unet.get_submodule(keys.kohya_module_map(base.unet, "unet")[LINEAR])
    W0 = layer.weight.detach().clone()
    out, fan_in = W0.shape
    gen = torch.Generator().manual_seed(0)
    parts, reference = _module("lora_dora", W0, gen)
    src = _file(tmp_path / "d.safetensors", {LINEAR: parts})
    tools.merge_adapters(base, [(src, 0.5)])
    torch.testing.assert_close(layer.weight.detach().double(), W0.double() + 0.5 * torch.tensor(reference),
                               rtol=1e-5, atol=1e-5)


# Training DoRA and LoKr: LyCORIS's key layout and maths, diffusers loads DoRA ----------------------


def _trained(network_cfg_dict, seed=0):
    from sdlora.config import config_from_dict
    from sdlora.tiny.configs import build_pipeline

    pipe = build_pipeline("mini")
    net_cfg = config_from_dict({"network": {"dim": 4, "alpha": 2, **network_cfg_dict}}).network
    network = lora.inject(pipe.unet, pipe.text_encoder, net_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen)).add_(0.1 * torch.randn(p.shape, generator=gen))
    return pipe, network, net_cfg


def _layer_change(layer, x):
    """What an adapted layer adds to its base layer's output on x."""
    with torch.no_grad():
        return layer(x) - layer.get_base_layer()(x)


def _apply(layer, weight: np.ndarray, x):
    """x through the base layer's own operation with `weight` in place of its weight (no bias)."""
    base, w = layer.get_base_layer(), torch.tensor(weight, dtype=torch.float32)
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, w, None, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, w)


@pytest.mark.parametrize("targets", ["transformer", "all"])
def test_trained_dora_exports_lycoris_dora_scale_with_the_papers_weight_change(tmp_path, targets):
    pipe, network, net_cfg = _trained({"dora": True, "type": "locon" if targets == "all" else "lora",
                                       "unet_targets": targets, "conv_dim": 2, "conv_alpha": 1})
    tensors = network.kohya_state_dict(torch.float32)
    groups = keys.group_modules(tensors)
    checked = set()
    for key, parts in groups.items():
        layer = network.layer(key)
        W0 = layer.get_base_layer().weight.detach()
        assert parts["dora_scale"].shape == (W0.shape[0], *[1] * (W0.dim() - 1))  # LyCORIS wd_on_out
        # The paper's formula from the trained tensors: m * (W0 + s B A) / ||W0 + s B A||_row.
        s = float(parts["alpha"]) / parts["lora_down.weight"].shape[0]
        BA = np_(parts["lora_up.weight"]).reshape(W0.shape[0], -1) @ np_(parts["lora_down.weight"]).reshape(
            parts["lora_down.weight"].shape[0], -1)
        expected = ref_dora(np_(W0), s * BA.reshape(W0.shape), np_(parts["dora_scale"]), 0)
        np.testing.assert_allclose(np_(kinds.module_delta(parts, W0.shape, W0)), expected, rtol=1e-4, atol=1e-5)
        # ... and it is the change the trained layer makes to its outputs.
        x = torch.randn(2, *((W0.shape[1], 6, 6) if W0.dim() == 4 else (W0.shape[1],)))
        torch.testing.assert_close(_layer_change(layer, x), _apply(layer, expected, x), rtol=1e-4, atol=1e-4)
        checked.add(W0.dim())
    assert checked == {2, 4}  # Linear and conv (SD1 proj_in / proj_out are 1x1 convs; "all" adds 3x3)
    meta = lora.adapter_metadata(config_from_dict_network(net_cfg), {"family": "sd_v1", "prediction_type": "epsilon",
                                                                     "name": "x", "model_hash": ""},
                                 {"num_train_images": 1, "num_epochs": 1, "epoch": 1, "steps": 1})
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    # Resume: the file loads back into a fresh DoRA network with the same outputs.
    other, again, _ = _trained({"dora": True, "type": net_cfg.type, "unet_targets": targets, "conv_dim": 2,
                                "conv_alpha": 1}, seed=9)
    again.load_kohya_state_dict(tensors)
    for key in list(groups)[:5]:
        torch.testing.assert_close(again.kohya_state_dict(torch.float32)[f"{key}.dora_scale"],
                                   tensors[f"{key}.dora_scale"])


def config_from_dict_network(net_cfg):
    import dataclasses

    from sdlora.config import config_from_dict

    cfg = config_from_dict({"name": "x"})
    return dataclasses.replace(cfg, network=net_cfg)


@pytest.mark.parametrize("dim", [4, 2])
def test_trained_lokr_exports_lycoris_keys_with_the_kronecker_change(dim):
    pipe, network, net_cfg = _trained({"type": "lokr", "dim": dim, "unet_targets": "all", "conv_dim": dim,
                                       "conv_alpha": 1})
    tensors = network.kohya_state_dict(torch.float32)
    groups = keys.group_modules(tensors)
    seen = set()
    for key, parts in groups.items():
        layer = network.layer(key)
        W0 = layer.get_base_layer().weight.detach()
        assert set(parts) - {"alpha"} <= set(kinds.lokr.TENSORS)
        w2 = np_(parts["lokr_w2"]) if "lokr_w2" in parts else np_(parts["lokr_w2_a"] @ parts["lokr_w2_b"])
        w1 = np_(parts["lokr_w1"])
        full = "lokr_w2" in parts
        scale = 1.0 if full else float(parts["alpha"]) / parts["lokr_w2_b"].shape[0]  # LyCORIS / the UIs' rule
        if W0.dim() == 4 and w2.ndim == 2:
            w2 = w2.reshape(w2.shape[0], W0.shape[1] // w1.shape[1], *W0.shape[2:])
        expected = (ref_lokr(w1, w2) * scale).reshape(W0.shape)
        np.testing.assert_allclose(np_(kinds.module_delta(parts, W0.shape)), expected, rtol=1e-4, atol=1e-5)
        x = torch.randn(2, *((W0.shape[1], 6, 6) if W0.dim() == 4 else (W0.shape[1],)))
        torch.testing.assert_close(_layer_change(layer, x), _apply(layer, expected, x), rtol=1e-4, atol=1e-4)
        seen.add(("full" if full else "low-rank", W0.dim()))
    # peft (as LyCORIS) keeps w2 full when dim >= max(b, d) / 2: at dim 4 the 32/64-wide layers, not the wider.
    assert {k for k, _ in seen} == ({"full", "low-rank"} if dim == 4 else {"low-rank"})
    assert {d for _, d in seen} == {2, 4}
    meta = lora.adapter_metadata(config_from_dict_network(net_cfg), {"family": "sd_v1", "prediction_type": "epsilon",
                                                                     "name": "x", "model_hash": ""},
                                 {"num_train_images": 1, "num_epochs": 1, "epoch": 1, "steps": 1})
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "lokr"
    _, again, _ = _trained({"type": "lokr", "dim": dim, "unet_targets": "all", "conv_dim": dim, "conv_alpha": 1},
                           seed=3)
    again.load_kohya_state_dict(tensors)
    back = again.kohya_state_dict(torch.float32)
    assert all(torch.allclose(back[k], tensors[k], rtol=1e-6, atol=1e-7) for k in tensors)


def test_dora_is_refused_for_loha_and_lokr():
    with pytest.raises(UserError, match="dora = true needs type lora or locon"):
        _trained({"type": "loha", "dora": True})


@pytest.mark.parametrize("overrides", [["network.type='lokr'", "network.dim=2"], ["network.dora=true"]],
                         ids=["lokr", "dora"])
def test_training_lokr_and_dora_writes_trained_lycoris_modules(tmp_path, mini_base_dir, overrides):
    from safetensors import safe_open
    from test_train import make_style

    from sdlora.config import load_config
    from sdlora.models.load import load_base
    from sdlora.training.loop import train

    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2), ["train.epochs=1", "train.save_precision='fp32'",
                                                                 *overrides])
    path = train(cfg, log=lambda m: None).adapter
    tensors, metadata = read_adapter(path)
    groups = keys.group_modules(tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
    base = load_base(cfg.model)
    models = keys.model_parts(base)
    moved = magnitudes_moved = 0
    for key, parts in groups.items():
        part = keys.part_of(key)
        W0 = models[part].get_submodule(keys.kohya_module_map(models[part], part)[key]).weight.detach()
        delta = kinds.module_delta(parts, W0.shape, W0)
        assert torch.isfinite(delta).all()
        moved += float(delta.abs().max()) > 0
        if "dora_scale" in parts:  # starts at ||W0|| per output row; training moves it
            assert parts["dora_scale"].shape == (W0.shape[0], *[1] * (W0.dim() - 1))
            row_norms = W0.reshape(W0.shape[0], -1).norm(dim=1)
            magnitudes_moved += not torch.allclose(parts["dora_scale"].flatten(), row_norms, rtol=0, atol=1e-7)
    assert moved == len(groups)
    assert magnitudes_moved == (len(groups) if "network.dora=true" in overrides else 0)


# Memory: a LoHa samples within 1.3x of a LoRA's peak (SD1.5 shapes, GPU) ------------------------


def _random_loha(shapes: dict, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        cols = int(np.prod(shape[1:]))
        for i in (1, 2):
            tensors[f"{key}.hada_w{i}_a"] = torch.randn(shape[0], dim, generator=gen) * 0.1
            tensors[f"{key}.hada_w{i}_b"] = torch.randn(dim, cols, generator=gen) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(float(dim))
    return tensors


def sampling_peak(kind: str, device: str, dtype=torch.float16, latent: int = 64) -> int:
    """Bytes at the peak of applying an SD1.5-shaped U-Net adapter (dim 16) and one CFG U-Net call.

    LoRA: diffusers' peft layers (the sampler's unfused path); LoHa: the sampler's WeightPatcher.
    """
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    from sdlora.models.arch import build_unet
    from sdlora.sampling import sampler as sample

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    unet = build_unet("sd_v1", device=device, dtype=dtype)
    shapes = {k: s for k, s in sd15_module_shapes().items() if k.startswith("lora_unet")}
    if kind == "lora":
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(random_adapter(shapes, 16, 8))
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name="a")
    else:
        pipe = SimpleNamespace(unet=unet, text_encoder=torch.nn.Sequential())
        adapter = sample.Adapter(path=Path("loha"), weight=1.0, alias="loha", short_hash="", kind="loha",
                                 modules=keys.group_modules(_random_loha(shapes, 16)))
        patcher = apply.Patcher(keys.model_parts(pipe))
        patcher.add(adapter)
        patcher.apply({id(adapter): 1.0})
    with torch.no_grad():
        unet(torch.randn(2, 4, latent, latent, device=device, dtype=dtype), 500,
             torch.randn(2, 77, 768, device=device, dtype=dtype))
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the peak is measured in GPU memory")
def test_loha_sampling_peaks_within_1_3x_of_a_lora():
    lora_peak = sampling_peak("lora", "cuda")
    loha_peak = sampling_peak("loha", "cuda")
    assert loha_peak <= 1.3 * lora_peak, (loha_peak / 2**30, lora_peak / 2**30)


def test_sdxl_files_keyed_by_diffusers_paths_load_under_sgm_names(tmp_path, mini_sdxl_dir):
    """diffusers/peft SDXL files convert to `lora_unet_<diffusers path>`; the base names its U-Net
    layers in SGM's layout (input_blocks...), so both keys must reach the same layer."""
    from sdlora.config import ModelConfig
    from sdlora.models.load import load_base
    from sdlora.sampling import sampler as sample

    base = load_base(ModelConfig(base=str(mini_sdxl_dir)), dtype=torch.float32)
    sgm = keys.kohya_module_map(base.unet, "unet")
    key, path = next((k, p) for k, p in sgm.items() if p.endswith("attn2.to_k"))
    diffusers_key = keys.kohya_key("unet", path)
    assert diffusers_key != key and keys.loadable_module_map(base.unet, "unet")[diffusers_key] == path
    layer = base.unet.get_submodule(path)
    down, up = torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2)
    file = tmp_path / "xl.safetensors"
    save_file({f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up}, str(file))
    adapter = sample.read_for_base(file, 1.0, base.pipeline())
    assert list(adapter.modules) == [key]  # renamed to the base's own (SGM) key
    W0 = layer.weight.detach().clone()
    tools.merge_adapters(base, [(file, 1.0)])
    torch.testing.assert_close(layer.weight.detach(), W0 + up @ down, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_loha_sampling_peaks_within_1_3x_of_a_lora_on_the_cpu():
    """The same measurement in host memory: each kind in a fresh process, its peak resident set."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    peaks = {}
    for kind in ("lora", "loha"):
        code = ("import resource, sys, torch; sys.path.insert(0, 'tests'); torch.set_num_threads(2); "
                "from test_adapters import sampling_peak; "
                f"sampling_peak({kind!r}, 'cpu', torch.float32, latent=32); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[kind] = int(done.stdout.split()[-1]) * 1024
    print(f"sampling peak RSS, SD1.5 U-Net fp32: LoRA {peaks['lora'] / 2**30:.2f} GB, "
          f"LoHa {peaks['loha'] / 2**30:.2f} GB ({peaks['loha'] / peaks['lora']:.2f}x)")
    assert peaks["loha"] <= 1.3 * peaks["lora"]


# Files LyCORIS itself writes (lycoris-lora's kohya-compatible network) -----------------------------

# LyCORIS's own "full" preset targets the U-Net's TimestepEmbedding by class and by name, which its
# network refuses as a duplicated name on a diffusers U-Net; this is that preset without the duplicate.
_LYCORIS_PRESET = """
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("dora,tucker", [(None, False), (None, True), ("out", False), ("in", True)])
def test_lycoris_made_files_change_every_module_as_lycoris_does(tmp_path, algo, dora, tucker):
    """LyCORIS's own network on the mini SD1.x U-Net and text encoder (3x3 convs too, Tucker there when
    asked; DoRA with the magnitude per output row, its default, or per input column): for every module,
    the change sdlora merges equals LyCORIS's forward minus the layer's, and so does the sampler's
    (diffusers' peft layers for a plain LoCon, patched weights for the rest)."""
    import logging

    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from sdlora.sampling.sampler import AdapterSet
    from sdlora.tiny.configs import build_pipeline

    (tmp_path / "preset.toml").write_text(_LYCORIS_PRESET)
    made_by = build_pipeline("mini", seed=0)
    args = {"algo": algo, "conv_dim": 4, "conv_alpha": 1, "preset": str(tmp_path / "preset.toml"),
            "use_tucker": tucker, "dora_wd": dora is not None, "wd_on_output": dora != "in"}
    logging.disable(logging.INFO)
    try:
        network = lycoris_kohya.create_network(1.0, 4, 2.0, made_by.vae, made_by.text_encoder, made_by.unet, **args)
    finally:
        logging.disable(logging.NOTSET)
    network.apply_to(made_by.text_encoder, made_by.unet, True, True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LyCORIS starts its up factors at zero: every factor random, so each one counts
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})

    merged = build_pipeline("mini", seed=0)
    tools.merge_adapters(merged, [(path, 1.0)])
    sampled = build_pipeline("mini", seed=0)
    adapters = AdapterSet(sampled, fuse=False)  # plain LoRA/LoCon through diffusers, the others patched
    adapter = adapters.add(path)
    adapters.set_weights([1.0])
    assert bool(adapter.name) == (algo == "locon" and not dora and not tucker)  # loaded by diffusers

    paths = {id(m): (component, p) for component in ("unet", "text_encoder")
             for p, m in getattr(made_by, component).named_modules()}
    seen = set()
    for module in network.loras:
        layer = module.org_module[0]
        component, layer_path = paths[id(layer)]
        merged_layer = getattr(merged, component).get_submodule(layer_path)
        seen.add((component, type(layer).__name__))
        with torch.no_grad():
            if isinstance(layer, torch.nn.Linear):
                x = torch.randn(3, layer.in_features, generator=gen)
                change = F.linear(x, merged_layer.weight - layer.weight)
            else:
                x = torch.randn(1, layer.in_channels, 8, 8, generator=gen)
                change = F.conv2d(x, merged_layer.weight - layer.weight, None, layer.stride, layer.padding)
            expected = module.forward(x) - module.org_forward(x)
            sampled_change = getattr(sampled, component).get_submodule(layer_path)(x) - merged_layer(x) + change
        for got in (change, sampled_change):
            error = float((got - expected).norm() / expected.norm())
            assert error < 1e-4, f"{module.lora_name}: relative error {error:.3g}"
    # Both models, Linear and conv layers, and DoRA / Tucker where asked, were all exercised.
    assert seen == {("text_encoder", "Linear"), ("unet", "Linear"), ("unet", "Conv2d")}
    kind = {"locon": "lora"}.get(algo, algo)
    assert {kinds.module_variant(parts) for parts in adapter.modules.values()} == {
        variant + ("+dora" if dora else "") for variant in (kind, kind + "+tucker")[:1 + tucker]}


def test_text_encoder_keys_written_under_transformers_5_read_under_the_usual_names(tmp_path):
    """kohya and LyCORIS name modules from named_modules(), which transformers 5 gives without `text_model.`."""
    from safetensors import safe_open

    from sdlora.cli import main

    flat, usual = "lora_te_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    src = _file(tmp_path / "tf5.safetensors", {flat: {"lora_down.weight": rand(2, 32), "lora_up.weight": rand(32, 2),
                                                      "alpha": torch.tensor(1.0)}})
    notes = []
    tensors, _ = read_adapter(src, log=notes.append)
    assert set(keys.group_modules(tensors)) == {usual}
    assert any("without `text_model_`" in note for note in notes)
    assert main(["convert", str(src), str(tmp_path / "usual.safetensors")]) == 0
    with safe_open(str(tmp_path / "usual.safetensors"), "pt") as f:  # the names A1111 and ComfyUI read
        assert {k.partition(".")[0] for k in f.keys()} == {usual}
