"""resize / extract / merge / inspect on Kohya files, checked against independent numpy maths
and against the models' outputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.adapters import keys, kinds
from sdlora.adapters import network as lora
from sdlora.adapters.file import read_adapter, save_adapter
from sdlora.cli import main
from sdlora.config import config_from_dict
from sdlora.errors import UserError
from sdlora.lowrank import tools
from sdlora.tiny.configs import build_components


def network_cfg(**network):
    return config_from_dict({"network": {"dim": 4, "alpha": 2, **network}}).network


def write_adapter(path, seed=0, te=True, **network):
    """A trained-looking adapter of the mini SD1 model (every factor random), saved in fp32.

    Returns (path, {kohya key: base weight shape}).
    """
    _, text_encoder, _, unet, _ = build_components("mini", seed=0)
    cfg = network_cfg(train_text_encoder=te, **network)
    net = lora.inject(unet, text_encoder, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    metadata = {"ss_network_dim": str(cfg.dim), "ss_network_alpha": f"{cfg.alpha:g}", "ss_base_model_version": "sd_v1",
                "ss_network_module": "lycoris.kohya" if cfg.type == "loha" else "networks.lora"}
    save_adapter(path, net.kohya_state_dict(torch.float32), metadata)
    shapes = {key: tuple(net.layer(key).weight.shape) for key in net.modules}
    return path, shapes


def deltas(path, shapes) -> dict[str, np.ndarray]:
    tensors, _ = read_adapter(path)
    return {k: kinds.module_delta(parts, shapes[k]).double().numpy() for k, parts in keys.group_modules(tensors).items()}


def flat(W):
    return W.reshape(W.shape[0], -1)


# resize ------------------------------------------------------------------------------------------


def test_resize_by_energy_keeps_the_energy_and_reports_the_eckart_young_error(tmp_path):
    src, shapes = write_adapter(tmp_path / "in.safetensors", type="locon", unet_targets="all", dim=8, alpha=4)
    report = tools.resize(src, tmp_path / "out.safetensors", energy=0.9)
    before, after = deltas(src, shapes), deltas(tmp_path / "out.safetensors", shapes)
    assert {m.key for m in report.modules} == set(before) and len(before) > 20
    convs = [k for k, s in shapes.items() if len(s) == 4 and s[2:] == (3, 3)]
    assert convs, "the LoCon file has 3x3 conv modules"
    for m in report.modules:
        W = flat(before[m.key])
        S = np.linalg.svd(W, compute_uv=False)
        energy = np.cumsum(S**2) / np.sum(S**2)
        k = m.new_rank
        assert energy[k - 1] >= 0.9 - 1e-9 and (k == 1 or energy[k - 2] < 0.9), m  # the smallest such k
        expected_error = np.sqrt(np.sum(S[k:] ** 2)) / np.linalg.norm(W)
        assert m.relative_error == pytest.approx(expected_error, rel=1e-4, abs=1e-6)
        assert m.energy_kept == pytest.approx(energy[k - 1], rel=1e-6)
        # The written factors are the best rank-k approximation, at the old scale.
        assert np.linalg.norm(flat(after[m.key]) - W) / np.linalg.norm(W) == pytest.approx(expected_error, abs=1e-4)
    tensors, metadata = read_adapter(tmp_path / "out.safetensors")
    groups = keys.group_modules(tensors)
    for key in convs:  # LoCon layout kept: down [k, in, 3, 3], up [out, k, 1, 1]
        k = groups[key]["lora_down.weight"].shape[0]
        assert groups[key]["lora_down.weight"].shape == (k, shapes[key][1], 3, 3)
        assert groups[key]["lora_up.weight"].shape == (shapes[key][0], k, 1, 1)
    assert json.loads(metadata["sdlora_resize"])["energy"] == 0.9
    assert metadata["sshs_model_hash"] != read_adapter(src)[1]["sshs_model_hash"]
    text = report.table()
    assert "old" in text and "KiB" in text and report.size_after < report.size_before


def test_resize_to_a_rank_keeps_the_scale_and_the_full_rank_delta(tmp_path):
    src, shapes = write_adapter(tmp_path / "in.safetensors", dim=8, alpha=2)
    report = tools.resize(src, tmp_path / "r3.safetensors", rank=3)
    tensors, metadata = read_adapter(tmp_path / "r3.safetensors")
    old = keys.group_modules(read_adapter(src)[0])
    for key, parts in keys.group_modules(tensors).items():
        assert kinds.module_rank(parts) == 3
        assert kinds.module_scale(parts) == pytest.approx(kinds.module_scale(old[key]))  # 2 / 8
        assert float(parts["alpha"]) == pytest.approx(2 / 8 * 3)
    assert metadata["ss_network_dim"] == "3" and float(metadata["ss_network_alpha"]) == pytest.approx(0.75)
    assert all(m.old_rank == 8 and m.new_rank == 3 for m in report.modules)
    # At (or above) the old rank nothing is lost.
    tools.resize(src, tmp_path / "r8.safetensors", rank=8)
    for key, W in deltas(src, shapes).items():
        np.testing.assert_allclose(deltas(tmp_path / "r8.safetensors", shapes)[key], W, atol=1e-5)
    with pytest.raises(UserError, match="already exists"):
        tools.resize(src, tmp_path / "r3.safetensors", rank=2)


def test_resize_max_rank_caps_and_dynamic_ranks_are_recorded(tmp_path):
    src, _ = write_adapter(tmp_path / "in.safetensors", dim=8, alpha=8)
    report = tools.resize(src, tmp_path / "out.safetensors", energy=0.999, max_rank=5)
    assert max(m.new_rank for m in report.modules) == 5
    _, metadata = read_adapter(tmp_path / "out.safetensors")
    record = json.loads(metadata["sdlora_resize"])
    assert record["max_rank"] == 5 and set(record["ranks"]) == {m.key for m in report.modules}


def test_resize_loha_becomes_a_plain_lora_with_the_same_delta(tmp_path):
    src, shapes = write_adapter(tmp_path / "loha.safetensors", type="loha", unet_targets="all", dim=2, alpha=1)
    assert any("hada_w1_a" in k for k in read_adapter(src)[0])
    code = main(["resize", str(src), str(tmp_path / "out.safetensors"), "--energy", "1.0"])
    assert code == 0
    tensors, metadata = read_adapter(tmp_path / "out.safetensors")
    assert not any("hada" in k for k in tensors) and metadata["ss_network_module"] == "networks.lora"
    before, after = deltas(src, shapes), deltas(tmp_path / "out.safetensors", shapes)
    assert set(before) == set(after)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-5 * max(1, np.abs(before[key]).max()))


# extract and merge -------------------------------------------------------------------------------


def _outputs(base, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    ids = base.tokenizer(["clrscn, mountains, lake"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = base.text_encoder(ids)[0]
        noise_pred = base.unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample
    return hidden.float(), noise_pred.float()


def test_merge_then_extract_recovers_the_adapter(tmp_path, mini_base_dir):
    adapter, shapes = write_adapter(tmp_path / "style.safetensors", dim=4, alpha=2)
    tuned = tmp_path / "tuned"
    assert main(["merge", str(mini_base_dir), f"{adapter}:0.5", str(tuned), "--save-precision", "fp32"]) == 0
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(mini_base_dir), "--tuned", str(tuned), str(out), "--rank", "4",
                 "--no-clamp", "--save-precision", "fp32"]) == 0
    original, extracted = deltas(adapter, shapes), deltas(out, shapes)
    assert set(extracted) == set(original)  # every U-Net and TE module of the transformer preset
    for key, W in original.items():
        np.testing.assert_allclose(extracted[key], 0.5 * W, atol=2e-5 * max(1, np.abs(W).max()))
    # The extracted adapter applied to the base gives the tuned model's outputs.
    tuned_model = tools._load(str(tuned), "tuned")
    applied, merged = tools.load_merged(str(mini_base_dir), [(out, 1.0)])
    assert sum(merged.values()) == len(original)
    for got, want in zip(_outputs(applied), _outputs(tuned_model)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    _, metadata = read_adapter(out)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    assert json.loads(metadata["sdlora_extract"])["clamp_quantile"] is None
    # The base model and modelspec fields read as a trained adapter's for the same base (one writer).
    trained = lora.adapter_metadata(config_from_dict({"name": "extracted"}), tools._load(str(mini_base_dir), "base"),
                                    {"num_train_images": 0, "num_epochs": 0, "epoch": 0, "steps": 0})
    for key in ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_new_sd_model_hash", "ss_output_name",
                "modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type", "modelspec.title"):
        assert metadata[key] == trained[key], key


def test_extract_skips_an_unchanged_text_encoder_and_clamps_by_default(tmp_path, mini_base_dir, capsys):
    adapter, shapes = write_adapter(tmp_path / "unet_only.safetensors", te=False, dim=4, alpha=4)
    tuned = tmp_path / "tuned.safetensors"
    tools.merge(str(mini_base_dir), [(adapter, 1.0)], tuned, dtype=torch.float32)  # single-file checkpoint
    out = tmp_path / "x.safetensors"
    assert main(["extract", "--base", str(mini_base_dir), "--tuned", str(tuned), str(out), "--energy", "0.9"]) == 0
    assert "text encoder: unchanged" in capsys.readouterr().out
    tensors, metadata = read_adapter(out)
    groups = keys.group_modules(tensors)
    assert groups and all(keys.part_of(k) == "unet" for k in groups)
    assert json.loads(metadata["sdlora_extract"])["text_encoder_skipped"] is True
    # Clamped factors: no entry beyond the 0.99 quantile of the module's absolute values.
    for parts in groups.values():
        values = torch.cat([parts["lora_up.weight"].flatten(), parts["lora_down.weight"].flatten()]).abs().float()
        assert float((values >= values.max()).float().mean()) >= 0.005  # the clipped top 1% sit at the bound


def test_merge_refuses_unmatched_keys_naming_file_and_keys(tmp_path, mini_base_dir, capsys):
    adapter, _ = write_adapter(tmp_path / "a.safetensors", dim=2, alpha=1)
    tensors, metadata = read_adapter(adapter)
    key = next(k for k in tensors if k.startswith("lora_unet_")).split(".")[0]
    renamed = {k.replace(key, "lora_unet_sdxl_only_block_proj"): v for k, v in tensors.items()}
    save_adapter(tmp_path / "other.safetensors", renamed, {k: v for k, v in metadata.items()
                                                                 if k != "sshs_model_hash"})
    code = main(["merge", str(mini_base_dir), str(tmp_path / "other.safetensors"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "other.safetensors" in err and "lora_unet_sdxl_only_block_proj" in err
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(mini_base_dir), str(adapter), str(tmp_path / "out.ckpt")]) == 2
    assert "must end with .safetensors" in capsys.readouterr().err


def test_merge_checks_every_shape_before_changing_a_weight(tmp_path, mini_base_dir):
    adapter, _ = write_adapter(tmp_path / "a.safetensors", dim=2, alpha=1)
    tensors, metadata = read_adapter(adapter)
    key = sorted(k for k in tensors if k.startswith("lora_unet_"))[-1].split(".")[0]  # the last module applied
    up = tensors[f"{key}.lora_up.weight"]
    tensors[f"{key}.lora_up.weight"] = torch.cat([up, up[:1]])  # one output row too many
    save_adapter(tmp_path / "wide.safetensors", tensors, {k: v for k, v in metadata.items() if k != "sshs_model_hash"})
    base = tools._load(str(mini_base_dir), "base")
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    with pytest.raises(UserError, match=f"wide.safetensors: {key}: .*does not fit"):
        tools.merge_adapters(base, [(adapter, 1.0), (tmp_path / "wide.safetensors", 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())


# inspect -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_inspect_reports_ranks_energy_and_writes_a_plot(tmp_path, kind, capsys):
    src, shapes = write_adapter(tmp_path / f"{kind}.safetensors", type=kind, dim=4, alpha=2)
    png = tmp_path / "spectra.png"
    assert main(["inspect", str(src), "--plot", str(png), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert Image.open(png).size[0] > 100
    n_te = sum(keys.part_of(k) == "te" for k in shapes)
    assert summary["modules_per_part"] == {"unet": len(shapes) - n_te, "te": n_te}
    assert summary["metadata"]["ss_network_dim"] == "4"
    truth = deltas(src, shapes)
    for m in summary["modules"]:
        assert m["kind"] == kind and m["rank"] == 4 and m["alpha"] == pytest.approx(2)
        W = flat(truth[m["key"]])
        assert m["norm"] == pytest.approx(np.linalg.norm(W), rel=1e-4)
        energy = np.cumsum(np.linalg.svd(W, compute_uv=False) ** 2) / np.sum(W**2)
        for level, rank in m["ranks_for_energy"].items():
            assert rank == int(np.searchsorted(energy, float(level.rstrip("%")) / 100 - 1e-9)) + 1
    assert main(["inspect", str(src)]) == 0
    assert "r@90%" in capsys.readouterr().out


def test_extract_refuses_identical_checkpoints(tmp_path, mini_base_dir, capsys):
    code = main(["extract", "--base", str(mini_base_dir), "--tuned", str(mini_base_dir),
                 str(tmp_path / "x.safetensors"), "--rank", "4"])
    assert code == 2 and "same checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def merged_the_old_way(parts: dict, adapter, multiplier: float, dtype) -> None:
    """The merge before the one engine, as reference: every module's change formed from the fp32 base,
    added in fp32, then everything rounded to `dtype`."""
    groups = keys.group_modules(read_adapter(adapter)[0])
    layers = {key: parts[keys.part_of(key)].get_submodule(path)
              for part, model in parts.items() for key, path in keys.kohya_module_map(model, part).items()}
    deltas = {key: kinds.module_delta(module, layers[key].weight.shape, layers[key].weight)
              for key, module in groups.items()}
    with torch.no_grad():
        for key, delta in deltas.items():
            layers[key].weight.copy_(layers[key].weight.float() + multiplier * delta)
    for model in parts.values():
        model.to(dtype)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_merge_writes_what_merging_in_fp32_and_rounding_writes(tmp_path, stored):
    """The engine merges one layer at a time in the weights' own dtype when the base stores them in the
    output's (fp16 here), else in fp32: either way the written checkpoint is the fp32 merge, rounded once."""
    from safetensors.torch import load_file

    from sdlora.models.checkpoint import save_single_file
    from sdlora.tiny.configs import build_pipeline

    base_dir = tmp_path / "base"
    build_pipeline("mini", seed=0).to(stored).save_pretrained(base_dir)
    adapter, _ = write_adapter(tmp_path / "a.safetensors", dim=4, alpha=2)
    tools.merge(str(base_dir), [(adapter, 0.7)], tmp_path / "new.safetensors")  # fp16, the default
    old = tools._load(str(base_dir), "base")
    merged_the_old_way(keys.model_parts(old), adapter, 0.7, torch.float16)
    old.vae.to(torch.float16)
    save_single_file(old, tmp_path / "old.safetensors", torch.float16)
    new, want = load_file(tmp_path / "new.safetensors"), load_file(tmp_path / "old.safetensors")
    assert new.keys() == want.keys()
    assert all(torch.equal(new[k], want[k]) for k in want)


