"""Base models: the embedded tiny model, diffusers folders, single-file checkpoints in the
original SD layout (round trips through diffusers' own converter), hub ids offline, clip_skip."""

import dataclasses
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.config import Config, ModelConfig
from sdlora.digest import file_digest
from sdlora.errors import UserError
from sdlora.models import arch, checkpoint, load
from sdlora.models.families import FAMILIES, clip, sd, sdxl


@pytest.fixture(scope="module")
def tiny():
    return load.load_base(ModelConfig(base="tiny"))


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    from sdlora.tiny.configs import build_pipeline

    folder = tmp_path_factory.mktemp("mini")
    build_pipeline("mini", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mini(mini_dir):
    return load.load_base(ModelConfig(base=str(mini_dir)))


def assert_same_weights(a, b):
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        unequal = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not unequal, f"{part}: {unequal[:3]}"


def test_tiny_loads_as_fp32_sd1(tiny):
    assert (tiny.family, tiny.prediction_type, tiny.resolution, tiny.name) == ("sd_v1", "epsilon", 128, "tiny")
    assert tiny.unet.dtype == torch.float32 and tiny.text_encoder.dtype == torch.float32
    assert tiny.model_hash == file_digest(load.TINY_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    assert tiny.noise_scheduler.config.num_train_timesteps == 1000


def test_mini_folder_loads_and_samples(mini_dir, mini):
    assert mini.family == "sd_v1" and mini.name == mini_dir.name
    out = mini.pipeline()("a hill", num_inference_steps=2, height=64, width=64, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)


def test_v_parameterization_override(mini_dir):
    base = load.load_base(ModelConfig(base=str(mini_dir), v_parameterization="v_prediction"))
    assert base.prediction_type == "v_prediction"
    assert base.noise_scheduler.config.prediction_type == "v_prediction"


def test_clip_skip_is_penultimate_layer_through_final_norm(tiny):
    ids = tiny.tokenizer(["a red sky over hills"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        last = clip.encode_prompt(tiny.text_encoder, ids, 1)
        skip2 = clip.encode_prompt(tiny.text_encoder, ids, 2)
        hs = tiny.text_encoder(ids, output_hidden_states=True).hidden_states
        assert len(hs) == tiny.text_encoder.config.num_hidden_layers + 1
        expected = tiny.text_encoder.final_layer_norm(hs[-2])
    assert torch.equal(last, tiny.text_encoder(ids).last_hidden_state)
    assert not torch.allclose(last, skip2)
    assert torch.equal(skip2, expected)


def test_base_info_feeds_adapter_metadata(mini):
    from sdlora.adapters.network import adapter_metadata

    meta = adapter_metadata(Config(), mini, {"num_train_images": 3, "num_epochs": 1, "epoch": 1, "steps": 2})
    assert meta["ss_sd_model_name"] == mini.name and meta["ss_new_sd_model_hash"] == mini.model_hash
    assert meta["ss_v2"] == "False" and meta["modelspec.prediction_type"] == "epsilon"


# ------------------------------------------------------------- single files


@pytest.mark.parametrize("which", ["mini", "tiny"])
def test_single_file_round_trip(which, mini, tiny, tmp_path):
    base = mini if which == "mini" else tiny
    path = checkpoint.save_single_file(base, tmp_path / "model.safetensors", dtype=torch.float32)
    again = load.load_base(ModelConfig(base=str(path)))
    assert (again.family, again.prediction_type, again.resolution) == ("sd_v1", "epsilon", base.resolution)
    assert again.name == "model" and again.model_hash == file_digest(path)
    assert_same_weights(base, again)


def test_single_file_has_the_original_layout_in_fp16(mini, tmp_path):
    path = checkpoint.save_single_file(mini, tmp_path / "m.safetensors")
    tensors = load_file(path)
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.down.0.block.0.conv1.weight", "first_stage_model.decoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in tensors, key
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as ldm has it
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in tensors)


def test_save_refuses_to_overwrite(mini, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"user file")
    with pytest.raises(UserError, match="exists"):
        checkpoint.save_single_file(mini, path)
    assert path.read_bytes() == b"user file"
    checkpoint.save_single_file(mini, path, overwrite=True)
    assert load.load_base(ModelConfig(base=str(path))).family == "sd_v1"
    folder = tmp_path / "pipe"
    folder.mkdir()
    with pytest.raises(UserError, match="exists"):
        checkpoint.save_diffusers(mini, folder)


def test_save_diffusers_round_trip(mini, tmp_path):
    folder = checkpoint.save_diffusers(mini, tmp_path / "pipe")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert_same_weights(mini, load.load_base(ModelConfig(base=str(folder))))


def test_sd2_single_file_round_trip(mini, tmp_path):
    # The mini model written as SD2 (OpenCLIP text-encoder layout with fused in_proj).
    sd2 = dataclasses.replace(mini, family="sd_v2")
    path = checkpoint.save_single_file(sd2, tmp_path / "sd2.safetensors", dtype=torch.float32)
    tensors, meta = load_file(path), checkpoint.read_state_dict(path)[1]
    assert any(k.startswith(FAMILIES["sd_v2"].signature) for k in tensors)
    # what real SD2 files carry besides: OpenCLIP's projection and logit scale, the noise schedule
    width = mini.text_encoder.config.hidden_size
    save_file({**tensors, "cond_stage_model.model.text_projection": torch.randn(width, width),
               "cond_stage_model.model.logit_scale": torch.tensor(4.6), "alphas_cumprod": torch.rand(1000)},
              path, metadata=meta)
    again = load.load_base(ModelConfig(base=str(path)))
    assert (again.family, again.prediction_type) == ("sd_v2", "epsilon")
    assert again.tokenizer.pad_token == "!"
    assert_same_weights(mini, again)
    v = load.load_base(ModelConfig(base=str(path), v_parameterization="v_prediction"))
    assert (v.family, v.noise_scheduler.config.prediction_type) == ("sd_v2_v", "v_prediction")


def test_separate_vae_replaces_the_base_vae(mini, tmp_path):
    folder = tmp_path / "vae"
    mini.vae.save_pretrained(folder)
    base = load.load_base(ModelConfig(base="tiny", vae=str(folder)))
    assert torch.equal(base.vae.decoder.conv_out.weight, mini.vae.decoder.conv_out.weight)
    # A file has no config: the SD VAE architecture is assumed, and the mini VAE is refused.
    path = tmp_path / "vae_ldm.safetensors"
    save_file(checkpoint.vae_to_original(mini.vae.state_dict(), mini.vae.config), path)
    with pytest.raises(UserError, match=r"model\.vae: .*vae_ldm\.safetensors does not match"):
        checkpoint.load_vae(path, torch.float32)


def test_sd_sized_vae_file_in_both_layouts(tmp_path):
    vae = arch.build_vae("sd_v1")
    for layout, tensors in (("ldm", checkpoint.vae_to_original(vae.state_dict(), vae.config)),
                            ("diffusers", vae.state_dict())):
        path = tmp_path / f"{layout}.safetensors"
        save_file({k: v.half() for k, v in tensors.items()}, path)
        loaded = checkpoint.load_vae(path, torch.float16)
        assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight.half()), layout
    # the same weights under an SDXL base keep SDXL's latent scaling
    assert checkpoint.load_vae(path, torch.float16, "sdxl").config.scaling_factor == 0.13025
    assert loaded.config.scaling_factor == 0.18215


def test_pickle_needs_opt_in(mini, tmp_path):
    single = checkpoint.save_single_file(mini, tmp_path / "m.safetensors", dtype=torch.float32)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(single)}, ckpt)
    with pytest.raises(UserError, match=r"m\.ckpt.*allow_pickle"):
        load.load_base(ModelConfig(base=str(ckpt)))
    # a pickled file has no embedded configs: the shipped SD1.5 config does not fit the mini model
    with pytest.raises(UserError, match=r"m\.ckpt.*does not match"):
        load.load_base(ModelConfig(base=str(ckpt), allow_pickle=True))


