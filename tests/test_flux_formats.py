"""Adapter key styles on a tiny FLUX.1: `[output] format = "diffusers"` loads in FluxPipeline with no key
left over and renders what the Kohya file renders in sdlora; the files other trainers write (diffusers /
SimpleTuner PEFT, OneTrainer, ai-toolkit's ComfyUI style, SimpleTuner's LyCORIS) read through the one
adapter reader and change every weight as the Kohya file does; `convert` goes both ways."""

import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_flux_train import FLUX, flux_dev_dir  # noqa: F401  (the tiny FLUX.1-dev folder fixture)
from test_train import make_style

from sdlora.adapters import apply, keys, transformer_keys
from sdlora.adapters.convert import convert
from sdlora.adapters.file import read_adapter
from sdlora.adapters.network import ADAPTER_NAME
from sdlora.config import load_config
from sdlora.errors import UserError
from sdlora.sampling.sampler import Sampler
from sdlora.training.loop import Trainer

PROMPT = ["clrscn, mountains, lake"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flux_dev_dir):
    """A tiny FLUX.1 LoRA trained 3 steps and written in diffusers' format; beside it the same network
    as a Kohya file (fused qkv / linear1, alpha), written by the network itself."""
    return train_both_formats(tmp_path_factory.mktemp("trained"), flux_dev_dir, FLUX)


def train_both_formats(tmp, base_dir, settings) -> dict:
    """`trained` on the base folder `base_dir`: {"diffusers": the export, "kohya": the network's Kohya file,
    "deltas": {diffusers path: trained weight change}, "dir": tmp}."""
    cfg = load_config(make_style(tmp, base_dir, extra="max_train_steps = 3\nunet_lr = 5e-2"),
                      [*settings, "output.format=diffusers", "output.score_epochs=false"])
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.run()
    kohya = tmp / "kohya.safetensors"
    save_file(trainer.network.kohya_state_dict(torch.float32), kohya)
    # the trained weight change of each diffusers module, from the network's own parameters
    deltas = {}
    for key, (part, path) in trainer.network.modules.items():
        layer = trainer.network.layer(key)
        deltas[path] = (layer.lora_B[ADAPTER_NAME].weight @ layer.lora_A[ADAPTER_NAME].weight
                        * layer.scaling[ADAPTER_NAME]).detach()
    return {"diffusers": cfg.adapter_path(None), "kohya": kohya, "deltas": deltas, "dir": tmp}


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def _load_quietly(pipe, path, caplog):
    """Load a LoRA into a diffusers pipeline; every warning diffusers or peft logs is returned, but the note
    that a component (the text encoder of a transformer-only LoRA) has no keys."""
    import warnings

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        caplog.clear()
        pipe.load_lora_weights(str(path))
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return [m for m in messages if not m.startswith("No LoRA keys associated to")]


def test_a_diffusers_format_export_loads_whole_in_flux_pipeline_and_renders_as_the_kohya_file(trained, flux_dev_dir,
                                                                                                caplog, tmp_path):
    from diffusers import FluxPipeline

    assert_diffusers_export_loads_whole_and_renders_as_the_kohya_file(
        trained, flux_dev_dir, FluxPipeline, "flux1", "transformer.", caplog, tmp_path,
        pipe_kwargs=dict(guidance_scale=3.5, max_sequence_length=512),  # dev's T5 length, which the sampler reads too
        settings=[*FLUX, "sample.guidance_scale=3.5"])


