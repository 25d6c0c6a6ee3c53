"""A kohya user's dataset: repeat folders, a reg folder, .caption files, subsets, the manifest."""

import json
from pathlib import Path

import pytest

from sdlora.cli import main
from sdlora.config import ConfigError, load_config
from sdlora.data import dataset, images
from sdlora.data.subsets import balanced_repeats, repeat_folder
from sdlora.tiny.scenery import make_scene_image
from sdlora.training.examples import collect_examples, steps_per_epoch
from sdlora.training.loop import Trainer, train


def kohya_tree(root: Path) -> dict[str, list[Path]]:
    """kohya_ss's project layout: img/5_clrscn (2 square + 1 3:2), img/2_extra style (2 square),
    reg/1_scenery (4 square, no captions); `.caption` files lacking the trigger in 2_extra style."""
    folders = {"img/5_clrscn": ["1:1", "1:1", "3:2"], "img/2_extra style": ["1:1", "1:1"],
               "reg/1_scenery": ["1:1"] * 4}
    made, seed = {}, 0
    for name, aspects in folders.items():
        folder = root / name
        folder.mkdir(parents=True)
        made[name] = []
        for aspect in aspects:
            img, tags = make_scene_image(seed, "colorful" if name.startswith("img") else "muted", 64, aspect=aspect)
            path = folder / f"s{seed}.png"
            img.save(path)
            made[name].append(path)
            seed += 1
    (root / "img/5_clrscn/s0.caption").write_text("clrscn, lake, hills")
    (root / "img/2_extra style/s3.caption").write_text("sea, night")
    (root / "img/2_extra style/s4.caption").write_text("forest, day")
    return made


def write_config(tmp_path: Path, base: Path, extra: str = "", dataset_keys: str = 'image_dir = "project"') -> Path:
    path = tmp_path / "style.toml"
    path.write_text(f"""
name = "style"
trigger = "clrscn"
[model]
base = "{base}"
[dataset]
caption_extension = ".caption"
resolution = 96
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
shuffle_caption = false
{dataset_keys}
[caption]
tagger = "none"
[network]
dim = 2
alpha = 1
train_text_encoder = false
[train]
epochs = 1
batch_size = 2
save_every_n_epochs = 0
lr_scheduler = "constant"
prior_loss_weight = 0.5
{extra}
[output]
dir = "out"
""")
    return path


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def test_repeat_folder_names_are_read_as_kohya_reads_them():
    assert repeat_folder("5_clrscn") == (5, "clrscn")
    assert repeat_folder("10_extra_style words") == (10, "extra_style words")  # split on the first "_"
    assert repeat_folder("0_x") is None and repeat_folder("five_x") is None and repeat_folder("5") is None


def test_reg_images_repeat_to_match_the_training_images():
    # 19 training images with repeats; 4 reg images registered once, then one more each per round.
    assert balanced_repeats([3, 2, 4], [5, 2, 1], [False, False, True]) == [[5] * 3, [2] * 2, [5, 5, 5, 4]]
    # More reg images than training images: the first ones only ("some of reg images are not used").
    assert balanced_repeats([1, 5], [3, 1], [False, True]) == [[3], [1, 1, 1, 0, 0]]


