"""Prompts as A1111 users write them: the parsing rules (A1111's own documented examples), the
75-token chunks, the emphasis maths, <lora:...> tags against --lora, and kohya's prompt files."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.errors import UserError
from sdlora.models import prompts
from sdlora.models.load import TINY_DIR
from sdlora.sampling import infotext
from sdlora.sampling import sampler as sample


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TINY_DIR / "tokenizer")


# A1111's parse_prompt_attention docstring examples ------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_attention_parsing_follows_a1111(text, expected):
    got = prompts.parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_lora_tags_are_taken_out_with_their_weights():
    text, tags, others = prompts.extract_networks("a house <lora:pastel:0.8>, <lyco:ink>, <hypernet:x:1> sky")
    assert text == "a house , ,  sky"
    assert [(t.name, t.te, t.unet) for t in tags] == [("pastel", 0.8, 0.8), ("ink", 1.0, 1.0)]
    assert others == ["<hypernet:x:1>"]
    with pytest.raises(UserError, match="must be numbers"):
        prompts.extract_networks("<lora:a:strong>")


@pytest.mark.parametrize("tag, te, unet", [
    # A1111's extra_networks_lora: positional name, te, unet; te= / unet= override; unet defaults to te.
    ("<lora:x>", 1.0, 1.0),
    ("<lora:x:0.5>", 0.5, 0.5),
    ("<lora:x:0.5:0.7>", 0.5, 0.7),
    ("<lora:x:te=0.3>", 0.3, 0.3),
    ("<lora:x:unet=0.3>", 1.0, 0.3),
    ("<lora:x:1:unet=0.5>", 1.0, 0.5),
    ("<lora:x:te=0:unet=1>", 0.0, 1.0),
    ("<lora:x:0.2:0.4:te=0.6>", 0.6, 0.4),
    ("<lora:x: 0.5 >", 0.5, 0.5),
])
def test_lora_tag_text_encoder_and_unet_multipliers(tag, te, unet):
    (found,) = prompts.extract_networks(f"a house {tag}")[1]
    assert (found.name, found.te, found.unet) == ("x", te, unet)


@pytest.mark.parametrize("tag, message", [
    ("<lora:x:1:1:4>", "dyn"), ("<lora:x:dyn=4>", "dyn"), ("<lora:x:tenc=0.5>", "unknown field 'tenc'"),
    ("<lora:x:te=high>", "must be numbers"), ("<lora:x:inf>", "finite"), ("<lora::1>", "no adapter name"),
])
def test_lora_tag_fields_sdlora_cannot_honour_are_refused_in_one_line(tag, message):
    with pytest.raises(UserError, match=message) as e:
        prompts.extract_networks(tag)
    assert "\n" not in str(e.value) and tag in str(e.value)


# Chunks ------------------------------------------------------------------------------------------


def test_short_prompts_chunk_exactly_as_the_tokenizer_pads(tokenizer):
    (chunk,) = prompts.chunk_tokens(prompts.parse_attention("a red house"), tokenizer)
    expected = tokenizer("a red house", padding="max_length", max_length=77).input_ids
    assert chunk.tokens == expected and chunk.multipliers == [1.0] * 77


def test_long_prompts_are_chunked_by_75_and_break_starts_a_chunk(tokenizer):
    words = " ".join(["house"] * 100)  # one token each
    chunks = prompts.chunk_tokens(prompts.parse_attention(words), tokenizer)
    assert [len(c.tokens) for c in chunks] == [77, 77]
    assert chunks[0].tokens[1:76].count(tokenizer.convert_tokens_to_ids("house</w>")) == 75
    assert chunks[1].tokens[1:26] == chunks[0].tokens[1:26] and chunks[1].tokens[26] == tokenizer.eos_token_id
    chunks = prompts.chunk_tokens(prompts.parse_attention("a house BREAK a tree"), tokenizer)
    assert len(chunks) == 2 and chunks[1].tokens[:3] == tokenizer("a tree").input_ids[:3]


def test_a_comma_near_the_chunk_end_moves_the_tail_to_the_next_chunk(tokenizer):
    # 70 words, a comma, then 10 words: the chunk fills at 75 with the comma 6 tokens back (<= 20).
    text = " ".join(["house"] * 70) + ", " + " ".join(["tree"] * 10)
    chunks = prompts.chunk_tokens(prompts.parse_attention(text), tokenizer)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    first = chunks[0].tokens
    assert first[71] == comma and first[72] == tokenizer.eos_token_id  # cut right after the comma
    tree = tokenizer.convert_tokens_to_ids("tree</w>")
    assert chunks[1].tokens[1:11] == [tree] * 10


def test_weights_multiply_the_hidden_states_and_restore_the_mean(tokenizer):
    """A1111's rule for (red:1.5): z' = z * w * mean(z) / mean(z * w), per chunk."""
    from transformers import CLIPTextModel

    from sdlora.models.families.base import TextConditioning

    encoder = CLIPTextModel.from_pretrained(TINY_DIR / "text_encoder").float().eval()

    def encode_ids(ids):
        with torch.no_grad():
            return TextConditioning(encoder(ids[0])[0])

    width = [encoder.config.hidden_size]
    plain = prompts.encode("a red house", [tokenizer], encode_ids, width).hidden
    weighted = prompts.encode("a (red:1.5) house", [tokenizer], encode_ids, width).hidden
    ids = tokenizer("a red house", padding="max_length", max_length=77).input_ids
    w = torch.ones(1, 77)
    w[0, ids.index(tokenizer.convert_tokens_to_ids("red</w>"))] = 1.5
    expected = plain * w[..., None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(weighted, expected)
    assert not torch.allclose(weighted, plain)
    # 100 words: two chunks of 77, each encoded on its own.
    long = prompts.encode(" ".join(["house"] * 100), [tokenizer], encode_ids, width).hidden
    assert long.shape == (1, 154, encoder.config.hidden_size)


# Prompt files ------------------------------------------------------------------------------------


def test_prompt_file_lines_and_options(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\na red house --n blurry, ugly --w 64 --h 48 --d 7 --s 2 --l 5.5 --ss euler\n"
                    "a (blue:1.2) lake\n", encoding="utf-8")
    first, second = prompts.read_prompt_file(path)
    assert (first.prompt, first.negative_prompt, first.width, first.height, first.seed, first.steps,
            first.cfg_scale, first.sampler) == ("a red house", "blurry, ugly", 64, 48, 7, 2, 5.5, "euler")
    assert second == prompts.PromptLine("a (blue:1.2) lake")
    path.write_text("a house --x 3\n")
    with pytest.raises(UserError, match=r"prompts.txt:1: unknown option --x"):
        prompts.read_prompt_file(path)


# Rendering -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_sample import make_cfg, write_adapter

    from sdlora.tiny.configs import build_pipeline

    folder = tmp_path_factory.mktemp("prompts")
    build_pipeline("mini", seed=0).save_pretrained(folder / "base")
    cfg = make_cfg(folder / "base", folder / "out", seeds=[5])
    loras = folder / "loras"
    loras.mkdir()
    write_adapter(cfg, loras / "file_stem.safetensors", name="pastel")  # found by ss_output_name
    return cfg, loras


def test_a_lora_tag_renders_as_the_same_file_given_with_lora(setup, tmp_path):
    import dataclasses

    cfg, loras = setup
    tagged = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, prompts=["a red house <lora:pastel:0.5>"]))
    by_tag = sample.run_sample(tagged, [], out_dir=tmp_path / "tag", log=lambda m: None, lora_dirs=[loras])
    plain = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, prompts=["a red house"]))
    by_flag = sample.run_sample(plain, [(loras / "file_stem.safetensors", 0.5)], out_dir=tmp_path / "flag",
                                log=lambda m: None)
    (tag_image,) = by_tag.images
    flag_image = [r for r in by_flag.images if r.scale == 1.0][0]
    base_image = [r for r in by_flag.images if r.scale == 0.0][0]
    assert np.array_equal(np.asarray(tag_image.image), np.asarray(flag_image.image))
    assert not np.array_equal(np.asarray(tag_image.image), np.asarray(base_image.image))
    info = infotext.parse_infotext(Image.open(tag_image.path).text["parameters"])
    assert info["Prompt"] == "a red house <lora:pastel:0.5>"  # as written, the tag once
    assert info["Lora hashes"].count("pastel: ") == 1 and info["RNG"] == "CPU"
    flag_info = infotext.parse_infotext(Image.open(flag_image.path).text["parameters"])
    assert flag_info["Prompt"] == "a red house <lora:pastel:0.5>" and flag_info["Lora hashes"] == info["Lora hashes"]
    with pytest.raises(UserError, match="no adapter named 'nope'"):
        sample.run_sample(dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, prompts=["<lora:nope:1>"])),
                          [], out_dir=tmp_path / "x", log=lambda m: None, lora_dirs=[loras])


def test_prompt_file_options_apply_per_row(setup, tmp_path):
    import dataclasses

    cfg, loras = setup
    path = tmp_path / "p.txt"
    path.write_text("a red house --n dark --w 48 --h 32 --d 11 --s 2 --l 4\na blue lake <lora:pastel:1>\n")
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, prompt_file=str(path)))
    result = sample.run_sample(cfg, [], out_dir=tmp_path / "out", log=lambda m: None, lora_dirs=[loras])
    first, second = result.images
    assert first.image.size == (48, 32) and second.image.size == (64, 64)
    one = infotext.parse_infotext(Image.open(first.path).text["parameters"])
    two = infotext.parse_infotext(Image.open(second.path).text["parameters"])
    assert (one["Negative prompt"], one["Seed"], one["Steps"], one["CFG scale"]) == ("dark", "11", "2", "4.0")
    assert "Lora hashes" not in one and "pastel: " in two["Lora hashes"]
    assert (two["Seed"], two["Steps"]) == ("5", "3")


def _part_of_file(source, dest, prefix):
    """A copy of an adapter file with only the modules whose keys start with `prefix`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in load_file(source).items() if k.startswith(prefix)}, str(dest), metadata)
    return dest


