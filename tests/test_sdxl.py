"""SDXL-family training end to end on a test-size SDXL architecture: two text encoders, pooled
embeddings and size conditioning, Kohya SDXL key names, diffusers loading, resume."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import assert_resume_ends_where_an_uninterrupted_run_ends, make_style

from sdlora.adapters.keys import kohya_module_map
from sdlora.config import load_config
from sdlora.models import arch, families
from sdlora.models.families.base import tokenize
from sdlora.training.examples import EpochBatches, TrainingSamples, epoch_order
from sdlora.training.loop import Trainer, train


def sdxl_style(tmp_path, base_dir, extra: str = ""):
    return load_config(make_style(tmp_path, base_dir, extra=extra))


def render(pipe, prompt="clrscn, day, mountains", size=64):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, width=size, height=size, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_sdxl_export_has_kohya_names_and_loads_in_diffusers_with_the_same_pixels(tmp_path, mini_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    cfg = sdxl_style(tmp_path, mini_sdxl_dir)
    trainer = Trainer(cfg, log=lambda m: None)
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    tensors = load_file(result.adapter)
    modules = {k.split(".")[0] for k in tensors}
    prefixes = {m.split("_")[1] for m in modules}
    assert prefixes == {"unet", "te1", "te2"}
    unet = sorted(m for m in modules if m.startswith("lora_unet_"))
    # SGM names as kohya writes them: down_blocks.1 -> input_blocks.3 (one layer per block here)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" in unet
    assert "lora_unet_middle_block_1_proj_in" in unet
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2" in unet
    assert not any("down_blocks" in m or "up_blocks" in m or "mid_block" in m for m in unet)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in modules
    with safe_open(str(result.adapter), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(meta["ss_tag_frequency"]) and meta["sshs_model_hash"]

    pipe = StableDiffusionXLPipeline.from_pretrained(mini_sdxl_dir)
    in_training = trainer.base.pipeline()
    assert in_training.vae.device.type == "meta"  # released once the latents were cached
    in_training.vae = pipe.vae
    expected = render(in_training.to(torch.float32))
    before = render(pipe)
    state, _ = pipe.lora_state_dict(str(result.adapter))  # converted Kohya -> diffusers: nothing left over
    pipe.load_lora_weights(str(result.adapter))
    loaded = render(pipe)
    assert abs(loaded - expected).max() < 1e-4
    assert abs(before - expected).max() > 1e-3  # the adapter changes the picture
    assert len(state) == 2 * len(modules)  # lora_A/lora_B per module (alphas folded into the scales)


def test_sdxl_conditioning_is_penultimate_states_of_both_encoders_and_pooled_projection(mini_sdxl_dir):
    from sdlora.config import ModelConfig
    from sdlora.models import load

    base = load.load_base(ModelConfig(base=str(mini_sdxl_dir)))
    ids = tokenize(base.tokenizers, ["clrscn, lake"])
    with torch.no_grad():
        text = families.FAMILIES["sdxl"].encode_text(base.text_encoders, ids, clip_skip=1)
        # diffusers' own SDXL prompt encoding (clip_skip=None: penultimate of each, pooled of encoder 2)
        embeds, _, pooled, _ = base.pipeline().encode_prompt("clrscn, lake", do_classifier_free_guidance=False)
    assert text.hidden.shape == (1, 77, 64) and text.pooled.shape == (1, 16)
    torch.testing.assert_close(text.hidden, embeds)
    torch.testing.assert_close(text.pooled, pooled)
    with torch.no_grad():
        assert torch.equal(families.FAMILIES["sdxl"].encode_text(base.text_encoders, ids, clip_skip=2).hidden, text.hidden)
    assert families.FAMILIES["sdxl"].clip_skip_note(3) and not families.FAMILIES["sdxl"].clip_skip_note(2)


def test_sdxl_time_ids_record_original_size_crop_and_bucket(tmp_path, mini_sdxl_dir):
    cfg = sdxl_style(tmp_path, mini_sdxl_dir)
    trainer = Trainer(cfg, log=lambda m: None)
    order, _ = epoch_order(trainer.data.examples, 1, 0, 0)
    samples = TrainingSamples(trainer.data, EpochBatches(trainer.data.examples, 1, 0))
    for pos, index in enumerate(order):
        ex = trainer.data.examples[index]
        ids = samples[0, pos]["time_ids"].tolist()
        w, h = ex.size
        assert ids[:2] == [h, w] and ids[4:] == [ex.bucket.height, ex.bucket.width]
        top, left = ids[2:4]
        scale = max(ex.bucket.width / w, ex.bucket.height / h)
        assert (top, left) == ((round(h * scale) - ex.bucket.height) // 2, (round(w * scale) - ex.bucket.width) // 2)
    assert {ex.size for ex in trainer.data.examples} == {(64, 64), (96, 64)}  # 1:1 and 3:2 images


def test_sdxl_frozen_text_encoders_are_cached_with_pooled_outputs_and_leave_the_device(tmp_path, mini_sdxl_dir):
    overrides = ["train.text_encoder_lr=0", "dataset.shuffle_caption=false"]
    cfg = load_config(make_style(tmp_path, mini_sdxl_dir), overrides)
    result = train(cfg, log=lambda m: None)
    assert result.te_encodes == 4  # one per distinct caption, up front
    entries = list((cfg.output_dir / "cache" / "text").glob("*.safetensors"))
    assert len(entries) == 4 and set(load_file(entries[0])) == {"hidden", "pooled"}
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in load_file(result.adapter))
    again = load_config(make_style(tmp_path, mini_sdxl_dir), overrides + ["train.overwrite=true"])
    assert result.te_encodes + train(again, log=lambda m: None).te_encodes == 4  # reused


def test_sdxl_text_encoder_learning_rate_pair(tmp_path, mini_sdxl_dir):
    cfg = sdxl_style(tmp_path, mini_sdxl_dir, extra="text_encoder_lr = [1e-4, 0]\nmax_train_steps = 2")
    trainer = Trainer(cfg, log=lambda m: None)
    result = trainer.run()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"unet", "text_encoder_1"}  # te2 at 0: frozen and not exported
    keys = load_file(result.adapter).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and not any(k.startswith("lora_te2_") for k in keys)
    with safe_open(str(result.adapter), "pt") as f:
        assert f.metadata()["ss_text_encoder_lr"] == "0.0001, 0"


def test_text_encoder_learning_rate_pair_is_refused_for_one_encoder(tmp_path, mini_base_dir, capsys):
    from sdlora.cli import main

    path = make_style(tmp_path, mini_base_dir, extra="text_encoder_lr = [1e-4, 1e-5]")
    assert main(["train", str(path)]) == 2
    assert "text_encoder_lr" in capsys.readouterr().err


def test_sdxl_resume_ends_where_an_uninterrupted_run_ends(tmp_path, mini_sdxl_dir, interrupt_at_step):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = (sdxl_style(tmp_path / x, mini_sdxl_dir) for x in "ab")
    assert_resume_ends_where_an_uninterrupted_run_ends(a, b, interrupt_at_step)


def sgm_kohya_names(transformer_depths: dict[str, int]) -> set[str]:
    """Kohya's SDXL U-Net module names for the 'transformer' preset, written out from SGM's layout."""
    names = set()
    inner = ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v",
             "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"]
    for block, depth in transformer_depths.items():
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        names |= {f"lora_unet_{block}_transformer_blocks_{i}_{n}" for i in range(depth) for n in inner}
    return names


def test_full_sdxl_architecture_gives_kohyas_module_names_and_counts():
    """The bundled SDXL configs on the meta device (no weights, no download): 722 U-Net + 72 te1 + 192 te2."""
    from sdlora.adapters.network import inject
    from sdlora.config import NetworkConfig

    unet = arch.build_unet("sdxl", device="meta")
    te1 = arch.build_text_encoder("sdxl", device="meta")
    te2 = arch.build_text_encoder("sdxl", "text_encoder_2", device="meta")
    with torch.device("meta"):
        network = inject(unet, [te1, te2], NetworkConfig())
    keys = network.modules
    parts = {part: {k for k, (p, _) in keys.items() if p == part} for part in ("unet", "te1", "te2")}
    assert {p: len(k) for p, k in parts.items()} == {"unet": 722, "te1": 72, "te2": 192}
    depths = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10, "input_blocks_8_1": 10,
              "middle_block_1": 10, **{f"output_blocks_{i}_1": 10 for i in (0, 1, 2)},
              **{f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}}
    assert parts["unet"] == sgm_kohya_names(depths)
    layer = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    assert parts["te2"] == {f"lora_te2_text_model_encoder_layers_{i}_{n}" for i in range(32) for n in layer}
    assert kohya_module_map(unet, "unet").keys() >= parts["unet"]  # the reader names modules the same way


@pytest.fixture(scope="module")
def trained_sdxl(tmp_path_factory):
    """(base folder, config, adapter) of one short SDXL training run, shared by the sampler/low-rank tests."""
    from sdlora.tiny.configs import build_sdxl_pipeline

    base_dir = tmp_path_factory.mktemp("sdxl_base")
    build_sdxl_pipeline(seed=0).save_pretrained(base_dir)
    folder = tmp_path_factory.mktemp("sdxl_run")
    cfg = load_config(make_style(folder, base_dir, extra="max_train_steps = 6\nunet_lr = 0.01\ntext_encoder_lr = 0.005"))
    return base_dir, cfg, train(cfg, log=lambda m: None).adapter


def test_sdxl_sampler_passes_pooled_embeddings_and_matches_diffusers(trained_sdxl, tmp_path):
    """scale 0 renders what diffusers' SDXL pipeline renders from the same prompt; the unfused adapter
    (diffusers' loader) and the fused one (weights patched) render the same picture."""
    import dataclasses

    from diffusers import StableDiffusionXLPipeline

    from sdlora.sampling import sampler as sample

    base_dir, cfg, adapter = trained_sdxl
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, cfg_scale=5.0, negative_prompt="blurry"))
    pictures = {}
    for fuse in (False, True):
        sampler = sample.Sampler(cfg, fuse=fuse)
        sampler.adapters.add(adapter)
        for scale in (0.0, 1.0):
            sampler.adapters.set_scale(scale)
            images, params = sampler.render(["clrscn, lake"], [7], 64, 64, 3)
            pictures[fuse, scale] = torch.tensor(list(images[0].getdata()), dtype=torch.float32)
        sampler.adapters.close()
    assert (pictures[False, 1.0] - pictures[True, 1.0]).abs().max() <= 2  # uint8 pixels
    assert (pictures[False, 0.0] - pictures[False, 1.0]).abs().max() > 2
    # the base through diffusers' own SDXL prompt encoding and time ids, same sampler and seed
    reference = StableDiffusionXLPipeline.from_pretrained(base_dir)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = sample.make_scheduler(cfg.sample.sampler, reference.scheduler)
    image = reference("clrscn, lake", negative_prompt="blurry", num_inference_steps=3, width=64, height=64,
                      guidance_scale=5.0, generator=torch.Generator().manual_seed(7)).images[0]
    ours = pictures[False, 0.0]
    assert (torch.tensor(list(image.getdata()), dtype=torch.float32) - ours).abs().max() <= 2