def test_kohya_tree_trains_kohyas_steps_reg_untouched_and_without_trigger(tmp_path, mini_base_dir):
    made = kohya_tree(tmp_path / "project")
    reg = tmp_path / "project" / "reg"
    before = snapshot(reg)
    cfg = load_config(write_config(tmp_path, mini_base_dir, dataset_keys='image_dir = "project"'))
    messages = []
    examples = collect_examples(cfg, log=messages.append)
    log = "\n".join(messages)
    assert "kohya folder tree" in log and "img/5_clrscn -> subset x5 repeats, class tokens 'clrscn'" in log
    assert "reg/1_scenery -> regularisation subset x1 repeats, class tokens 'scenery'" in log
    assert "2 caption(s) lack the trigger 'clrscn'" in log

    by_path = {ex.image: ex for ex in examples}
    assert all(not ex.subset.is_reg for p in made["img/5_clrscn"] + made["img/2_extra style"]
               for ex in [by_path[p]])
    # Regularisation images: their class tokens, never the trigger; balanced repeats.
    assert [by_path[p].tags for p in made["reg/1_scenery"]] == [["scenery"]] * 4
    assert [by_path[p].repeats for p in made["reg/1_scenery"]] == [5, 5, 5, 4]
    # Training captions: the .caption file, the trigger put first where missing; class tokens otherwise.
    assert by_path[made["img/2_extra style"][0]].tags == ["clrscn", "sea", "night"]
    assert by_path[made["img/5_clrscn"][0]].tags == ["clrscn", "lake", "hills"]
    assert by_path[made["img/5_clrscn"][1]].tags == ["clrscn"]  # no caption file: class tokens
    # kohya: each bucket holds images x repeats (reg included), ceil(n / batch) batches each.
    # square bucket: 2x5 + 2x2 + 19 reg = 33 -> 17; 3:2 bucket: 1x5 -> 3.
    assert steps_per_epoch(examples, 2) == 17 + 3

    result = train(cfg, log=lambda m: None)
    assert result.steps == 20
    assert snapshot(reg) == before  # nothing written into the reg folder
    from sdlora.adapters.file import read_adapter

    meta = read_adapter(result.adapter)[1]
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_clrscn": {"n_repeats": 5, "img_count": 3},
                                                   "2_extra style": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_scenery": {"n_repeats": 1, "img_count": 4}}
    assert meta["ss_num_train_images"] == "19" and meta["ss_num_reg_images"] == "4"
    assert set(json.loads(meta["ss_tag_frequency"])) == {"5_clrscn", "2_extra style", "1_scenery"}
    assert json.loads(meta["ss_tag_frequency"])["1_scenery"] == {"scenery": 4}
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sorted((b["resolution"], b["count"]) for b in buckets.values()) == [([96, 96], 33), ([128, 64], 5)]
    assert meta["ss_total_batch_size"] == "2" and meta["ss_lr_warmup_steps"] == "1"  # 5% of 20 steps
    assert meta["sshs_legacy_hash"] == "e3b0c442"  # kohya's legacy hash of a file under 1 MiB: sha256 of b""


def test_tagging_a_kohya_tree_leaves_reg_images_alone(tmp_path, mini_base_dir):
    kohya_tree(tmp_path / "project")
    reg = tmp_path / "project" / "reg"
    before = snapshot(reg)
    path = write_config(tmp_path, mini_base_dir)
    assert main(["dataset", str(path), "--set", "caption.tagger=\"open_clip\""]) == 0
    assert snapshot(reg) == before
    manifest = json.loads((tmp_path / "out" / dataset.MANIFEST).read_text())
    reg_captions = [e["caption"] for e in manifest["images"] if manifest["subsets"][e["subset"]]["is_reg"]]
    assert reg_captions == ["scenery"] * 4
    tagged = (tmp_path / "project" / "img" / "5_clrscn" / "s1.caption").read_text()
    assert tagged.startswith("clrscn")  # training images without a caption were tagged, trigger first


def test_subset_tables_and_their_mistakes(tmp_path, mini_base_dir):
    made = kohya_tree(tmp_path / "project")
    keys = '''[[dataset.subsets]]
image_dir = "project/img/5_clrscn"
num_repeats = 3
[[dataset.subsets]]
image_dir = "project/reg/1_scenery"
is_reg = true
num_repeats = 1
class_tokens = "scenery"
keep_tokens = 0
'''
    cfg = load_config(write_config(tmp_path, mini_base_dir, dataset_keys=keys))
    examples = collect_examples(cfg, log=lambda m: None)
    assert sorted(ex.image for ex in examples) == sorted(made["img/5_clrscn"] + made["reg/1_scenery"])
    assert {ex.subset.name: ex.subset.caption_extension for ex in examples} == {
        "5_clrscn": ".caption", "1_scenery": ".caption"}  # inherited from [dataset]
    assert [ex.repeats for ex in examples if ex.subset.is_reg] == [3, 2, 2, 2]  # matches 3 images x 3
    with pytest.raises(ConfigError, match=r"subsets\[0\].*image_dir is missing"):
        load_config(write_config(tmp_path, mini_base_dir, dataset_keys="[[dataset.subsets]]\nnum_repeats = 2\n"))
    with pytest.raises(ConfigError, match="did you mean 'class_tokens'"):
        load_config(write_config(tmp_path, mini_base_dir,
                                 dataset_keys='[[dataset.subsets]]\nimage_dir = "x"\nclass_token = "a"\n'))