@pytest.mark.parametrize("content, message", [
    (b"just some text, not weights", "not a safetensors file"),
    (None, "truncated"),
    ("unknown", "unknown model family"),
])
def test_bad_checkpoints_are_user_errors(content, message, mini, tmp_path):
    path = tmp_path / "bad.safetensors"
    if content is None:
        good = checkpoint.save_single_file(mini, tmp_path / "good.safetensors")
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif content == "unknown":
        save_file({"model.diffusion_model.foo.weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        load.load_base(ModelConfig(base=str(path)))
    assert "bad.safetensors" in str(err.value)


def test_not_a_checkpoint_suffix(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match="notes.txt is not a checkpoint"):
        load.load_base(ModelConfig(base=str(path)))


def test_family_detection_from_keys():
    te = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert checkpoint.detect_family(["model.diffusion_model.out.2.weight", te]) == "sd_v1"
    assert checkpoint.detect_family(["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]) == "sd_v2"
    assert checkpoint.detect_family(["conditioner.embedders.0.transformer.text_model.x",
                                     "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    with pytest.raises(UserError, match="without a text encoder"):
        checkpoint.detect_family(["model.diffusion_model.out.2.weight"], "x.safetensors")
    # SD2 768-v vs 512-base: the spread of the last attention block's norm1 bias (ComfyUI's test)
    torch.manual_seed(0)
    assert sd.sd2_prediction_type({sd.V_PROBE: torch.randn(320) * 0.3}) == "v_prediction"
    assert sd.sd2_prediction_type({sd.V_PROBE: torch.randn(320) * 0.01}) == "epsilon"
    assert sd.sd2_prediction_type({}) == "epsilon"


def mini_sdxl(mini):
    """An SDXL-architecture base at test size (tiny.configs.build_sdxl_pipeline) with the mini VAE."""
    from sdlora.tiny.configs import build_sdxl_pipeline

    xl = build_sdxl_pipeline(seed=0)
    return dataclasses.replace(mini, family="sdxl", unet=xl.unet.eval(), text_encoder=xl.text_encoder.eval(),
                               text_encoder_2=xl.text_encoder_2.eval(), tokenizer_2=sdxl.SDXL_TEXT_ENCODERS[1].tokenizer())


def test_sdxl_single_file_and_folder_round_trip(mini, tmp_path):
    xl = mini_sdxl(mini)
    path = checkpoint.save_single_file(xl, tmp_path / "xl.safetensors", dtype=torch.float32)
    keys = load_file(path).keys()
    for key in ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight",
                "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight"):
        assert key in keys, key
    assert checkpoint.detect_family(keys) == "sdxl"
    again = load.load_base(ModelConfig(base=str(path)))
    assert (again.family, again.prediction_type) == ("sdxl", "epsilon")
    assert_same_weights(xl, again)
    sa, sb = xl.text_encoder_2.state_dict(), again.text_encoder_2.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    folder = checkpoint.save_diffusers(again, tmp_path / "xl_pipe")
    from_folder = load.load_base(ModelConfig(base=str(folder)))
    assert from_folder.family == "sdxl" and from_folder.tokenizer_2.pad_token == "!"
    assert torch.equal(from_folder.text_encoder_2.text_projection.weight, xl.text_encoder_2.text_projection.weight)


def test_family_detection_from_full_key_sets(mini, tmp_path):
    """SD2 and SDXL key sets as the writers produce them (meta-device SD2.1 text encoder)."""
    te = arch.build_text_encoder("sd_v2", device="meta")
    sd2_keys = sd.SD2_TEXT_ENCODER.to_original(te.state_dict())
    assert len([k for k in sd2_keys if k.endswith("attn.in_proj_weight")]) == 23
    unet_keys = checkpoint.unet_to_original(mini.unet.state_dict(), mini.unet.config)
    assert checkpoint.detect_family([*sd2_keys, *unet_keys]) == "sd_v2"
    xl = mini_sdxl(mini)
    xl_keys = sdxl.SDXL_TEXT_ENCODERS[1].to_original(xl.text_encoder_2.state_dict())
    assert checkpoint.detect_family([*xl_keys, *unet_keys]) == "sdxl"


@pytest.mark.parametrize("layers, slot", [(24, sd.SD2_TEXT_ENCODER), (3, sdxl.SDXL_TEXT_ENCODERS[1])],
                         ids=["sd2", "sdxl"])
def test_open_clip_names_agree_with_diffusers_converter(layers, slot):
    """OpenCLIP text-encoder keys are read with the table that writes them; diffusers' converter (an
    internal function, used here only as the reference) must agree, SD2's unused 24th block included."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def encoder(n):
        return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                                          num_hidden_layers=n, projection_dim=8))

    torch.manual_seed(0)
    prefix = slot.prefix
    tensors = slot.to_original(encoder(layers).state_dict())
    tensors[prefix + "logit_scale"] = torch.tensor(4.6)
    expected = convert_open_clip_checkpoint(encoder(min(layers, 23)), tensors, prefix=prefix)
    ours = checkpoint.text_encoder_state(tensors, slot)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


@pytest.mark.parametrize("part, key, named", [
    ("UNet", "model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.weight"),
    ("VAE", "first_stage_model.decoder.conv_out.weight", "first_stage_model.decoder.conv_out.weight"),
    ("text encoder", "cond_stage_model.transformer.text_model.final_layer_norm.bias", "final_layer_norm.bias"),
])
def test_an_incomplete_checkpoint_names_the_part_the_file_and_the_tensor_in_one_line(part, key, named, mini,
                                                                                      tmp_path):
    tensors, meta = checkpoint.read_state_dict(checkpoint.save_single_file(mini, tmp_path / "good.safetensors"))
    del tensors[key]
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(UserError, match=rf"model\.base: the {part} in .*bad\.safetensors does not match") as err:
        load.load_base(ModelConfig(base=str(tmp_path / "bad.safetensors")))
    assert "\n" not in str(err.value)
    assert f"missing ['{named}" in str(err.value) or f"missing ['text_model.{named}" in str(err.value)


def test_tensors_a_checkpoint_has_no_place_for_are_left_out(mini, tmp_path):
    """A training checkpoint also holds e.g. the VAE's loss weights and EMA bookkeeping: ignored, as
    the original -> diffusers conversion ignores them."""
    tensors, meta = checkpoint.read_state_dict(checkpoint.save_single_file(mini, tmp_path / "good.safetensors"))
    tensors["first_stage_model.loss.logvar"] = torch.zeros(())
    tensors["model.diffusion_model.num_updates"] = torch.tensor(3)
    save_file(tensors, tmp_path / "extra.safetensors", metadata=meta)
    loaded = load.load_base(ModelConfig(base=str(tmp_path / "extra.safetensors")))
    assert torch.equal(loaded.unet.conv_out.weight, mini.unet.conv_out.weight.half().float())


# ------------------------------------------------------------- missing paths and hub ids


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load.load_base(ModelConfig(base=str(tmp_path / "nope.safetensors")))
    with pytest.raises(UserError, match="model_index.json"):
        load.load_base(ModelConfig(base=str(tmp_path)))


@pytest.mark.parametrize("offline_env", [True, False])
def test_hub_id_without_network_fails_fast(offline_env, monkeypatch):
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # the network probe answers "unreachable"; the real one has a 2 s timeout
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(load, "_hub_reachable", lambda timeout=2.0: False)
    start = time.monotonic()
    with pytest.raises(UserError, match="someone/some-model.*(download it|give a local path)"):
        load.load_base(ModelConfig(base="someone/some-model"))
    assert time.monotonic() - start < 5


def test_network_probe_is_bounded(monkeypatch):
    """A hub that never answers (no real socket: the suite runs offline) costs the timeout, not a hang."""
    import socket
    import threading

    released = threading.Event()

    def never_answers(address, timeout=None):
        released.wait(30)  # until the test is over; then fails as an unreachable host does
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", never_answers)
    start = time.monotonic()
    try:
        assert load._hub_reachable(timeout=0.5) is False
        assert time.monotonic() - start < 3
    finally:
        released.set()


# ------------------------------------------------------------- full size (opt-in)


@pytest.mark.slow
def test_full_size_sd15_random_weights_round_trip(tmp_path):
    """SD1.5-sized random weights from the shipped config: original layout, fp16, and back."""
    base = load.random_base("sd_v1")
    path = checkpoint.save_single_file(base, tmp_path / "sd15.safetensors")
    assert 2.0e9 < path.stat().st_size < 2.3e9  # the size of a pruned fp16 SD1.5 file
    again = load.load_base(ModelConfig(base=str(path)), dtype=torch.float16)
    assert (again.family, again.resolution) == ("sd_v1", 512)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(base, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(sa[k].half(), sb[k]) for k in sa), part