def test_sdxl_one_pass_at_its_native_area_and_sdxl_img2img_above_it(trained_sdxl):
    from sdlora.sampling import sampler as sample

    assert sample.hires_mode("auto", 1080, 720, 1024, 4.0) == "off"  # SDXL: 1080x720 renders in one pass
    assert sample.hires_mode("auto", 1080, 720, 512, 4.0) != "off"  # SD1.5 needs the hires pass
    _, cfg, adapter = trained_sdxl
    sampler = sample.Sampler(cfg)
    sampler.adapters.add(adapter)
    sampler.adapters.set_scale(1.0)
    images, params = sampler.render(["clrscn, hills"], [1], 96, 64, 2, hires="auto")  # above the 64 px native area
    assert images[0].size == (96, 64) and params["Denoising strength"] == cfg.sample.hires_denoise
    sampler.adapters.close()


def test_sdxl_previews_during_training(tmp_path, mini_sdxl_dir):
    extra = "max_train_steps = 8\n[sample]\nprompts = [\"clrscn, lake\"]\nevery_n_epochs = 1"
    cfg = load_config(make_style(tmp_path, mini_sdxl_dir, extra=extra))
    cfg.sample.preview_steps = 2
    train(cfg, log=lambda m: None)
    assert list((cfg.output_dir / "previews").rglob("preview_grid_seed*.png"))


