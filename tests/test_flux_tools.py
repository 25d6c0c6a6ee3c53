"""The low-rank tools on a tiny FLUX.1: resize (a fused module is resized by the SVD of its whole delta),
inspect, merge into a base folder, extract from two transformer folders (into Kohya's fused names) and
convert from the command line."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_flux_sample import kohya_transformer_file as _kohya_flux_file

from sdlora.adapters import transformer_keys
from sdlora.cli import main
from sdlora.tiny.configs import build_flux_pipeline


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny FLUX.1-dev folder, a Kohya LoRA on it (rank 4, alpha 2, fused modules sharing one down as kohya
    trains them) and the transformer's modules."""
    from diffusers import FluxPipeline

    tmp = tmp_path_factory.mktemp("flux_tools")
    build_flux_pipeline(guidance=True).save_pretrained(tmp / "base")
    transformer = FluxPipeline.from_pretrained(tmp / "base").transformer
    _kohya_flux_file(tmp / "style.safetensors", transformer, rank=4, alpha=2.0)
    return {"dir": tmp, "base": tmp / "base", "lora": tmp / "style.safetensors", "transformer": transformer}


def _delta(tensors: dict, key: str) -> torch.Tensor:
    """alpha / rank * up @ down of one Kohya module."""
    down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
    return float(tensors[f"{key}.alpha"]) / down.shape[0] * up @ down


def test_resize_of_a_fused_module_is_the_truncated_svd_of_its_whole_delta(flux, capsys):
    out = flux["dir"] / "resized.safetensors"
    assert main(["resize", str(flux["lora"]), str(out), "--rank", "2"]) == 0
    before, after = load_file(flux["lora"]), load_file(out)
    keys = {k.split(".")[0] for k in before}
    assert {k.split(".")[0] for k in after} == keys  # Kohya's fused names kept: lora_unet_double_blocks_0_img_attn_qkv
    for key in keys:
        U, S, Vh = torch.linalg.svd(_delta(before, key), full_matrices=False)
        torch.testing.assert_close(_delta(after, key), (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-4)
        assert after[f"{key}.lora_down.weight"].shape[0] == 2
    assert "lora_unet_single_blocks_0_linear1" in capsys.readouterr().out


def test_inspect_reports_the_fused_flux_modules(flux, capsys):
    assert main(["inspect", str(flux["lora"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    modules = transformer_keys.kohya_modules(flux["transformer"], transformer_keys.FLUX_NAMES)
    assert summary["modules_per_part"] == {"unet": len(modules)}
    assert {m["key"] for m in summary["modules"]} == set(modules)
    assert all(m["rank"] == 4 and m["alpha"] == 2.0 for m in summary["modules"])


def test_merge_into_a_flux_folder_then_extract_gives_back_the_fused_lora(flux, capsys):
    from diffusers import FluxPipeline

    merged = flux["dir"] / "merged"
    assert main(["merge", str(flux["base"]), f"{flux['lora']}:0.5", str(merged), "--save-precision", "fp32"]) == 0
    tuned = FluxPipeline.from_pretrained(merged).transformer
    lora = load_file(flux["lora"])
    modules = transformer_keys.kohya_modules(flux["transformer"], transformer_keys.FLUX_NAMES)
    for key, module in modules.items():
        change = torch.cat([tuned.get_submodule(p).weight - flux["transformer"].get_submodule(p).weight
                            for p in module.paths])
        torch.testing.assert_close(change, 0.5 * _delta(lora, key), atol=1e-6, rtol=1e-4)

    assert main(["merge", str(flux["base"]), str(flux["lora"]), str(flux["dir"] / "merged.safetensors")]) == 2
    assert "diffusers folder" in capsys.readouterr().err

    out = flux["dir"] / "extracted.safetensors"
    assert main(["extract", "--base", str(flux["base"]), "--tuned", str(merged), str(out), "--rank", "4",
                 "--no-clamp", "--save-precision", "fp32"]) == 0
    extracted = load_file(out)
    assert {k.split(".")[0] for k in extracted} == set(modules)  # Kohya's fused names; CLIP-L unchanged: skipped
    for key in modules:  # each fused delta has rank 4: extracted exactly
        torch.testing.assert_close(_delta(extracted, key), 0.5 * _delta(lora, key), atol=1e-5, rtol=1e-4)
    with safe_open(out, "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev/lora"


def test_convert_on_the_command_line_writes_diffusers_keys_and_back(flux, capsys):
    as_diffusers, back = flux["dir"] / "cli_diffusers.safetensors", flux["dir"] / "cli_kohya.safetensors"
    assert main(["convert", str(flux["lora"]), str(as_diffusers), "--format", "diffusers",
                 "--base", str(flux["base"])]) == 0
    assert "diffusers keys" in capsys.readouterr().out
    assert all(k.startswith("transformer.") for k in load_file(as_diffusers))
    assert main(["convert", str(as_diffusers), str(back), "--base", str(flux["base"])]) == 0
    before, after = load_file(flux["lora"]), load_file(back)
    assert {k.split(".")[0] for k in after} == {k.split(".")[0] for k in before}
    for key in {k.split(".")[0] for k in before}:
        torch.testing.assert_close(_delta(after, key), _delta(before, key), atol=1e-6, rtol=1e-4)
    assert main(["convert", str(as_diffusers), str(flux["dir"] / "x.safetensors")]) == 2
    assert "give --base" in capsys.readouterr().err