@pytest.mark.parametrize("fuse", [False, True], ids=["peft", "fused"])
def test_text_encoder_and_unet_multipliers_reach_their_own_part(setup, tmp_path, fuse):
    """<lora:x:te=0:unet=1> renders as the file's U-Net modules alone, <lora:x:1:0> as its text
    encoder modules alone (copies of the file holding one part, given with --lora at 1)."""
    import dataclasses

    cfg, loras = setup
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, fuse=fuse))
    source = loras / "file_stem.safetensors"

    def tagged(tag):
        c = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, prompts=[f"a red house {tag}"]))
        (image,) = sample.run_sample(c, [], out_dir=tmp_path / tag[7:-1].replace(":", "_"), log=lambda m: None,
                                     lora_dirs=[loras]).images
        return np.asarray(image.image)

    def with_file(path):
        c = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, prompts=["a red house"]))
        result = sample.run_sample(c, [(path, 1.0)], out_dir=tmp_path / path.stem, log=lambda m: None)
        return np.asarray(next(r for r in result.images if r.scale == 1.0).image)

    unet_only = with_file(_part_of_file(source, tmp_path / "unet_only.safetensors", "lora_unet_"))
    te_only = with_file(_part_of_file(source, tmp_path / "te_only.safetensors", "lora_te_"))
    assert np.array_equal(tagged("<lora:pastel:te=0:unet=1>"), unet_only)
    assert np.array_equal(tagged("<lora:pastel:1:0>"), te_only)
    both = tagged("<lora:pastel:1>")
    assert not np.array_equal(both, unet_only) and not np.array_equal(both, te_only)