def assert_diffusers_export_loads_whole_and_renders_as_the_kohya_file(trained, base_dir, pipeline_class, version,
                                                                      prefix, caplog, tmp_path, pipe_kwargs, settings,
                                                                      untrained=frozenset()) -> set[str]:
    """The `trained` diffusers export (metadata `version`, keys `prefix`... lora_A / lora_B, one module per
    trained one) loads in `pipeline_class` from `base_dir` with no key left over and no note, fused changes each
    module by its trained change (zero exactly for the `untrained` paths), and renders (`pipe_kwargs`) the pixels
    sdlora's sampler renders (`settings`) with the Kohya file at scale 1, not at 0. Returns the module paths."""
    tensors = load_file(trained["diffusers"])
    with safe_open(trained["diffusers"], "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["ss_base_model_version"] == version
    assert all(k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    names = {k.rsplit(".", 2)[0].removeprefix("transformer.") for k in tensors}
    assert names == set(trained["deltas"])

    pipe = pipeline_class.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    before = {p: pipe.transformer.get_submodule(p).weight.detach().clone() for p in trained["deltas"]}
    assert _load_quietly(pipe, trained["diffusers"], caplog) == []  # no unexpected / missing key, no note
    lora = pipe(PROMPT, width=64, height=64, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3),
                **pipe_kwargs).images
    pipe.fuse_lora()
    for path, delta in trained["deltas"].items():  # the trained network's change, module by module
        change = pipe.transformer.get_submodule(path).get_base_layer().weight - before[path]
        torch.testing.assert_close(change, delta, atol=1e-6, rtol=1e-4)
        assert bool(delta.abs().max() > 0) == (path not in untrained), path

    # sdlora's own engine applying the Kohya file renders the same pixels
    cfg = load_config(make_style(tmp_path, base_dir), settings)
    sampler = Sampler(cfg)
    sampler.adapters.add(trained["kohya"])
    sampler.adapters.set_scale(1.0)
    ours, _ = sampler.render(PROMPT, [3], 64, 64, 2)
    np.testing.assert_allclose(_pixels(ours), _pixels(lora), atol=1)
    sampler.adapters.set_scale(0.0)
    assert not np.allclose(_pixels(sampler.render(PROMPT, [3], 64, 64, 2)[0]), _pixels(lora), atol=1)
    sampler.adapters.close()
    return names


def _merged(transformer, path) -> dict[str, torch.Tensor]:
    """{diffusers path: weight change} of an adapter file merged by sdlora's engine, the model restored after."""
    parts = {"unet": transformer}
    before = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    apply.merge_files(parts, [(path, 1.0)])
    changes = {name[:-len(".weight")]: p.detach() - before[name] for name, p in transformer.named_parameters()
               if name.endswith(".weight") and not torch.equal(p, before[name])}
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            p.copy_(before[name])
    return changes


def _styles(kohya: dict[str, torch.Tensor], transformer,
            names=transformer_keys.FLUX_NAMES) -> dict[str, dict[str, torch.Tensor]]:
    """The Kohya file written the way other trainers write FLUX.1 (or SD3, `names`) LoRAs (each by its own rules):
    - diffusers_alpha: diffusers' module names with `.alpha` (as diffusers' FLUX loader reads "network_alphas");
    - onetrainer: `lora_transformer_<diffusers path with _>` with lora_down / lora_up / alpha (ComfyUI's map);
    - simpletuner_lycoris: `lycoris_<diffusers path with _>`, LyCORIS's LoRA tensors;
    - ai_toolkit_comfy: `diffusion_model.<BFL path>.lora_A / lora_B` (ComfyUI model keys), scale baked in;
    - comfy_kohya_tensors: `diffusion_model.<BFL path>` with Kohya's lora_down / lora_up / alpha (ComfyUI reads it)."""
    modules = keys.group_modules(kohya)
    originals = transformer_keys.kohya_modules(transformer, names, outer=True)
    split = transformer_keys.split_modules(transformer, originals, modules)
    styles = {"diffusers_alpha": {}, "onetrainer": {}, "simpletuner_lycoris": {}, "ai_toolkit_comfy": {},
              "comfy_kohya_tensors": {}}
    for key, t in split.items():
        path = next(p for m in originals.values() for p in m.paths if key == f"lora_unet_{p.replace('.', '_')}")
        styles["diffusers_alpha"] |= {f"transformer.{path}.lora_A.weight": t["lora_down.weight"],
                                      f"transformer.{path}.lora_B.weight": t["lora_up.weight"],
                                      f"transformer.{path}.alpha": t["alpha"]}
        underscored = path.replace(".", "_")
        for style, prefix in (("onetrainer", "lora_transformer_"), ("simpletuner_lycoris", "lycoris_")):
            styles[style] |= {f"{prefix}{underscored}.{suffix}": v for suffix, v in t.items()}
    for key, t in modules.items():
        original = originals[key].original
        scale = float(t["alpha"]) / t["lora_down.weight"].shape[0]
        styles["ai_toolkit_comfy"] |= {f"diffusion_model.{original}.lora_A.weight": t["lora_down.weight"] * scale,
                                       f"diffusion_model.{original}.lora_B.weight": t["lora_up.weight"]}
        styles["comfy_kohya_tensors"] |= {f"diffusion_model.{original}.{suffix}": v for suffix, v in t.items()}
    return styles


def test_other_trainers_flux_files_read_through_the_one_reader_with_identical_weight_changes(trained, flux_dev_dir,
                                                                                             tmp_path):
    from diffusers import FluxPipeline

    # diffusers itself: SimpleTuner and ai-toolkit save through it; its Kohya reader assumes FLUX.1's full widths,
    # so the LoRA goes in from the diffusers export
    assert_other_trainers_files_read_back_as_the_kohya_file(trained, flux_dev_dir, FluxPipeline,
                                                            transformer_keys.FLUX_NAMES, tmp_path)


def assert_other_trainers_files_read_back_as_the_kohya_file(trained, base_dir, pipeline_class, names, tmp_path,
                                                            untrained: int = 0, more_styles=None) -> dict:
    """The `trained` Kohya file written in each of `_styles` (and `more_styles(kohya, transformer)`), the
    diffusers export, and that export loaded into `pipeline_class` and written back by its own
    save_lora_weights (peft config as the LoRA metadata) all read through the one reader into Kohya keys and
    change each weight as the Kohya file does (which changes all but `untrained` of the trained modules).
    Returns the styles written."""
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline_class.from_pretrained(base_dir)
    transformer = pipe.transformer
    expected = _merged(transformer, trained["kohya"])
    assert len(expected) == len(trained["deltas"]) - untrained
    kohya = load_file(trained["kohya"])
    files = {"sdlora_diffusers": trained["diffusers"]}
    styles = _styles(kohya, transformer, names)
    if more_styles:
        styles |= more_styles(kohya, transformer)
    for style, tensors in styles.items():
        files[style] = tmp_path / f"{style}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, files[style])

    pipe.load_lora_weights(str(trained["diffusers"]), adapter_name="style")
    config = transformer.peft_config["style"].to_dict()
    pipeline_class.save_lora_weights(tmp_path / "peft", transformer_lora_layers=get_peft_model_state_dict(
        transformer, adapter_name="style"), transformer_lora_adapter_metadata=config)
    pipe.unload_lora_weights()
    files["diffusers_save_lora_weights"] = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    with safe_open(files["diffusers_save_lora_weights"], "pt") as f:
        assert "lora_adapter_metadata" in f.metadata()

    for style, path in files.items():
        tensors, _ = read_adapter(path, log=lambda m: None)
        assert all(k.startswith("lora_unet_") for k in tensors), style
        changes = _merged(transformer, path)
        assert changes.keys() == expected.keys(), style
        for name, change in changes.items():
            torch.testing.assert_close(change, expected[name], atol=1e-6, rtol=1e-4, msg=f"{style}: {name}")
    return styles


def test_convert_writes_kohya_as_diffusers_and_back_with_the_same_weight_changes(trained, flux_dev_dir, tmp_path,
                                                                                   caplog):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dev_dir)
    as_diffusers, back = assert_convert_both_ways_keeps_the_weight_changes(trained, pipe, flux_dev_dir, tmp_path,
                                                                           caplog)
    kohya_keys = {k.split(".")[0] for k in load_file(trained["kohya"])}
    assert {k.split(".")[0] for k in load_file(back)} == kohya_keys  # fused again: lora_unet_double_blocks_0_img_attn_qkv

    # diffusers' own training targets leave single blocks' proj_mlp out: its rows of linear1 are zero
    partial = {k: v for k, v in load_file(as_diffusers).items() if ".proj_mlp." not in k}
    save_file(partial, tmp_path / "partial.safetensors")
    convert(tmp_path / "partial.safetensors", tmp_path / "partial_kohya.safetensors", base=flux_dev_dir)
    fused = load_file(tmp_path / "partial_kohya.safetensors")
    up = fused["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    mlp = pipe.transformer.single_transformer_blocks[0].proj_mlp.out_features
    assert up.shape[0] == 3 * pipe.transformer.inner_dim + mlp and not up[-mlp:].any() and up[:-mlp].any()
    changes = _merged(pipe.transformer, tmp_path / "partial_kohya.safetensors")
    assert not any("proj_mlp" in name for name in changes)

    with pytest.raises(UserError, match="--base"):
        convert(as_diffusers, tmp_path / "no_base.safetensors")
    with pytest.raises(UserError, match="--format diffusers needs --base"):
        convert(trained["kohya"], tmp_path / "no_base.safetensors", output_format="diffusers")


def assert_convert_both_ways_keeps_the_weight_changes(trained, pipe, base_dir, tmp_path, caplog):
    """`convert` of the `trained` Kohya file to diffusers' keys (on `base_dir`) and back changes each weight of
    `pipe`'s transformer as the Kohya file does, and the diffusers file loads in `pipe` with no key left over
    (it stays loaded). Returns (the diffusers file, the Kohya file converted back)."""
    expected = _merged(pipe.transformer, trained["kohya"])
    as_diffusers, back = tmp_path / "diffusers.safetensors", tmp_path / "kohya.safetensors"
    convert(trained["kohya"], as_diffusers, output_format="diffusers", base=base_dir)
    convert(as_diffusers, back, base=base_dir)
    for path in (as_diffusers, back):
        changes = _merged(pipe.transformer, path)
        assert changes.keys() == expected.keys()
        for name, change in changes.items():
            torch.testing.assert_close(change, expected[name], atol=1e-6, rtol=1e-4)
    assert _load_quietly(pipe, as_diffusers, caplog) == []
    return as_diffusers, back


def test_sd1_diffusers_format_loads_whole_in_stable_diffusion_pipeline(tmp_path, caplog):
    """The option is generic: an SD1.x export with the text encoder (`unet.`, `text_encoder.text_model.`)
    loads in diffusers with no key left over and changes each weight as the Kohya file does."""
    from diffusers import StableDiffusionPipeline

    from sdlora.models.load import TINY_DIR

    cfg = load_config(make_style(tmp_path, TINY_DIR, extra="max_train_steps = 2\nunet_lr = 1e-2\ntext_encoder_lr = 1e-2"),
                      ["output.format=diffusers", "output.score_epochs=false"])
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.run()
    kohya = tmp_path / "kohya.safetensors"
    save_file(trainer.network.kohya_state_dict(torch.float32), kohya)
    tensors = load_file(cfg.adapter_path(None))
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder"}
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in tensors)

    pipe = StableDiffusionPipeline.from_pretrained(TINY_DIR, torch_dtype=torch.float32)
    parts = keys.model_parts(pipe)
    weights = {name: p.detach().clone() for part in parts.values() for name, p in part.named_parameters()}
    apply.merge_files(parts, [(kohya, 1.0)])
    merged = {name: p.detach().clone() for part in parts.values() for name, p in part.named_parameters()}
    with torch.no_grad():
        for part in parts.values():
            for name, p in part.named_parameters():
                p.copy_(weights[name])
    assert _load_quietly(pipe, cfg.adapter_path(None), caplog) == []
    pipe.fuse_lora()
    from peft.tuners.tuners_utils import BaseTunerLayer

    checked = 0
    for part in parts.values():
        for path, module in part.named_modules():
            if isinstance(module, BaseTunerLayer):
                torch.testing.assert_close(module.get_base_layer().weight, merged[path + ".weight"], atol=1e-6,
                                           rtol=1e-4)
                checked += 1
    assert checked == len(tensors) // 2  # every module of the file is a LoRA layer in diffusers


