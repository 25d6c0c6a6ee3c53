"""`sdlora dataset`: validation, captions, duplicates, re-runs and the tiny tagger on the demo set."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import make_bad_images, make_good_images

from sdlora import cli
from sdlora.config import load_config
from sdlora.data import caption, dataset
from sdlora.data.tags import parse_caption

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "datasets_cfg" / "colorful_scenery"
STYLE_TAGS = ["pastel colors", "colorful", "vibrant colors", "saturated"]


@pytest.fixture(autouse=True)
def only_dataset_command(monkeypatch):
    # The real CLI entry point with only this stage registered (other stages land separately).
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["dataset"])


def write_config(tmp_path, image_dir, **dataset_keys):
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in dataset_keys.items())
    cfg = tmp_path / "style.toml"
    cfg.write_text(f"""
trigger = "clrscn"
[dataset]
image_dir = "{image_dir}"
{extra}
[caption]
blacklist = ["landscape", "scenery", "outdoors"]
style_tags = {json.dumps(STYLE_TAGS)}
[output]
dir = "out"
""")
    return cfg


def demo_copy(folder, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(DEMO.glob("*.png")):
        if names is None or p.name in names:
            shutil.copy2(p, folder / p.name)
    return folder


def report_of(tmp_path):
    return json.loads((tmp_path / "out" / "dataset_report.json").read_text())


def captions_state(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.glob("*.txt"))}


def test_mixed_folder_good_images_captioned_bad_ones_listed_with_reasons(tmp_path):
    images = tmp_path / "images"
    good = make_good_images(images)
    demo_copy(images, {"scene_00.png", "scene_02.png"})
    bad = make_bad_images(images)
    cfg = write_config(tmp_path, "images", min_side=16)
    assert cli.main(["dataset", str(cfg), "--keep-duplicates"]) == 0
    report = report_of(tmp_path)
    rejected = {r["file"]: r["reason"] for r in report["rejected"]}
    assert set(rejected) == set(bad)
    for name, word in bad.items():
        assert word in rejected[name], (name, rejected[name])
        assert not (images / name).with_suffix(".txt").exists()  # no caption for a rejected file
    for name in [*good, "scene_00.png", "scene_02.png"]:
        text = (images / name).with_suffix(".txt").read_text()
        assert parse_caption(text)[0] == "clrscn", (name, text)
    md = (tmp_path / "out" / "dataset_report.md").read_text()
    assert "truncated.jpg" in md and "decompression bomb" in md
    # one cell (thumbnail and caption) per accepted image, five to a row; no cell for a rejected file
    sheet = Image.open(tmp_path / "out" / "dataset_contact_sheet.png").convert("RGB")
    kept = report["counts"]["valid"]
    assert kept == len(good) + 2
    rows = -(-kept // 5)
    cell_h = sheet.height // rows
    assert sheet.size == (5 * dataset.SHEET_CELL, rows * cell_h) and cell_h > dataset.SHEET_CELL
    white = ((255, 255), (255, 255), (255, 255))
    drawn = sum(sheet.crop(((i % 5) * dataset.SHEET_CELL, (i // 5) * cell_h, (i % 5 + 1) * dataset.SHEET_CELL,
                            (i // 5) * cell_h + dataset.SHEET_CELL)).getextrema() != white for i in range(kept))
    from sdlora.data.images import load_image

    blank = sum(load_image(images / r["file"], 40_000_000, 16, "#ffffff").getextrema() == white
                for r in report["kept"])  # e.g. a fully transparent image on the white background
    assert drawn == kept - blank  # every other cell shows its thumbnail


def test_all_bad_folder_fails_with_a_clear_message(tmp_path, capsys):
    make_bad_images(tmp_path / "images")
    cfg = write_config(tmp_path, "images")
    assert cli.main(["dataset", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no usable image" in err and "images" in err and "Traceback" not in err


def test_rerun_changes_nothing_and_encodes_nothing_then_retag_backs_up(tmp_path):
    images = demo_copy(tmp_path / "images", {"scene_00.png", "scene_01.png", "scene_02.png"})
    cfg = write_config(tmp_path, "images")
    assert cli.main(["dataset", str(cfg)]) == 0
    first = captions_state(images)
    assert len(first) == 3
    again = dataset.build_dataset(load_config(cfg), log=lambda m: None)
    assert captions_state(images) == first
    assert again.images_encoded == 0

    # A user's own caption is kept as written unless --retag; with it, the old one is backed up.
    (images / "scene_01.txt").write_text("my own words, clrscn\n")
    assert cli.main(["dataset", str(cfg)]) == 0
    assert (images / "scene_01.txt").read_text() == "my own words, clrscn\n"
    assert cli.main(["dataset", str(cfg), "--retag"]) == 0
    assert [p.read_text() for p in images.glob("*.bak-*")] == ["my own words, clrscn\n"]
    assert (images / "scene_01.txt").read_bytes() == first["scene_01.txt"][0]
    assert captions_state(images)["scene_00.txt"] == first["scene_00.txt"]  # same text: not rewritten

    # A new threshold re-scores the cached embeddings: fewer tags, no image encoded.
    rescored = dataset.build_dataset(load_config(cfg, ["caption.threshold=0.9"]), retag=True, log=lambda m: None)
    assert rescored.images_encoded == 0
    after = {p.name: p.read_text() for p in images.glob("*.txt")}
    assert all(parse_caption(t)[0] == "clrscn" for t in after.values())
    assert sum(len(parse_caption(t)) for t in after.values()) < sum(len(parse_caption(b.decode())) for b, _ in first.values())


def test_near_duplicates_grouped_and_excluded_unless_kept(tmp_path):
    images = demo_copy(tmp_path / "images", {"scene_00.png", "scene_01.png"})
    copy = Image.open(images / "scene_00.png").convert("RGB").resize((200, 200))
    copy.save(images / "scene_00_copy.jpg", quality=80)
    cfg = write_config(tmp_path, "images")
    assert cli.main(["dataset", str(cfg)]) == 0
    report = report_of(tmp_path)
    assert report["duplicate_groups"] == [["scene_00.png", "scene_00_copy.jpg"]]
    assert [e["file"] for e in report["excluded"]] == ["scene_00_copy.jpg"]
    assert not (images / "scene_00_copy.txt").exists()
    assert trained_images(cfg) == {"scene_00.png", "scene_01.png"}  # the trainer leaves the copy out

    assert cli.main(["dataset", str(cfg), "--keep-duplicates"]) == 0
    assert report_of(tmp_path)["excluded"] == []
    assert trained_images(cfg) == {"scene_00.png", "scene_01.png", "scene_00_copy.jpg"}


def trained_images(cfg) -> set[str]:
    from sdlora.training.examples import collect_examples

    return {ex.image.name for ex in collect_examples(load_config(cfg), log=lambda m: None)}


def test_read_only_image_folder_gets_captions_in_the_output_folder(tmp_path, monkeypatch):
    from sdlora.training.examples import collect_examples

    images = tmp_path / "images"
    demo_copy(images / "a", {"scene_03.png"})
    (images / "b").mkdir()
    shutil.copy(DEMO / "scene_04.png", images / "b" / "scene_03.png")
    (images / "a" / "scene_03.txt").write_text("clrscn, hand written\n")  # a sidecar the user wrote earlier
    monkeypatch.setattr(dataset, "_folder_writable", lambda folder: False)
    cfg = write_config(tmp_path, "images")
    assert cli.main(["dataset", str(cfg)]) == 0
    built = tmp_path / "out" / "captions"
    # Same file name in two subfolders: two captions, mirrored under OUTPUT/captions.
    assert not (built / "a" / "scene_03.txt").exists()  # the sidecar is kept, not re-tagged
    assert parse_caption((built / "b" / "scene_03.txt").read_text())[0] == "clrscn"
    assert not (images / "b" / "scene_03.txt").exists()

    # --retag cannot touch the read-only folder: the new caption goes to OUTPUT/captions and is
    # the one the trainer reads, not the older sidecar.
    assert cli.main(["dataset", str(cfg), "--retag"]) == 0
    assert (images / "a" / "scene_03.txt").read_text() == "clrscn, hand written\n"
    retagged = parse_caption((built / "a" / "scene_03.txt").read_text())
    assert retagged[0] == "clrscn" and "hand written" not in retagged
    examples = {e.image.relative_to(images).as_posix(): e for e in collect_examples(load_config(cfg), log=lambda *a: None)}
    assert examples["a/scene_03.png"].tags == retagged and examples["a/scene_03.png"].caption_source == "builder"
    assert examples["b/scene_03.png"].tags == parse_caption((built / "b" / "scene_03.txt").read_text())


def test_reading_the_manifest_writes_nothing_into_the_image_folders(tmp_path, monkeypatch):
    """A read is a read: no probe file in a read-only or watched image folder, no writability check."""
    import os

    images = demo_copy(tmp_path / "images", {"scene_00.png", "scene_01.png"})
    cfg = write_config(tmp_path, "images")
    assert cli.main(["dataset", str(cfg), "--set", "caption.tagger='none'"]) == 0
    config = load_config(cfg, ["caption.tagger='none'"])
    before = sorted(os.listdir(images))

    def probe(folder):
        raise AssertionError(f"{folder} probed for writability on a read")

    monkeypatch.setattr(dataset, "_folder_writable", probe)
    manifest = dataset.read_manifest(config)
    assert manifest is not None and len(manifest.images) == 2
    assert dataset.current_manifest(config, log=lambda m: None) == manifest  # current: read, not rebuilt
    assert sorted(os.listdir(images)) == before


def test_demo_set_captions_with_the_embedded_tagger(tmp_path):
    """Acceptance: trigger first, no style tag, no duplicate, time of day right for >= 80%."""
    images = demo_copy(tmp_path / "images")
    truth = json.loads((DEMO / ".ground_truth.json").read_text())
    report = dataset.build_dataset(load_config(write_config(tmp_path, "images")), log=lambda *a: None)
    assert len(report.kept) == 25 and not report.rejected and not report.excluded
    assert "dusk" in report.unknown_tags and "sunset" not in report.unknown_tags
    times = {"day", "sunset", "night", "overcast"}
    agree = 0
    for name, gt in truth.items():
        tags = parse_caption((images / name).with_suffix(".txt").read_text())
        assert tags[0] == "clrscn"
        assert not set(tags) & set(STYLE_TAGS)
        assert len(tags) == len({t.lower() for t in tags})
        # The tiny tagger scores tags it was never trained on arbitrarily: they must not appear.
        assert not set(tags) & set(report.unknown_tags), tags
        agree += (set(tags) & times) == {gt["time"]}
    assert agree / len(truth) >= 0.8, f"time of day right for {agree}/{len(truth)}"


def test_clip_models_without_logit_bias_get_a_calibrated_two_way_score():
    import torch

    tagger = caption.tiny_tagger(device="cpu")
    model, tokenizer, _ = tagger._load()
    model.logit_bias = None  # now scored like a softmax-trained CLIP
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    emb = tagger.embed_images(images)
    scores = tagger.score(emb, ["sunset", "lake"])
    with torch.no_grad():
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(["a photo of sunset", "a photo of lake", "a photo"])), dim=-1)
        cos = torch.from_numpy(emb) @ txt.T
        expected = torch.sigmoid(model.logit_scale.exp() * (cos[:, :2] - cos[:, 2:]))
    assert np.allclose(scores, expected.numpy(), atol=1e-5)
    assert caption.select_tags(np.array([0.2, 0.9, 0.6]), ["a", "b", "c"], 0.5, 1) == [("b", 0.9)]


def test_tagger_config_mistakes_are_user_errors(tmp_path):
    from sdlora.config import config_from_dict
    from sdlora.errors import UserError

    def cfg(**caption_keys):
        return config_from_dict({"caption": caption_keys}).caption
    with pytest.raises(UserError, match="not an open_clip architecture"):
        caption.load_tagger(cfg(model="ViT-Nope"))
    with pytest.raises(UserError, match="needs \\[caption\\] pretrained"):
        caption.load_tagger(cfg(model="ViT-B-32"))
    with pytest.raises(UserError, match="file not found"):
        caption.load_tagger(cfg(model="ViT-B-32", pretrained=str(tmp_path / "missing.safetensors")))
    with pytest.raises(UserError, match="vocabulary"):
        caption.read_vocabulary(tmp_path / "none.txt")


def test_packaged_vocabulary_works_anywhere_and_vocabulary_mistakes_cost_no_encoding(tmp_path, capsys, monkeypatch):
    demo_copy(tmp_path / "images", {"scene_00.png", "scene_01.png"})
    cfg = write_config(tmp_path, "images")  # no [caption] vocabulary: the packaged one, wherever the config is
    assert "vocabulary" not in cfg.read_text()
    assert cli.main(["dataset", str(cfg)]) == 0
    assert all(r["caption"].startswith("clrscn, ") for r in report_of(tmp_path)["kept"])

    (tmp_path / "unknown.txt").write_text("spaceship\nrobot arm\n")
    taggers, load_tagger = [], caption.load_tagger
    monkeypatch.setattr(caption, "load_tagger", lambda *a, **k: taggers.append(load_tagger(*a, **k)) or taggers[-1])
    for vocabulary, message in (("missing.txt", "tag vocabulary not found"),
                                ("unknown.txt", "none of its tags is known to the tiny tagger")):
        demo_copy(tmp_path / "more", {"scene_02.png"})
        code = cli.main(["dataset", str(cfg), "--retag", "--set", f"caption.vocabulary='{tmp_path / vocabulary}'",
                         "--set", f"dataset.image_dir='{tmp_path / 'more'}'"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
        assert sum(t.images_encoded for t in taggers) == 0  # refused before the tagger encoded any image