def test_prompt_editing_switches_the_unets_conditioning_at_a1111s_steps(setup):
    """[red:blue:1] over 4 steps: red for steps 0 and 1, blue for 2 and 3 (A1111 switches after
    the step `when`); with hires, [red:blue:1.5] is red for the whole first pass and half of the
    hires pass's 4 steps plus one (1.5 - 1 = half, then the same inclusive end)."""
    import dataclasses

    cfg, _ = setup
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, hires_steps=4))
    sampler = sample.Sampler(cfg)
    seen = []
    hook = sampler.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    negative = cfg.sample.negative_prompt

    def batch(text):  # what the pipelines give the U-Net under guidance: [negative, positive]
        e = sampler.embeds([text], [negative])
        return torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]])

    red, blue = batch("a red house"), batch("a blue house")
    try:
        sampler.render(["a [red:blue:1] house"], [5], 64, 64, 4)
        assert len(seen) == 4
        for got, expected in zip(seen, [red, red, blue, blue]):
            torch.testing.assert_close(got, expected.to(got))
        seen.clear()
        sampler.render(["a [red:blue:1.5] house"], [5], 96, 64, 4, hires="on")
        assert len(seen) == 8  # 4 first-pass steps, 4 hires steps
        for got, expected in zip(seen, [red] * 4 + [red, red, red, blue]):
            torch.testing.assert_close(got, expected.to(got))
        seen.clear()  # the tiled pass: the same hires timeline, each U-Net call a batch of tiles
        sampler.render(["a [red:blue:1.5] house"], [5], 96, 64, 4, hires="tiled")
        assert len(seen) == 8
        for got, expected in zip(seen, [red] * 4 + [red, red, red, blue]):
            torch.testing.assert_close(got, expected.repeat_interleave(got.shape[0] // 2, dim=0).to(got))
    finally:
        hook.remove()
    with pytest.raises(UserError, match="AND"):
        sampler.render(["a red house AND a blue lake"], [5], 64, 64, 2)


def test_sdxl_prompt_editing_switches_hidden_states_and_pooled_embeddings(mini_sdxl_dir, tmp_path):
    from test_sample import make_cfg

    sampler = sample.Sampler(make_cfg(mini_sdxl_dir, tmp_path / "out"))
    seen = []
    hook = sampler.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["encoder_hidden_states"].clone(),
                                                  kwargs["added_cond_kwargs"]["text_embeds"].clone())),
        with_kwargs=True)

    def batch(text):
        e = sampler.embeds([text], [sampler.cfg.sample.negative_prompt])
        return (torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]]),
                torch.cat([e["negative_pooled_prompt_embeds"], e["pooled_prompt_embeds"]]))

    red, blue = batch("a red house"), batch("a blue house")
    try:
        sampler.render(["a [red|blue] house"], [5], 64, 64, 3)  # alternation: step 0, 1 -> red, 2 -> blue
    finally:
        hook.remove()
    assert len(seen) == 3
    for (hidden, pooled), (want_hidden, want_pooled) in zip(seen, [red, red, blue]):
        torch.testing.assert_close(hidden, want_hidden.to(hidden))
        torch.testing.assert_close(pooled, want_pooled.to(pooled))