def test_one_run_decodes_each_image_once(tmp_path, mini_base_dir, monkeypatch):
    """The manifest is the hand-off: after the dataset stage, nothing decodes an image again
    except the VAE latent cache on a miss (old main decoded each one five times with the tagger)."""
    from types import SimpleNamespace

    from sdlora import run
    from sdlora.sampling import sampler

    made = kohya_tree(tmp_path / "project")
    path = write_config(tmp_path, mini_base_dir, extra="", dataset_keys='image_dir = "project"')
    path.write_text(path.read_text().replace('tagger = "none"', 'tagger = "open_clip"'))
    # Sampling renders prompts; it reads no dataset image (the style figures need scale-0 renders).
    monkeypatch.setattr(sampler, "run_sample", lambda *a, **k: SimpleNamespace(images=[], folder=tmp_path))
    monkeypatch.setattr(sampler, "sample_prompts", lambda cfg: [])  # this config has none; sampling is stubbed
    decodes: dict[Path, int] = {}
    real = images.load_image

    def counting(p, *a, **k):
        decodes[Path(p)] = decodes.get(Path(p), 0) + 1
        return real(p, *a, **k)

    monkeypatch.setattr(images, "load_image", counting)
    monkeypatch.setattr(dataset, "load_image", counting)
    first = run.run(load_config(path), log=lambda m: None)
    everything = [p for paths in made.values() for p in paths]
    assert first["train"].vae_encodes == len(everything)
    assert decodes == {p: 2 for p in everything}  # the dataset stage + the VAE encode
    decodes.clear()
    run.run(load_config(path), log=lambda m: None)  # up to date: nothing retrained or re-encoded
    assert decodes == {p: 1 for p in everything}


def kohya_dataset_toml(tmp_path: Path) -> Path:
    path = tmp_path / "kohya_dataset.toml"
    path.write_text(f"""
[general]
caption_extension = ".caption"
shuffle_caption = false
keep_tokens = 1

[[datasets]]
resolution = 96
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'project/img/5_clrscn'}"
  class_tokens = "clrscn"
  num_repeats = 5

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'project/img/2_extra style'}"
  class_tokens = "extra style"
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'project/reg/1_scenery'}"
  class_tokens = "scenery"
  is_reg = true
  num_repeats = 1
""")
    return path