def test_resize_of_a_diffusers_format_file_writes_diffusers_keys_again(trained, flux_dev_dir, tmp_path):
    """`output.resize_energy` of a `format = "diffusers"` training: the resized file stays loadable by diffusers."""
    from diffusers import FluxPipeline

    from sdlora.lowrank.tools import resize

    out = tmp_path / "resized.safetensors"
    resize(trained["diffusers"], out, rank=4)  # the trained rank: every weight change kept
    tensors = load_file(out)
    assert tensors.keys() == load_file(trained["diffusers"]).keys()
    transformer = FluxPipeline.from_pretrained(flux_dev_dir).transformer
    expected = _merged(transformer, trained["diffusers"])
    changes = _merged(transformer, out)
    assert changes.keys() == expected.keys()
    for name, change in changes.items():
        torch.testing.assert_close(change, expected[name], atol=1e-6, rtol=1e-4)
    resize(trained["diffusers"], out, rank=1, overwrite=True)
    assert all(v.shape[0 if k.endswith("lora_A.weight") else 1] == 1 for k, v in load_file(out).items())


def test_an_sdxl_kohya_file_converted_to_diffusers_keys_loads_whole_in_the_sdxl_pipeline(mini_sdxl_dir, tmp_path,
                                                                                         caplog):
    """SGM-named U-Net keys and both text encoders (lora_te1_ / lora_te2_) -> `unet.<diffusers path>`,
    `text_encoder.` / `text_encoder_2.text_model.`; the base folder is read without its weights."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdlora.adapters.network import text_encoder_target_paths, unet_target_paths

    pipe = StableDiffusionXLPipeline.from_pretrained(mini_sdxl_dir, torch_dtype=torch.float32)
    parts = keys.model_parts(pipe)
    generator = torch.Generator().manual_seed(0)
    kohya = {}
    for part, model in parts.items():
        paths = unet_target_paths(model, "transformer") if part == "unet" else text_encoder_target_paths(model)
        for key, path in keys.module_keys(model, part, paths).items():
            layer = model.get_submodule(path)
            kohya |= {f"{key}.lora_down.weight": torch.randn(2, layer.in_features, generator=generator) * 0.1,
                      f"{key}.lora_up.weight": torch.randn(layer.out_features, 2, generator=generator) * 0.1,
                      f"{key}.alpha": torch.tensor(1.0)}
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # SGM names, as kohya writes SDXL
    save_file(kohya, tmp_path / "kohya.safetensors")
    convert(tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors", output_format="diffusers",
            base=mini_sdxl_dir)
    tensors = load_file(tmp_path / "diffusers.safetensors")
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}

    weights = {(part, name): p.detach().clone() for part, m in parts.items() for name, p in m.named_parameters()}
    apply.merge_files(parts, [(tmp_path / "kohya.safetensors", 1.0)])
    merged = {(part, name): p.detach().clone() for part, m in parts.items() for name, p in m.named_parameters()}
    with torch.no_grad():
        for (part, name), w in weights.items():
            parts[part].get_parameter(name).copy_(w)
    assert _load_quietly(pipe, tmp_path / "diffusers.safetensors", caplog) == []
    pipe.fuse_lora()
    checked = 0
    for part, model in parts.items():
        for path, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                torch.testing.assert_close(module.get_base_layer().weight, merged[(part, path + ".weight")],
                                           atol=1e-6, rtol=1e-4)
                checked += 1
    assert checked == len(kohya) // 3


def test_init_weights_from_a_diffusers_format_file_starts_from_the_trained_changes(trained, flux_dev_dir, tmp_path):
    """The file holds no alpha (scale 1, baked into lora_A); a network with alpha 2 at rank 4 takes the same
    weight changes."""
    cfg = load_config(make_style(tmp_path, flux_dev_dir), [*FLUX, f"network.init_weights='{trained['diffusers']}'"])
    network = Trainer(cfg, log=lambda m: None).network
    for key, (part, path) in network.modules.items():
        layer = network.layer(key)
        delta = layer.lora_B[ADAPTER_NAME].weight @ layer.lora_A[ADAPTER_NAME].weight * layer.scaling[ADAPTER_NAME]
        assert layer.scaling[ADAPTER_NAME] == 0.5
        torch.testing.assert_close(delta.detach(), trained["deltas"][path], atol=1e-6, rtol=1e-4)


def test_sdlora_run_with_diffusers_format_samples_and_resizes_diffusers_files(tmp_path, flux_dev_dir):
    """The run's previews, grids and `resize_energy` read the diffusers-style files through the one reader;
    the resized file keeps diffusers' keys."""
    from test_run import RUN_EXTRA

    from sdlora import run

    path = make_style(tmp_path, flux_dev_dir, extra=RUN_EXTRA)
    result = run.run(load_config(path, [*FLUX, "output.format=diffusers", "output.resize_energy=0.9"]),
                     log=lambda m: None)
    adapter = result["paths"]["adapter"]
    assert all(k.startswith("transformer.") for k in load_file(adapter))
    assert result["sample"].grids and all(g.is_file() for g in result["sample"].grids)
    resized = sorted(adapter.parent.glob("*energy*.safetensors"))
    assert resized and all(k.startswith("transformer.") for k in load_file(resized[0]))