def test_sdxl_merge_resize_and_inspect(trained_sdxl, tmp_path):
    """merge bakes all three parts into an SDXL base; resize keeps the SGM/te1/te2 keys; inspect reads them."""
    from diffusers import StableDiffusionXLPipeline

    from sdlora.lowrank import tools
    from sdlora.lowrank.inspect import inspect

    base_dir, _, adapter = trained_sdxl
    merged_base, merged = tools.load_merged(str(base_dir), [(adapter, 1.0)])
    modules = {k.split(".")[0] for k in load_file(adapter)}
    assert merged == {str(adapter): len(modules)}
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.load_lora_weights(str(adapter))
    loaded = render(pipe, "clrscn, night, lake")
    assert abs(render(merged_base.pipeline(), "clrscn, night, lake") - loaded).max() < 1e-3
    small = tmp_path / "small.safetensors"
    tools.resize(adapter, small, energy=0.9)
    assert {k.split(".")[0] for k in load_file(small)} == modules
    report = inspect(small)
    assert report


def _train_sdxl_in_bf16_with_checkpointing(config_path):
    """In its own process (bf16 mixed precision): what the test below checks of the trained network."""
    cfg = load_config(config_path, ["train.mixed_precision='bf16'", "train.gradient_checkpointing=true"])
    trainer = Trainer(cfg, log=lambda m: None)
    result = trainer.run()
    base = trainer.base
    return {"dtypes": (base.unet.dtype, base.text_encoder_2.dtype),
            "checkpointing": [base.unet.is_gradient_checkpointing,
                              *(te.is_gradient_checkpointing for te in base.text_encoders)],
            "adapter_dtypes": {p.dtype for p in trainer.network.trainable_parameters()},
            "te1_layers": base.text_encoder.config.num_hidden_layers, "tensors": load_file(result.adapter)}


