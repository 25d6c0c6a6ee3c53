"""Kohya names of FLUX.1 / SD3.x adapters (adapters/transformer_keys.py): the names and counts
sd-scripts writes on the full architectures (built on the meta device; the lists below are kohya's
networks/lora_flux.py and lora_sd3.py run on its own models), and fused LoRA factors read the way
diffusers' `_convert_kohya_flux_lora_to_diffusers` reads them."""

import pytest
import torch
from torch import nn

from sdlora.adapters.transformer_keys import (
    FLUX_NAMES,
    SD3_NAMES,
    LoraFactors,
    fuse,
    kohya_modules,
    output_sizes,
    split,
    text_kohya_key,
)
from sdlora.models.arch import part_config

FLUX_DOUBLE_KOHYA = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                     "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
FLUX_SINGLE_KOHYA = ["linear1", "linear2", "modulation_lin"]
SD3_BLOCK = dict(context_block=["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"],
                 x_block=["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"])
# The published MMDiTs: the configs sdlora ships for their single files (assets/configs/<family>/transformer).
SD35_LARGE, SD35_MEDIUM, SD3_MEDIUM = (part_config(f, "transformer") for f in ("sd35_large", "sd35_medium", "sd3_medium"))


def shape(transformer, module) -> tuple[int, int]:
    """(out, in) of the Kohya module: the parts' rows stacked."""
    return sum(output_sizes(transformer, module)), transformer.get_submodule(module.paths[0]).in_features


def test_flux_names_and_counts_equal_kohyas():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel.from_config(part_config("flux1_dev", "transformer"))  # FLUX.1-dev
    modules = kohya_modules(flux, FLUX_NAMES)
    expected = ([f"lora_unet_double_blocks_{i}_{n}" for i in range(19) for n in FLUX_DOUBLE_KOHYA]
                + [f"lora_unet_single_blocks_{i}_{n}" for i in range(38) for n in FLUX_SINGLE_KOHYA])
    assert list(modules) == expected and len(modules) == 304
    shapes = {"double_blocks_0_img_mod_lin": (18432, 3072), "double_blocks_0_img_attn_qkv": (9216, 3072),
              "double_blocks_0_img_attn_proj": (3072, 3072), "double_blocks_0_img_mlp_0": (12288, 3072),
              "double_blocks_0_img_mlp_2": (3072, 12288), "double_blocks_0_txt_attn_qkv": (9216, 3072),
              "single_blocks_0_linear1": (21504, 3072), "single_blocks_0_linear2": (3072, 15360),
              "single_blocks_0_modulation_lin": (9216, 3072)}
    for name, (out, inp) in shapes.items():
        assert shape(flux, modules["lora_unet_" + name]) == (out, inp), name
    assert output_sizes(flux, modules["lora_unet_single_blocks_0_linear1"]) == [3072, 3072, 3072, 12288]
    outer = kohya_modules(flux, FLUX_NAMES, outer=True)
    assert {"lora_unet_img_in", "lora_unet_guidance_in_in_layer", "lora_unet_txt_in"} <= set(outer)
    assert [m.key for m in outer.values() if m.swap_halves] == ["lora_unet_final_layer_adaLN_modulation_1"]


@pytest.mark.parametrize("config, count, attn2", [(SD35_LARGE, 377, 0), (SD35_MEDIUM, 263, 13), (SD3_MEDIUM, 237, 0)])
def test_sd3_names_and_counts_equal_kohyas(config, count, attn2):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        mmdit = SD3Transformer2DModel(**config)
    modules = kohya_modules(mmdit, SD3_NAMES)
    depth = config["num_layers"]
    expected = {f"lora_unet_joint_blocks_{i}_{part}_{n}" for i in range(depth - 1) for part, names in SD3_BLOCK.items()
                for n in names}
    expected |= {f"lora_unet_joint_blocks_{depth - 1}_context_block_{n}" for n in ("attn_qkv", "adaLN_modulation_1")}
    expected |= {f"lora_unet_joint_blocks_{depth - 1}_x_block_{n}" for n in SD3_BLOCK["x_block"]}
    expected |= {f"lora_unet_joint_blocks_{i}_x_block_attn2_{n}" for i in range(attn2) for n in ("qkv", "proj")}
    assert set(modules) == expected and len(modules) == count
    last = f"lora_unet_joint_blocks_{depth - 1}_context_block_adaLN_modulation_1"
    assert [m.key for m in modules.values() if m.swap_halves] == [last]  # context_pre_only: (scale, shift)
    h = config["caption_projection_dim"]
    assert shape(mmdit, modules[last]) == (2 * h, h)
    if attn2:  # SD3.5 Medium's block 0
        for name, size in {"x_block_attn_qkv": (4608, 1536), "x_block_attn2_qkv": (4608, 1536),
                           "x_block_adaLN_modulation_1": (13824, 1536), "context_block_mlp_fc2": (1536, 6144),
                           "context_block_adaLN_modulation_1": (9216, 1536)}.items():
            assert shape(mmdit, modules["lora_unet_joint_blocks_0_" + name]) == size, name
    if depth == 38:
        assert shape(mmdit, modules["lora_unet_joint_blocks_37_context_block_attn_qkv"]) == (7296, 2432)


