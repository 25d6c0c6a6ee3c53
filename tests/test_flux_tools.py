"""The low-rank tools on a tiny FLUX.1: resize (a fused module is resized by the SVD of its whole delta),
inspect, merge into a base folder, extract from two transformer folders (into Kohya's fused names) and
convert from the command line."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_flux_sample import kohya_transformer_file

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
    kohya_transformer_file(tmp / "style.safetensors", transformer, rank=4, alpha=2.0)
    return {"dir": tmp, "base": tmp / "base", "lora": tmp / "style.safetensors", "transformer": transformer}


def _delta(tensors: dict, key: str) -> torch.Tensor:
    """alpha / rank * up @ down of one Kohya module."""
    down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
    return float(tensors[f"{key}.alpha"]) / down.shape[0] * up @ down


def test_resize_of_a_fused_module_is_the_truncated_svd_of_its_whole_delta(flux, capsys):
    # Kohya's fused names kept: lora_unet_double_blocks_0_img_attn_qkv
    assert_resize_is_the_truncated_svd_of_each_delta(flux, "lora_unet_single_blocks_0_linear1", capsys)


def assert_resize_is_the_truncated_svd_of_each_delta(lora, printed_key, capsys) -> None:
    """`sdlora resize` of the `lora` fixture's file to rank 2 keeps its module names, each module (a fused one
    whole) the truncated SVD of its delta at rank 2, and prints `printed_key`."""
    out = lora["dir"] / "resized.safetensors"
    assert main(["resize", str(lora["lora"]), str(out), "--rank", "2"]) == 0
    before, after = load_file(lora["lora"]), load_file(out)
    keys = {k.split(".")[0] for k in before}
    assert {k.split(".")[0] for k in after} == keys
    for key in keys:
        U, S, Vh = torch.linalg.svd(_delta(before, key), full_matrices=False)
        torch.testing.assert_close(_delta(after, key), (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-4)
        assert after[f"{key}.lora_down.weight"].shape[0] == 2
    assert printed_key in capsys.readouterr().out


def test_inspect_reports_the_fused_flux_modules(flux, capsys):
    assert_inspect_reports_the_modules(flux, transformer_keys.FLUX_NAMES, capsys)


def assert_inspect_reports_the_modules(lora, names, capsys) -> dict:
    """`sdlora inspect --json` of the `lora` fixture's file reports each Kohya module (`names`) of its
    transformer, rank 4, alpha 2; returns those modules."""
    assert main(["inspect", str(lora["lora"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    modules = transformer_keys.kohya_modules(lora["transformer"], names)
    assert summary["modules_per_part"] == {"unet": len(modules)}
    assert {m["key"] for m in summary["modules"]} == set(modules)
    assert all(m["rank"] == 4 and m["alpha"] == 2.0 for m in summary["modules"])
    return modules


def test_merge_into_a_flux_folder_then_extract_gives_back_the_fused_lora(flux, capsys):
    from diffusers import FluxPipeline

    meta = assert_merge_then_extract_gives_back_the_lora(flux, FluxPipeline, transformer_keys.FLUX_NAMES)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"

    assert main(["merge", str(flux["base"]), str(flux["lora"]), str(flux["dir"] / "merged.safetensors")]) == 2
    assert "diffusers folder" in capsys.readouterr().err


def assert_merge_then_extract_gives_back_the_lora(lora, pipeline_class, names) -> dict:
    """`sdlora merge` of the `lora` fixture's file at 0.5 into its base folder changes each original module's
    weight (its diffusers parts stacked) by 0.5 x its delta; `sdlora extract` from base and merged folders at
    rank 4 gives back each (rank 4: exactly) under Kohya's fused names. Returns the extracted file's metadata."""
    merged = lora["dir"] / "merged"
    assert main(["merge", str(lora["base"]), f"{lora['lora']}:0.5", str(merged), "--save-precision", "fp32"]) == 0
    tuned = pipeline_class.from_pretrained(merged).transformer
    tensors = load_file(lora["lora"])
    modules = transformer_keys.kohya_modules(lora["transformer"], names)
    for key, module in modules.items():
        change = torch.cat([tuned.get_submodule(p).weight - lora["transformer"].get_submodule(p).weight
                            for p in module.paths])
        if module.swap_halves:  # diffusers' (scale, shift) rows of the original's (shift, scale)
            change = torch.cat(change.chunk(2)[::-1])
        torch.testing.assert_close(change, 0.5 * _delta(tensors, key), atol=1e-6, rtol=1e-4)

    out = lora["dir"] / "extracted.safetensors"
    assert main(["extract", "--base", str(lora["base"]), "--tuned", str(merged), str(out), "--rank", "4",
                 "--no-clamp", "--save-precision", "fp32"]) == 0
    extracted = load_file(out)
    assert {k.split(".")[0] for k in extracted} == set(modules)  # Kohya's fused names; CLIP-L unchanged: skipped
    for key in modules:  # each fused delta has rank 4: extracted exactly
        torch.testing.assert_close(_delta(extracted, key), 0.5 * _delta(tensors, key), atol=1e-5, rtol=1e-4)
    with safe_open(out, "pt") as f:
        return f.metadata()


def test_convert_on_the_command_line_writes_diffusers_keys_and_back(flux, capsys):
    assert_convert_writes_diffusers_keys_and_back(flux, "transformer.", capsys)


def assert_convert_writes_diffusers_keys_and_back(lora, prefix, capsys) -> None:
    """`sdlora convert --format diffusers --base` of the `lora` fixture's file writes keys that start with
    `prefix`; converted back, each Kohya module's delta is the original's; without --base it is refused."""
    as_diffusers, back = lora["dir"] / "cli_diffusers.safetensors", lora["dir"] / "cli_kohya.safetensors"
    assert main(["convert", str(lora["lora"]), str(as_diffusers), "--format", "diffusers",
                 "--base", str(lora["base"])]) == 0
    assert "diffusers keys" in capsys.readouterr().out
    assert all(k.startswith(prefix) for k in load_file(as_diffusers))
    assert main(["convert", str(as_diffusers), str(back), "--base", str(lora["base"])]) == 0
    before, after = load_file(lora["lora"]), load_file(back)
    assert {k.split(".")[0] for k in after} == {k.split(".")[0] for k in before}
    for key in {k.split(".")[0] for k in before}:
        torch.testing.assert_close(_delta(after, key), _delta(before, key), atol=1e-6, rtol=1e-4)
    assert main(["convert", str(as_diffusers), str(lora["dir"] / "x.safetensors")]) == 2
    assert "give --base" in capsys.readouterr().err