def test_sdxl_single_file_base_trains_in_bf16_with_checkpointing_of_all_three_models(tmp_path, mini_sdxl_dir,
                                                                                       fresh_process):
    """An original-layout (SGM) single file, frozen weights held in bf16, gradient checkpointing on the
    U-Net and both text encoders: the adapters train (in fp32) and export finite and changed."""
    from sdlora.config import ModelConfig
    from sdlora.models import checkpoint, load

    single = checkpoint.save_single_file(load.load_base(ModelConfig(base=str(mini_sdxl_dir))), tmp_path / "xl.safetensors",
                                     dtype=torch.float32)
    got = fresh_process(_train_sdxl_in_bf16_with_checkpointing,
                        make_style(tmp_path, single, extra="max_train_steps = 3"))
    assert got["dtypes"] == (torch.bfloat16, torch.bfloat16)
    assert got["checkpointing"] == [True, True, True]  # the U-Net and both text encoders
    assert got["adapter_dtypes"] == {torch.float32}
    tensors = got["tensors"]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # Every module trained but those of encoder 1's last layer: SDXL reads its penultimate state, so
    # that layer gets no gradient (kohya exports it untrained too); encoder 2's feeds the pooled output.
    last = f"lora_te1_text_model_encoder_layers_{got['te1_layers'] - 1}_"
    untrained = {k.split(".")[0] for k, t in tensors.items() if "lora_up" in k and float(t.abs().max()) == 0}
    assert untrained and all(k.startswith(last) for k in untrained)


def test_sdlora_run_end_to_end_on_an_sdxl_base(tmp_path, mini_sdxl_dir):
    from sdlora import run

    extra = ("max_train_steps = 4\n[caption]\ntagger = \"none\"\n[sample]\nprompts = [\"clrscn, lake\"]\n"
             "width = 64\nheight = 64\nsteps = 2\nseeds = [1]")
    cfg = load_config(make_style(tmp_path, mini_sdxl_dir, extra=extra))
    result = run.run(cfg, log=lambda m: None)
    assert result["paths"]["adapter"].is_file() and result["sample"].grids
    again = run.run(cfg, log=lambda m: None)  # up to date: not retrained
    assert again["paths"]["adapter"].stat().st_mtime_ns == result["paths"]["adapter"].stat().st_mtime_ns


@pytest.mark.slow
def test_full_sdxl_architecture_trains_one_step_in_bf16(tmp_path, fresh_process):
    """The full SDXL architecture (random weights from the bundled configs, bf16 frozen base): one
    training step at 512 px with gradient checkpointing; prints the peak memory (README's SDXL table)."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from sdlora.models.tokenizer import clip_tokenizer, open_clip_tokenizer

    base_dir = tmp_path / "sdxl"
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            pipe = StableDiffusionXLPipeline(
                vae=arch.build_vae("sdxl"), text_encoder=arch.build_text_encoder("sdxl"),
                text_encoder_2=arch.build_text_encoder("sdxl", "text_encoder_2"),
                tokenizer=clip_tokenizer(), tokenizer_2=open_clip_tokenizer(), unet=arch.build_unet("sdxl"),
                scheduler=DDPMScheduler.from_config(arch.part_config("sdxl", "scheduler")))
        finally:
            torch.set_default_dtype(torch.float32)
    pipe.save_pretrained(base_dir)
    del pipe
    modules, peak_gb = fresh_process(_one_full_sdxl_step, make_style(tmp_path, base_dir, n=1,
                                                                      extra="max_train_steps = 1"))
    assert modules == 722 + 72 + 192
    print(f"full SDXL, bf16 base, 512 px, batch 1, checkpointing: one step, peak RSS {peak_gb:.1f} GB")


def _one_full_sdxl_step(config_path):
    """In its own process (bf16; the peak memory its own): one step at 512 px; the exported module
    count and the process's peak RSS in GB."""
    import resource

    cfg = load_config(config_path, ["train.batch_size=1", "dataset.resolution=512", "dataset.min_bucket_reso=256",
                                    "dataset.max_bucket_reso=1024", "dataset.bucket_reso_steps=64",
                                    "train.mixed_precision='bf16'", "train.gradient_checkpointing=true",
                                    "train.save_every_n_epochs=0"])
    result = train(cfg, log=print)
    modules = len({k.split(".")[0] for k in load_file(result.adapter)})
    return modules, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def test_sdxl_bucket_set_at_the_1024_area():
    from sdlora.data.buckets import make_buckets

    buckets = {(b.width, b.height) for b in make_buckets((1024, 1024), 512, 2048, 64)}
    usual = {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
             (1536, 640), (640, 1536)}
    assert usual <= buckets and all(w * h <= 1024 * 1024 for w, h in buckets)