@pytest.mark.slow
def test_merging_a_default_sdxl_adapter_peaks_near_the_base_size(tmp_path):
    """A default-config adapter (dim 16, alpha 8, the transformer targets) merged into SDXL's full U-Net
    (fp16, random weights) peaks under 1.3x the base's own bytes, and gives the old merge's weights."""
    from safetensors.torch import save_file

    from sdlora.adapters import apply
    from sdlora.bench.parts import (
        ResidentPeak,
        random_adapter,
        random_unet,
        unet_adapter_shapes,
    )

    unet = random_unet("sdxl")
    base_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    path = tmp_path / "sdxl.safetensors"
    save_file(random_adapter(unet_adapter_shapes(unet), 16, 8), str(path))
    module_map = keys.kohya_module_map(unet, "unet")
    checked = sorted(keys.group_modules(read_adapter(path)[0]))[::25]  # the old way on a subset: it would not fit
    originals = {key: unet.get_submodule(module_map[key]).weight.detach().clone() for key in checked}
    with ResidentPeak() as peak:
        merged = apply.merge_files({"unet": unet}, [(path, 1.0)])
    assert merged[str(path)] == 722
    assert (base_bytes + peak.extra_bytes) / base_bytes < 1.3, (base_bytes / 2**30, peak.extra_bytes / 2**30)
    groups = keys.group_modules(read_adapter(path)[0])
    for key, W0 in originals.items():  # the old way: the fp32 base plus the change, rounded afterwards
        base = W0.float()
        want = (base + 1.0 * kinds.module_delta(groups[key], base.shape, base)).to(torch.float16)
        assert torch.equal(unet.get_submodule(module_map[key]).weight, want), key