def test_import_kohya_trains_the_same_examples(tmp_path, mini_base_dir, capsys):
    kohya_tree(tmp_path / "project")
    dataset_toml = kohya_dataset_toml(tmp_path)
    command = (f"accelerate launch --num_cpu_threads_per_process 1 train_network.py "
               f"--pretrained_model_name_or_path={mini_base_dir} --network_module networks.lora --network_dim 2 "
               f"--network_alpha=1 --network_args conv_dim=4 conv_alpha=2 --max_train_epochs 1 --optimizer_type AdamW "
               f"--prior_loss_weight 0.5 --output_dir {tmp_path / 'imported_out'} --logging_dir logs --color_aug")
    out = tmp_path / "imported.toml"
    assert main(["import-kohya", str(dataset_toml), command, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "mapped: --network_dim 2 -> network.dim = 2" in err
    assert 'mapped: --network_module networks.lora -> network.type = "locon"' in err  # conv_dim given
    assert 'mapped: --max_train_epochs 1 -> train.epochs = 1' in err
    assert "not mapped: --color_aug = True: no sdlora equivalent" in err
    assert "not mapped: --logging_dir: not needed" in err
    imported = load_config(out, ["caption.tagger='none'"])
    assert (imported.network.type, imported.network.conv_dim, imported.network.alpha) == ("locon", 4, 1.0)
    assert (imported.train.epochs, imported.train.batch_size, imported.train.prior_loss_weight) == (1, 2, 0.5)

    by_hand = load_config(write_config(tmp_path, mini_base_dir, dataset_keys='image_dir = "project"'))

    def trained(cfg):
        return sorted((ex.image, ex.repeats, ex.subset.is_reg, str(ex.bucket))
                      for ex in collect_examples(cfg, log=lambda m: None))

    assert trained(imported) == trained(by_hand)
    assert main(["import-kohya", str(dataset_toml), "-o", str(out)]) == 2  # never replaces a file unasked
    assert "already exists; choose another output name, or pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("[network]\nnetwork_alpha = 8\n", "did you mean 'alpha' (kohya's network_alpha)?"),
    ("[train]\nmax_train_epochs = 3\n", "did you mean 'epochs' (kohya's max_train_epochs)?"),
    ("[sample]\nsample_every_n_epochs = 2\n", "did you mean 'every_n_epochs'"),
    ("[dataset]\nclass_tokens = \"a\"\n", "kohya's class_tokens is [[dataset.subsets]] class_tokens here"),
    ("[train]\nnetwork_dim = 8\n", "kohya's network_dim is [network] dim here"),
    ("[general]\nshuffle_caption = true\n[[datasets]]\nresolution = 512\n",
     "kohya-ss dataset config file (general, datasets), not an sdlora config; convert it with `sdlora import-kohya"),
    ("pretrained_model_name_or_path = \"x\"\nnetwork_dim = 4\n", "kohya-ss training arguments file"),
])
def test_kohya_names_point_to_sdlora_keys(tmp_path, text, expected):
    path = tmp_path / "k.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert expected in str(e.value)


def test_validation_loss_is_logged_per_epoch_with_fixed_noise(tmp_path, mini_base_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kohya_tree(tmp_path / "project")
    path = write_config(tmp_path, mini_base_dir, extra="epochs = 2\n", dataset_keys='image_dir = "project"\n'
                        'validation_split = 0.5')
    path.write_text(path.read_text().replace("epochs = 1\n", ""))
    cfg = load_config(path)
    messages = []
    trainer = Trainer(cfg, log=messages.append)
    # One of each training subset's images (ceil(3 x 0.5) = 2 and ceil(2 x 0.5) = 1 train), no reg image.
    assert len(trainer.data.validation) == 2 and {ex.subset.name for ex in trainer.data.validation} == {"5_clrscn", "2_extra style"}
    assert not set(ex.image for ex in trainer.data.validation) & set(ex.image for ex in trainer.data.examples)
    # reg images balance against the 3 training images x repeats left: 2 x 5 + 1 x 2 = 12
    assert sum(ex.repeats for ex in trainer.data.examples if ex.subset.is_reg) == 12
    trainer.validate(0, 0)
    trainer.validate(0, 0)
    first, again = trainer.validation_losses
    assert first == again  # fixed noise and timesteps: only the adapter changes the figure
    messages.clear()
    cfg.train.overwrite = True
    result = Trainer(cfg, log=messages.append).run()
    assert [m.split(":")[0] for m in messages if "validation loss" in m] == ["epoch 1", "epoch 2"]
    report = result.report.read_text()
    assert "validation loss per epoch (2 held-out images" in report and "1: " in report and "2: " in report
    logs = sorted((cfg.output_dir / "logs").rglob("events.out.tfevents.*"))
    scalars = [EventAccumulator(str(f)).Reload().Scalars("loss/validation") for f in logs
               if "loss/validation" in EventAccumulator(str(f)).Reload().Tags()["scalars"]]
    assert [len(s) for s in scalars][-1] == 2


def test_manifest_is_rebuilt_when_captions_or_images_change_and_read_otherwise(tmp_path, mini_base_dir, monkeypatch):
    made = kohya_tree(tmp_path / "project")
    cfg = load_config(write_config(tmp_path, mini_base_dir))
    messages = []
    collect_examples(cfg, log=messages.append)
    assert any("missing or out of date" in m for m in messages)

    decodes = []
    monkeypatch.setattr(dataset, "load_image", lambda *a, **k: decodes.append(a[0]) or images.load_image(*a, **k))
    messages.clear()
    examples = collect_examples(cfg, log=messages.append)
    assert decodes == [] and not any("out of date" in m for m in messages)  # read, not rebuilt

    (made["img/2_extra style"][0]).with_suffix(".caption").write_text("clrscn, edited by hand")
    img, _ = make_scene_image(99, "colorful", 64)
    img.save(tmp_path / "project" / "img" / "5_clrscn" / "new.png")
    examples = {ex.image.name: ex for ex in collect_examples(cfg, log=messages.append)}
    assert any("out of date" in m for m in messages)
    assert examples["s3.png"].tags == ["clrscn", "edited by hand"] and "new.png" in examples


def test_import_kohya_reads_a_gui_json(tmp_path, capsys):
    source = tmp_path / "kohya_ss.json"
    source.write_text(json.dumps({"LoRA_type": "LyCORIS/LoHa", "network_dim": 8, "network_alpha": 4,
                                  "epoch": 3, "max_resolution": "768,768", "optimizer": "Prodigy",
                                  "optimizer_args": "d_coef=2 betas=0.9,0.99", "lr_warmup_steps": 10,
                                  "train_data_dir": str(tmp_path / "img"), "wandb_api_key": ""}))
    assert main(["import-kohya", str(source)]) == 0
    out = capsys.readouterr()
    (tmp_path / "x.toml").write_text(out.out)
    cfg = load_config(tmp_path / "x.toml")
    assert (cfg.network.type, cfg.network.dim, cfg.train.epochs, cfg.dataset.resolution) == ("loha", 8, 3, 768)
    assert (cfg.train.optimizer, cfg.train.optimizer_args) == ("prodigy", {"d_coef": 2, "betas": [0.9, 0.99]})
    assert cfg.train.lr_warmup_steps == 10 and cfg.dataset.image_dir == str(tmp_path / "img")
    assert "not mapped: off or unset in the source, nothing lost: --wandb_api_key" in out.err  # "" in the GUI


@pytest.mark.parametrize("source", [
    'train_network.py --network_module lycoris.kohya --network_dim 8 --network_args "algo=lokr" "factor=4"',
    '{"LoRA_type": "LyCORIS/LoKr", "network_dim": 8}',
], ids=["command line", "kohya_ss GUI json"])
def test_import_kohya_maps_lokr(tmp_path, capsys, source):
    """kohya/LyCORIS users write network_module lycoris.kohya with algo=lokr; the kohya_ss GUI says LyCORIS/LoKr."""
    if source.startswith("{"):
        (tmp_path / "gui.json").write_text(source)
        source = str(tmp_path / "gui.json")
    assert main(["import-kohya", source]) == 0
    out = capsys.readouterr()
    (tmp_path / "x.toml").write_text(out.out)
    cfg = load_config(tmp_path / "x.toml")
    assert (cfg.network.type, cfg.network.dim) == ("lokr", 8)
    assert 'network.type = "lokr"' in out.err


def test_a_validation_subset_is_held_out_whole(tmp_path, mini_base_dir):
    made = kohya_tree(tmp_path / "project")
    keys = '''[[dataset.subsets]]
image_dir = "project/img/5_clrscn"
[[dataset.subsets]]
image_dir = "project/img/2_extra style"
validation = true
'''
    cfg = load_config(write_config(tmp_path, mini_base_dir, dataset_keys=keys))
    examples = collect_examples(cfg, log=lambda m: None)
    assert sorted(ex.image for ex in examples if ex.held_out) == made["img/2_extra style"]
    assert sorted(ex.image for ex in examples if not ex.held_out) == made["img/5_clrscn"]
    assert steps_per_epoch([ex for ex in examples if not ex.held_out], 2) == 10 + 5  # 2 x 10, 1 x 10 repeats


def test_dataset_report_lists_the_subsets(tmp_path, mini_base_dir):
    kohya_tree(tmp_path / "project")
    assert main(["dataset", str(write_config(tmp_path, mini_base_dir))]) == 0
    report = (tmp_path / "out" / "dataset_report.md").read_text()
    assert "| 5_clrscn | 3 | 5 | clrscn | training |" in report.replace(str(tmp_path / "project" / "img") + "/", "")
    assert "| 1_scenery | 4 | 1 | scenery | regularisation |" in report.replace(str(tmp_path / "project" / "reg") + "/", "")
    assert "2 caption(s) lack the trigger 'clrscn'" in report