@pytest.mark.parametrize("network", ["locon", "loha"])
def test_sdxl_locon_and_loha_train_and_render(tmp_path, mini_sdxl_dir, network):
    """LoCon adds SDXL's ResNet convs under their SGM names and loads in diffusers with nothing left over;
    LoHa (which diffusers cannot read) renders through the sampler's weight patching."""
    from diffusers import StableDiffusionXLPipeline

    from sdlora.sampling import sampler as sample

    cfg = load_config(make_style(tmp_path, mini_sdxl_dir, extra="max_train_steps = 4\nunet_lr = 0.01"),
                      [f"network.type='{network}'"])
    adapter = train(cfg, log=lambda m: None).adapter
    modules = {k.split(".")[0] for k in load_file(adapter)}
    if network == "locon":
        assert "lora_unet_input_blocks_1_0_in_layers_2" in modules  # down_blocks.0.resnets.0.conv1
        assert "lora_unet_output_blocks_2_0_skip_connection" in modules  # up_blocks.0.resnets.2.conv_shortcut
        pipe = StableDiffusionXLPipeline.from_pretrained(mini_sdxl_dir)
        state, _ = pipe.lora_state_dict(str(adapter))
        assert len(state) == 2 * len(modules)
        pipe.load_lora_weights(str(adapter))
    sampler = sample.Sampler(cfg)
    sampler.adapters.add(adapter)
    rendered = {}
    for scale in (0.0, 1.0):
        sampler.adapters.set_scale(scale)
        image = sampler.render(["clrscn, lake"], [3], 64, 64, 2)[0][0]
        rendered[scale] = torch.tensor(list(image.getdata()), dtype=torch.float32)
    sampler.adapters.close()
    assert (rendered[0.0] - rendered[1.0]).abs().max() > 2


def test_sdxl_training_lowers_the_loss_on_its_examples(tmp_path, mini_sdxl_dir):
    """The same batches (same noise and timesteps) scored with the trained U-Net adapters on and off."""
    cfg = load_config(make_style(tmp_path, mini_sdxl_dir, extra="max_train_steps = 48\nunet_lr = 0.01"),
                      ["train.text_encoder_lr=0", "train.min_snr_gamma=0"])
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.run()
    samples = TrainingSamples(trainer.data, trainer.data.batches)
    trainer.data.batches.start_epoch(0)
    batches = [torch.utils.data.default_collate([samples[key] for key in b]) for b in trainer.data.batches]
    with torch.no_grad():
        trained = sum(float(trainer.step(b)) for b in batches)
        trainer.base.unet.disable_adapters()
        untrained = sum(float(trainer.step(b)) for b in batches)
        trainer.base.unet.enable_adapters()
    assert trained < 0.9 * untrained, (trained, untrained)


def test_sdxl_extract_from_a_merged_sdxl_checkpoint(trained_sdxl, tmp_path):
    from sdlora.lowrank import tools

    base_dir, _, adapter = trained_sdxl
    merged = tmp_path / "merged"
    tools.merge(str(base_dir), [(adapter, 1.0)], merged, dtype=torch.float32)
    out = tmp_path / "extracted.safetensors"
    tools.extract(str(base_dir), str(merged), out, rank=4)
    extracted = {k.split(".")[0] for k in load_file(out)}
    trained = {k.split(".")[0] for k in load_file(adapter)}
    assert extracted and extracted <= trained | {k for k in extracted if k.startswith("lora_unet_")}
    assert any(k.startswith("lora_unet_input_blocks_") for k in extracted)
    assert any(k.startswith("lora_te2_") for k in extracted)