def test_training_refuses_sample_prompts_its_previews_cannot_render_before_it_starts(tmp_path):
    from sdlora.config import config_from_dict
    from sdlora.training.loop import Trainer

    cfg = config_from_dict({"name": "style", "output": {"dir": str(tmp_path / "out")},
                            "sample": {"prompts": ["a house", "a cat AND a dog"], "every_n_epochs": 1}})
    with pytest.raises(UserError, match=r"\[sample\] prompts: prompt 'a cat AND a dog': AND"):
        Trainer(cfg)
    assert not (tmp_path / "out").exists()


def test_run_refuses_prompts_sampling_cannot_render_before_the_dataset_and_the_training(tmp_path):
    """`sdlora run` samples last: an AND (or a bad <lora:> tag) in [sample] prompts or in a prompt file is
    refused before stage 1, not after a whole training."""
    from sdlora import run
    from sdlora.config import config_from_dict

    logs = []
    cfg = config_from_dict({"name": "style", "output": {"dir": str(tmp_path / "out")},
                            "sample": {"prompts": ["a house", "a cat AND a dog"]}})
    with pytest.raises(UserError, match=r"\[sample\] prompts: prompt 'a cat AND a dog': AND"):
        run.run(cfg, log=logs.append)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a house --n blurry\n# a comment\na lake --n <lora:x:te=oops>\n")
    cfg = config_from_dict({"name": "style", "output": {"dir": str(tmp_path / "out")},
                            "sample": {"prompt_file": str(prompt_file)}})
    with pytest.raises(UserError, match=r"prompts\.txt: prompt 2: .*te=oops"):
        run.run(cfg, log=logs.append)
    assert logs == [] and not (tmp_path / "out").exists()
