"""Training LoRA on a tiny FLUX.1-dev base from a diffusers folder: `sdlora train` exports Kohya's FLUX names
(fused qkv / linear1 as sd-scripts writes them) whose weights equal the trained network's, and the loss
of a repeated batch falls.

diffusers 0.42's Kohya FLUX converter hard-codes FLUX.1's full widths (single blocks' linear1 split as
3 x 3072 + 12288), so a tiny Kohya file cannot go through FluxPipeline.load_lora_weights as it is; the
file is checked here by splitting it back into diffusers' modules (`transformer_keys.split`, the
converter's own rule) and loading that in diffusers' format, with no key left over."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_run import RUN_EXTRA
from test_train import make_style, repeat_batch

from sdlora import run
from sdlora.adapters import transformer_keys
from sdlora.cli import main
from sdlora.config import load_config
from sdlora.errors import UserError
from sdlora.models.flux import latent_image_ids
from sdlora.tiny.configs import build_flux_pipeline
from sdlora.training.loop import Trainer

FLUX = ["network.train_text_encoder=false", "dataset.shuffle_caption=false"]


@pytest.fixture(scope="module")
def flux_dev_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_dev")
    build_flux_pipeline(guidance=True).save_pretrained(folder)
    return folder


def _kohya_module_keys(transformer) -> set[str]:
    return set(transformer_keys.kohya_modules(transformer, transformer_keys.FLUX_NAMES))


def test_sdlora_train_exports_kohya_flux_names_that_hold_the_trained_weights(tmp_path, flux_dev_dir):
    from diffusers import FluxPipeline

    path = make_style(tmp_path, flux_dev_dir, extra="max_train_steps = 3")
    assert main(["train", str(path), *[a for o in FLUX for a in ("--set", o)]]) == 0
    adapter = load_config(path).output_dir / "style.safetensors"
    tensors = load_file(adapter)
    pipe = FluxPipeline.from_pretrained(flux_dev_dir)
    modules = {k.split(".", 1)[0] for k in tensors}
    assert modules == _kohya_module_keys(pipe.transformer)  # 2 double x 10 + 2 single x 3, kohya's defaults
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules and "lora_unet_single_blocks_1_linear1" in modules
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    # q, k, v trained apart: one block-diagonal module of rank 3 x dim, alpha 3 x alpha (the same scale)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * 4, 32)
    assert float(tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * 2
    assert float(tensors["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 2
    with safe_open(adapter, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert "modelspec.prediction_type" not in meta
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_guidance_scale"] == "3.5"
    assert meta["ss_timestep_sampling"] == "sigma" and meta["ss_model_prediction_type"] == "raw"

    # The file, split back into diffusers' modules with alpha / rank baked into lora_A, loads whole in
    # diffusers and gives the transformer the trained weights.
    assert_loads_in_diffusers_as_trained(pipe, tensors, transformer_keys.FLUX_NAMES)


def assert_loads_in_diffusers_as_trained(pipe, tensors: dict, names) -> None:
    """A Kohya transformer file (`tensors`, named by `names`), split into diffusers' modules with alpha / rank
    baked into lora_A, loads whole through `pipe.load_lora_weights` in diffusers' own format, and each original
    module's rows change by alpha / rank up @ down, which is not zero (it trained)."""
    transformer = pipe.transformer
    diffusers_lora = {}
    modules = transformer_keys.kohya_modules(transformer, names)
    for key, module in modules.items():
        fused = transformer_keys.LoraFactors(tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"],
                                             float(tensors[f"{key}.alpha"]))
        parts = transformer_keys.split(fused, transformer_keys.output_sizes(transformer, module), module.swap_halves)
        for p, factors in zip(module.paths, parts):
            diffusers_lora[f"transformer.{p}.lora_A.weight"] = factors.down * (factors.alpha / factors.down.shape[0])
            diffusers_lora[f"transformer.{p}.lora_B.weight"] = factors.up
    before = {p: transformer.get_submodule(p).weight.clone() for m in modules.values() for p in m.paths}
    pipe.load_lora_weights(diffusers_lora)
    pipe.fuse_lora()
    for key, module in modules.items():  # each original module's rows change by alpha / rank up @ down
        delta = torch.cat([transformer.get_submodule(p).get_base_layer().weight - before[p] for p in module.paths])
        if module.swap_halves:
            delta = torch.cat(delta.chunk(2)[::-1])
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        want = float(tensors[f"{key}.alpha"]) / down.shape[0] * up @ down
        assert torch.allclose(delta, want, atol=1e-6), key
        assert want.abs().max() > 0, key  # it trained


def test_the_loss_of_a_repeated_batch_falls_and_resume_reads_the_fused_file(tmp_path, flux_dev_dir):
    cfg = load_config(make_style(tmp_path, flux_dev_dir, extra="max_train_steps = 20\nunet_lr = 1e-2\ntimestep_sampling = \"flux_shift\""), FLUX)
    trainer = Trainer(cfg, log=lambda m: None)
    batch = next(iter(trainer.loader))
    assert_loss_falls_and_the_file_reads_back(trainer, batch, 12, lambda: dict(
        hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 32, 64),
        pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=latent_image_ids(8, 8), txt_ids=torch.zeros(32, 3)))


def assert_loss_falls_and_the_file_reads_back(trainer, batch, steps: int, make_sample) -> None:
    """The loss of `batch` repeated `steps` times ends below 0.9 x its first; the network's Kohya file, read
    back into the zeroed network (resume / init_weights), gives the same transformer output on `make_sample()`
    (its keyword arguments, drawn after training) and the same file keys."""
    losses = repeat_batch(trainer, batch, steps)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses

    network = trainer.network
    state = network.kohya_state_dict(torch.float32)
    transformer = trainer.base.unet
    sample = make_sample()
    with torch.no_grad():
        trained = transformer(**sample).sample
        for p in network.trainable_parameters():
            p.zero_()
        network.load_kohya_state_dict(state)
        assert torch.allclose(transformer(**sample).sample, trained, atol=1e-6)
    assert network.kohya_state_dict(torch.float32).keys() == state.keys()


def test_dora_on_a_kind_peft_has_no_dora_for_is_refused_on_flux(tmp_path, flux_dev_dir):
    # LoHa, LoKr and DoRA on LoRA train on FLUX.1 (tests/test_flux_kinds.py); DoRA over LoHa does not exist
    cfg = load_config(make_style(tmp_path, flux_dev_dir), [*FLUX, "network.type=loha", "network.dora=true"])
    with pytest.raises(UserError, match="dora = true needs type lora or locon"):
        Trainer(cfg, log=lambda m: None)


def test_sdlora_run_on_a_flux_folder_previews_each_epoch_and_renders_the_scale_grid(tmp_path, flux_dev_dir):
    # Two epochs of 4 steps: a preview after the first (the last epoch's adapter is the run's, sampled below).
    extra = RUN_EXTRA.replace("max_train_steps = 4", "max_train_steps = 8") + "\nevery_n_epochs = 1\npreview_steps = 2"
    path = make_style(tmp_path, flux_dev_dir, extra=extra)
    logs = []
    result = run.run(load_config(path, FLUX), log=logs.append)
    previews = sorted((tmp_path / "out" / "previews").rglob("preview*grid*.png"))
    assert [p.parent.name for p in previews] == ["epoch000001"]
    assert result["sample"].grids and all(g.is_file() for g in result["sample"].grids)
    assert any("flow-matching Euler" in line and "2 steps" in line for line in logs)
    assert result["figures"] is not None  # scale 0 vs 1: the style figures of the report