def linears_inside(model: nn.Module, containers: tuple[str, ...]) -> set[str]:
    return {f"{name}.{child}" for name, block in model.named_modules() if name.rsplit(".", 1)[0] in containers
            for child, m in block.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35_medium"])
def test_every_block_linear_of_the_tiny_models_has_one_kohya_name(family):
    from sdlora.tiny.configs import build_flux_components, build_sd3_components

    if family == "flux":
        transformer, names = build_flux_components()["transformer"], FLUX_NAMES
        blocks = ("transformer_blocks", "single_transformer_blocks")
    else:
        transformer, names = build_sd3_components(medium=family == "sd35_medium")["transformer"], SD3_NAMES
        blocks = ("transformer_blocks",)
    covered = [p for m in kohya_modules(transformer, names).values() for p in m.paths]
    assert len(covered) == len(set(covered))
    assert set(covered) == linears_inside(transformer, blocks)  # kohya: every Linear in the blocks
    everything = [p for m in kohya_modules(transformer, names, outer=True).values() for p in m.paths]
    linears = {n for n, m in transformer.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert sorted(everything) == sorted(linears)  # and the opt-in ones cover the rest, once each


def test_text_encoder_names():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sdlora.tiny.configs import MINI_T5, MINI_TEXT_ENCODER

    clip = CLIPTextModel(CLIPTextConfig(**MINI_TEXT_ENCODER))
    t5 = T5EncoderModel(T5Config(**MINI_T5))
    paths = dict(clip.named_modules())
    assert "encoder.layers.0.self_attn.k_proj" in paths  # transformers 5: no text_model nesting
    assert text_kohya_key("clip_l", "encoder.layers.0.self_attn.k_proj") == \
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"
    assert text_kohya_key("clip_g", "text_model.encoder.layers.1.mlp.fc2") == \
        "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    t5_linears = [p for p, m in t5.named_modules() if isinstance(m, nn.Linear) and ".block.0." in p]
    assert sorted(text_kohya_key("t5", p) for p in t5_linears) == sorted(
        [f"lora_te3_encoder_block_0_layer_0_SelfAttention_{x}" for x in "qkvo"]
        + [f"lora_te3_encoder_block_0_layer_1_DenseReluDense_{x}" for x in ("wi_0", "wi_1", "wo")])


def delta(f: LoraFactors) -> torch.Tensor:
    return f.alpha / f.down.shape[0] * f.up @ f.down


def test_fuse_and_split_round_trip():
    g = torch.Generator().manual_seed(0)
    sizes = [6, 6, 6, 10]
    own = [LoraFactors(torch.randn(2, 5, generator=g), torch.randn(n, 2, generator=g), 1.0) for n in sizes]
    shared_down = torch.randn(4, 5, generator=g)
    shared = [LoraFactors(shared_down, torch.randn(n, 4, generator=g), 3.0) for n in sizes]
    for parts, rank, alpha in ((own, 8, 4.0), (shared, 4, 3.0)):
        for swap in (False, True):
            fused = fuse(parts, swap_halves=swap)
            assert fused.down.shape == (rank, 5) and fused.alpha == alpha
            whole = torch.cat([delta(p) for p in parts])
            if swap:
                whole = torch.cat([whole[14:], whole[:14]])
            assert torch.allclose(delta(fused), whole)  # the fused module's change is the parts' stacked
            back = split(fused, sizes, swap_halves=swap)
            for p, q in zip(parts, back):
                assert torch.equal(p.down, q.down) and torch.equal(p.up, q.up) and p.alpha == q.alpha
    with pytest.raises(ValueError, match="one scale"):
        fuse([own[0], LoraFactors(own[1].down, own[1].up, 2.0)])


@pytest.mark.parametrize("sparse", [False, True])
def test_split_reads_fused_modules_as_diffusers_does(sparse):
    """kohya -> diffusers: the same factors (diffusers bakes alpha / rank into them) on the real widths,
    for kohya's layout (one down shared by the parts) and for one down per part (block-sparse up)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )

    g = torch.Generator().manual_seed(1)
    h, rank = 3072, 8
    r, alpha = (rank // 4, 0.5) if sparse else (rank, 2.0)
    shared = torch.randn(r, h, generator=g) / 50

    def part(rows: int, alpha: float = alpha) -> LoraFactors:
        return LoraFactors(torch.randn(r, h, generator=g) / 50 if sparse else shared,
                           torch.randn(rows, r, generator=g), alpha)

    # kohya key -> (diffusers module paths, their LoRA factors, swapped halves)
    double = [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    single = [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    modules = {
        "lora_unet_double_blocks_0_img_attn_qkv": (double, [part(h) for _ in double], False),
        "lora_unet_single_blocks_0_linear1": (single, [part(h), part(h), part(h), part(4 * h)], False),
        # alpha = rank: diffusers 0.42 drops the final layer's alpha (and its "transformer." prefix)
        "lora_unet_final_layer_adaLN_modulation_1": (["norm_out.linear"], [part(2 * h, float(r))], True),
    }
    state, fused = {}, {}
    for key, (_, parts, swap) in modules.items():
        fused[key] = fuse(parts, swap_halves=swap)
        state |= {f"{key}.lora_down.weight": fused[key].down, f"{key}.lora_up.weight": fused[key].up,
                  f"{key}.alpha": torch.tensor(fused[key].alpha)}
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(state))
    for key, (paths, parts, swap) in modules.items():
        ours = split(fused[key], [p.up.shape[0] for p in parts], swap_halves=swap)
        for path, mine, original in zip(paths, ours, parts):
            name = f"transformer.{path}" if f"transformer.{path}.lora_A.weight" in theirs else path
            a, b = theirs[f"{name}.lora_A.weight"], theirs[f"{name}.lora_B.weight"]
            assert a.shape == mine.down.shape and b.shape == mine.up.shape
            assert torch.allclose(b @ a, delta(mine), atol=1e-6)
            assert torch.allclose(delta(mine), delta(original), atol=1e-6)


def test_sd3_map_lays_out_weights_as_diffusers_single_file_converter():
    """The same map turns a diffusers MMDiT into Stability's layout (fused rows, swapped halves), which
    diffusers' own single-file converter turns back into the same tensors."""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    from sdlora.tiny.configs import build_sd3_components

    transformer = build_sd3_components(medium=True)["transformer"]  # qk norm, attn2, a context_pre_only last block
    ours = transformer.state_dict()
    original = {"pos_embed": ours["pos_embed.pos_embed"]}
    for m in kohya_modules(transformer, SD3_NAMES, outer=True).values():
        for tensor in ("weight", "bias"):
            rows = torch.cat([ours[f"{p}.{tensor}"] for p in m.paths])
            if m.swap_halves:
                rows = torch.cat(rows.chunk(2)[::-1])
            original[f"{m.original}.{tensor}"] = rows
    norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
    for name, tensor in ours.items():  # the qk norms: no Linear, outside the map
        if name.startswith("transformer_blocks."):
            _, i, rest = name.split(".", 2)
            module = rest.removesuffix(".weight")
            if module in norms:
                original[f"joint_blocks.{i}.{norms[module]}.weight"] = tensor
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert sorted(converted) == sorted(ours)
    assert all(torch.equal(converted[k], ours[k]) for k in ours)


def test_flux_map_is_diffusers_kohya_converters():
    """Every FLUX module kohya can write (block 0 of each kind, the embedders, the final layer) lands on
    the diffusers modules our map names, with the same factors, through diffusers' kohya converter."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )

    with torch.device("meta"):
        flux = FluxTransformer2DModel.from_config(part_config("flux1_dev", "transformer"))
    modules = {k: m for k, m in kohya_modules(flux, FLUX_NAMES, outer=True).items()
               if "_blocks_" not in k or "_blocks_0_" in k}
    g = torch.Generator().manual_seed(2)
    state, fused = {}, {}
    for key, m in modules.items():
        inputs = flux.get_submodule(m.paths[0]).in_features
        fused[key] = LoraFactors(torch.randn(1, inputs, generator=g), torch.randn(sum(output_sizes(flux, m)), 1,
                                                                                  generator=g), 1.0)
        state |= {f"{key}.lora_down.weight": fused[key].down, f"{key}.lora_up.weight": fused[key].up,
                  f"{key}.alpha": torch.tensor(1.0)}
    theirs = {k.removeprefix("transformer."): v for k, v in _convert_kohya_flux_lora_to_diffusers(dict(state)).items()}
    expected = set()
    for key, m in modules.items():
        for path, part in zip(m.paths, split(fused[key], output_sizes(flux, m), swap_halves=m.swap_halves)):
            assert torch.equal(theirs[f"{path}.lora_A.weight"], part.down)
            assert torch.equal(theirs[f"{path}.lora_B.weight"], part.up)
            expected |= {f"{path}.lora_A.weight", f"{path}.lora_B.weight"}
    assert set(theirs) == expected
