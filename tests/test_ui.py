"""`sdlora ui`'s handlers, called directly: dataset edits, the config form, training from the UI,
and the refusals (traversal, non-images, busy folders). The browser test is test_ui_browser.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from sdlora.config import ConfigError, load_config  # noqa: E402
from sdlora.data.dataset import MANIFEST, read_manifest  # noqa: E402
from sdlora.errors import UserError  # noqa: E402
from sdlora.tiny.scenery import make_scene_image  # noqa: E402
from sdlora.ui import dataset_edit, training  # noqa: E402
from sdlora.ui.project import (  # noqa: E402
    PRESETS,
    Project,
    apply_preset,
    check,
    form_fields,
    form_values,
    overrides,
    save,
)

REPO = Path(__file__).resolve().parents[1]


def make_project(root: Path, n: int = 4, base: str = "tiny", extra: str = "") -> tuple[Project, str]:
    """A project folder with datasets_cfg/style.toml and n captioned scenery images (no tagger: fast)."""
    images = root / "datasets_cfg" / "style"
    images.mkdir(parents=True)
    for i in range(n):
        img, tags = make_scene_image(i, "colorful", 64, aspect=("1:1", "3:2")[i % 2])
        img.save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(", ".join(["clrscn", *tags[:4]]) + "\n")
    (root / "datasets_cfg" / "style.toml").write_text(f"""# a comment the form keeps
name = "style"
trigger = "clrscn"
[model]
base = "{base}"
[dataset]
image_dir = "style"
num_repeats = 2
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
[caption]
tagger = "none"
[network]
dim = 4
alpha = 2
[train]
epochs = 2
batch_size = 2
save_every_n_epochs = 1
save_precision = "fp32"
lr_scheduler = "constant"
seed = 1
{extra}
[output]
dir = "../output/style"
""")
    return Project(root), "datasets_cfg/style.toml"


def manifest_captions(cfg) -> dict[str, str]:
    data = read_manifest(cfg)
    assert data is not None, "the manifest is stale after an edit: the trainer would rebuild it"
    return {Path(e["path"]).name: e["caption"] for e in data.images}


def test_importing_the_cli_does_not_import_gradio():
    """`sdlora ui` is registered, but Gradio loads only when it runs: the CLI's start-up does not grow."""
    code = ("import sys, sdlora.cli; p = sdlora.cli.build_parser(); p.parse_args(['ui', '--port', '1']); "
            "print('gradio' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def test_tag_edits_land_in_the_caption_files_and_the_manifest_and_undo_restores(tmp_path):
    project, config = make_project(tmp_path)
    cfg = project.load(config)
    dataset_edit.build(cfg, log=lambda m: None)
    images = sorted((tmp_path / "datasets_cfg" / "style").glob("*.png"))
    originals = {p.name: p.with_suffix(".txt").read_text() for p in images}

    dataset_edit.set_tags(cfg, images[0], "clrscn,  red  sky , clrscn, lake", log=lambda m: None)
    assert images[0].with_suffix(".txt").read_text() == "clrscn, red sky, clrscn, lake\n"
    assert manifest_captions(cfg)["img0.png"] == "clrscn, red sky, clrscn, lake"

    assert dataset_edit.bulk_edit(cfg, "add", "pastel", log=lambda m: None) == len(images)
    assert all(p.with_suffix(".txt").read_text().rstrip().endswith(", pastel") for p in images)
    assert dataset_edit.bulk_edit(cfg, "move to front", "pastel", log=lambda m: None) == len(images)
    # behind the trigger, which keep_tokens = 1 keeps first
    assert all(p.with_suffix(".txt").read_text().startswith("clrscn, pastel, ") for p in images)
    assert dataset_edit.bulk_edit(cfg, "replace", "Pastel", "pastel colors", log=lambda m: None) == len(images)
    assert all(c.startswith("clrscn, pastel colors, ") for c in manifest_captions(cfg).values())

    before_undo = {p.name: p.with_suffix(".txt").read_text() for p in images}
    assert dataset_edit.bulk_edit(cfg, "remove", "pastel colors", log=lambda m: None) == len(images)
    assert all("pastel colors" not in c for c in manifest_captions(cfg).values())
    assert dataset_edit.undo(cfg, log=lambda m: None) == len(images)
    assert {p.name: p.with_suffix(".txt").read_text() for p in images} == before_undo
    assert manifest_captions(cfg)["img1.png"] == before_undo["img1.png"].strip()
    with pytest.raises(UserError, match="nothing to undo"):
        dataset_edit.undo(cfg, log=lambda m: None)
    # no temp files of the atomic writes are left behind
    leftovers = [p for p in tmp_path.rglob(".*") if p.is_file() and p.name != dataset_edit.UNDO_FILE]
    assert leftovers == []
    assert originals != before_undo


def test_an_edit_that_cannot_be_written_changes_no_caption(tmp_path, monkeypatch):
    """A full disk during an edit: the caption files and the manifest stay as they were."""
    import errno

    from sdlora import io

    project, config = make_project(tmp_path)
    cfg = project.load(config)
    dataset_edit.build(cfg, log=lambda m: None)
    images = sorted((tmp_path / "datasets_cfg" / "style").glob("*.png"))
    before = {p.name: p.with_suffix(".txt").read_bytes() for p in images}
    manifest = (cfg.output_dir / MANIFEST).read_bytes()
    real = io.os.replace

    def full(src, dst):
        if str(dst).endswith(".txt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", full)
    with pytest.raises(OSError):
        dataset_edit.set_tags(cfg, images[0], "clrscn, lost", log=lambda m: None)
    assert {p.name: p.with_suffix(".txt").read_bytes() for p in images} == before
    assert (cfg.output_dir / MANIFEST).read_bytes() == manifest
    assert not [p for p in images[0].parent.iterdir() if p.name.startswith(".")]


def _other_value(f, current):
    """A valid value other than `current` (the file's value or the default), for every kind of field."""
    toml = {"dataset.resolution": "[96, 64]", "train.text_encoder_lr": "2e-05",
            "dataset.subsets": '[{ image_dir = "style", num_repeats = 3 }]', "caption.blacklist": '["watermark"]',
            "caption.replace": '{ sea = "ocean" }', "caption.style_tags": '["pastel"]',
            "train.optimizer_args": "{ betas = [0.9, 0.99] }", "sample.prompts": '["clrscn, lake"]',
            "sample.seeds": "[7, 8]", "sample.lora_scales": "[0.0, 0.75]", "network.block_dims": "[4, 8]",
            "network.block_alphas": "[2.0, 4.0]", "network.conv_block_dims": "[2, 2]",
            "network.conv_block_alphas": "[1.0, 1.0]", "network.down_lr_weight": '"sine+0.5"',
            "network.mid_lr_weight": "[2.0]", "network.up_lr_weight": "[1.0, 0.5]",
            "model.text_encoders": '["clip_l.safetensors", "t5xxl_fp16.safetensors"]',
            "sample.skip_guidance_layers": "[5, 6]", "network.train_double_block_indices": '"0,1,8-12"',
            "network.train_single_block_indices": '"none"', "network.train_block_indices": '"0,1"'}
    strings = {"name": "renamed", "trigger": "trg", "model.base": "other/base", "model.vae": "vae.safetensors",
               "dataset.image_dir": "style2", "dataset.reg_dir": "reg", "dataset.background": "#000000",
               "dataset.caption_extension": ".caption", "caption.model": "ViT-B-32", "caption.pretrained": "ckpt.bin",
               "caption.vocabulary": "vocab.txt", "network.init_weights": "init.safetensors",
               "sample.prompt_file": "prompts.txt", "sample.negative_prompt": "blurry",
               "output.output_name": "other_name", "output.dir": "../output/other",
               "sample.hires_upscaler": "upscalers/4x.pth"}
    consistent = {"dataset.bucket_reso_steps": 64, "sample.width": 1024, "sample.height": 768}  # multiples of 8
    if f.kind == "toml":
        return toml[f.key]
    if f.key in consistent:
        return consistent[f.key]
    if f.kind == "bool":
        return not current
    if f.kind == "choice":
        return next(c for c in f.choices if c != current)
    if f.kind == "int":
        return current + 1 if f.max is None or current + 1 <= f.max else current - 1
    if f.kind == "float":
        return (current + f.max) / 2 if f.max is not None and current < f.max else current / 2 if current else 0.25
    return strings[f.key]


def test_the_form_round_trips_every_config_key(tmp_path):
    """Each key, changed in the form, saves into the file (comments kept) and reads back as set; the
    resulting config is the one `--set` gives the CLI."""
    project, config = make_project(tmp_path)
    fields = form_fields()
    keys = {f.key for f in fields}
    from sdlora.config import describe

    assert keys == {k for k, _, _ in describe() if not k.startswith("dataset.subsets[]")}
    values = form_values(project, config)
    # Keys a config refuses together change in a second round: train.compile with blocks_to_swap.
    later = {"train.compile": "train.blocks_to_swap"}
    changed = {**values, **{f.key: _other_value(f, values[f.key]) for f in fields if f.key not in later}}
    assert all(changed[f.key] != values[f.key] for f in fields if f.key not in later)
    for round_ in (changed, {**changed, **{k: _other_value(next(f for f in fields if f.key == k), values[k])
                                            for k in later}, **{v: values[v] for v in later.values()}}):
        sets = overrides(project, config, round_)
        expected = load_config(tmp_path / config, sets).to_dict()
        save(project, config, round_)
        text = (tmp_path / config).read_text()
        assert text.startswith("# a comment the form keeps")
        assert overrides(project, config, round_) == []  # what the form shows is what the file now says
        assert load_config(tmp_path / config).to_dict() == expected
    # every key was saved changed in a round; all but blocks_to_swap (back where it began) stay changed
    assert len(overrides(project, config, values)) == len(fields) - len(later)


@pytest.mark.parametrize("key, value, message", [
    ("train.epochs", 0, "[train] epochs: 0 is below the minimum 1"),
    ("network.dim", 4096, "[network] dim: 4096 is above the maximum 1024"),
    ("dataset.resolution", "[100, 64]", "sides must be multiples of 8"),
    ("caption.blacklist", "[1, 2", "is not a TOML value"),
])
def test_out_of_range_form_values_get_the_clis_message_and_nothing_is_saved(tmp_path, key, value, message):
    project, config = make_project(tmp_path)
    before = (tmp_path / config).read_text()
    values = {**form_values(project, config), key: value}
    with pytest.raises(ConfigError) as e:
        check(project, config, values)
    assert message in str(e.value)
    if "TOML" not in message:  # the same line the CLI prints for the same --set
        cli = subprocess.run([sys.executable, "-m", "sdlora.cli", "config", "check", config, "--set",
                              overrides(project, config, values)[0]], capture_output=True, text=True, cwd=tmp_path)
        assert cli.returncode == 2
        assert str(e.value).replace(str(tmp_path) + "/", "") in cli.stderr  # the UI names the file absolutely
    with pytest.raises(ConfigError):
        save(project, config, values)
    assert (tmp_path / config).read_text() == before


def test_paths_outside_the_project_are_refused(tmp_path):
    project, config = make_project(tmp_path / "p")
    (tmp_path / "secret.toml").write_text('name = "x"\n')
    for bad in ("../secret.toml", str(tmp_path / "secret.toml"), "datasets_cfg/../../secret.toml", "/etc/passwd"):
        with pytest.raises(UserError, match="outside the project folder"):
            project.load(bad)
    os.symlink(tmp_path / "secret.toml", tmp_path / "p" / "link.toml")
    with pytest.raises(UserError, match="outside the project folder"):
        project.path("link.toml")


def test_uploads_pass_the_builders_image_check_and_replace_nothing(tmp_path):
    from PIL import Image

    project, config = make_project(tmp_path, extra="")
    cfg = project.load(config)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "notes.png").write_text("not an image")
    (uploads / "run.sh").write_text("echo hi")
    Image.new("RGB", (300, 300), "red").save(uploads / "big.png")
    Image.new("RGB", (96, 96), "blue").save(uploads / "img0.png")  # the name of an image already there
    small_limit = __import__("dataclasses").replace(cfg.dataset, max_pixels=200 * 200)
    cfg = __import__("dataclasses").replace(cfg, dataset=small_limit)
    added, refused = dataset_edit.add_images(cfg, [(p.name, p) for p in sorted(uploads.iterdir())], log=lambda m: None)
    reasons = dict(refused)
    assert "not an image" in reasons["notes.png"]
    assert "not an image file type" in reasons["run.sh"]
    assert "too large" in reasons["big.png"]
    assert [p.name for p in added] == ["img0-1.png"]
    folder = tmp_path / "datasets_cfg" / "style"
    assert Image.open(folder / "img0.png").size == (64, 64)  # the old one is untouched
    assert not (folder / "notes.png").exists() and not (folder / "run.sh").exists()


def test_a_second_training_on_a_busy_folder_is_refused(tmp_path):
    from sdlora.io import output_lock

    project, config = make_project(tmp_path)
    cfg = project.load(config)
    with output_lock(cfg.output_dir, log=lambda m: None):
        with pytest.raises(UserError, match="in use by another sdlora training"):
            training.start(cfg, tmp_path / config, [], False, tmp_path)
    assert not (cfg.output_dir / training.RECORD).exists()


def test_a_training_started_from_the_ui_gives_the_clis_adapter(tmp_path, mini_base_dir, monkeypatch):
    """Same config and seed: the UI's process writes the tensors `sdlora train` writes, and its status
    shows every step's loss from the TensorBoard logs."""
    from safetensors.torch import load_file

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    project, config = make_project(tmp_path, base=str(mini_base_dir), extra="max_train_steps = 3")
    changes = overrides(project, config, {**form_values(project, config), "train.unet_lr": 1e-3})
    cfg = project.load(config, changes)
    dataset_edit.build(cfg, log=lambda m: None)
    plan = training.plan(cfg)
    assert (plan.images, plan.total_steps) == (4, 3)
    training.start(cfg, tmp_path / config, changes, False, tmp_path, plan.total_steps)
    deadline = time.time() + 240
    while training.running_pid(cfg) and time.time() < deadline:
        time.sleep(1)
    status = training.status(cfg)
    assert status.state == "finished", status.log_tail
    assert [step for step, _ in status.loss] == [1, 2, 3] and status.total == 3
    assert set(status.lr) == {"unet", "text_encoder"} or "unet" in status.lr

    cli_out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "sdlora.cli", "train", config, *sum([["--set", s] for s in changes], []),
                    "--set", f"output.dir={json.dumps(str(cli_out))}"], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    ui = load_file(cfg.adapter_path())
    cli = load_file(cli_out / "style.safetensors")
    assert ui.keys() == cli.keys()
    assert all((ui[k] == cli[k]).all() for k in ui)


@pytest.mark.slow  # ~1 min on 2 shared cores: a 1080x720 two-pass render in a new process
def test_the_prompt_box_samples_a1111_syntax_at_the_configs_size_with_one_adapter(tmp_path, mini_base_dir, monkeypatch):
    from PIL import Image

    from sdlora.cli import main
    from sdlora.sampling.infotext import parse_infotext

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    project, config = make_project(tmp_path, base=str(mini_base_dir))
    cfg = project.load(config)
    assert main(["train", str(tmp_path / config)]) == 0  # 2 epochs: style-000001 and the final style
    images = training.sample(cfg, tmp_path / config, "(clrscn:1.2), lake, [mountains]", cfg.adapter_path(), 0.8, 3,
                             tmp_path, steps=2)
    assert len(images) == 1
    with Image.open(images[0]) as im:
        assert im.size == (1080, 720)
        parameters = im.text["parameters"]
    info = parse_infotext(parameters)
    assert info["Seed"] == "3" and "Lora hashes" in info
    assert parameters.startswith("(clrscn:1.2), lake, [mountains] <lora:style:0.8>")

    # epochs side by side, with the style figures of each epoch's images
    from sdlora.sampling.metrics import colourfulness

    (tmp_path / config).write_text((tmp_path / config).read_text() + "[sample]\nwidth = 128\nheight = 128\n"
                                   "prompts = [\"clrscn, lake\"]\nseeds = [1, 2]\n")
    grids, rows = training.compare_epochs(project.load(config), tmp_path / config, tmp_path, steps=2)
    assert [g.name for g in grids] == ["epochs_grid_seed1.png", "epochs_grid_seed2.png"]
    assert [(r["adapter"], r["images"]) for r in rows] == [("epoch 1", 2), ("final", 2), ("style set", 4)]
    final = sorted((cfg.output_dir / training.EPOCHS_FOLDER).glob("epochs_final_p00_seed*.png"))
    assert rows[1]["colourfulness"] == pytest.approx(sum(colourfulness(Image.open(p)) for p in final) / 2)


def test_the_server_binds_localhost_and_serves_no_file_outside_the_project(tmp_path):
    import urllib.error
    import urllib.request

    from sdlora.ui.app import build_app, launch_options

    project, config = make_project(tmp_path / "p")
    (tmp_path / "secret.txt").write_text("secret")
    app = build_app(project.root)
    options = {**launch_options(app, "127.0.0.1", 0), "prevent_thread_lock": True}
    options.pop("server_port")
    _, url, _ = app.launch(**options)
    try:
        assert url.startswith("http://127.0.0.1:")

        def get(path):
            try:
                with urllib.request.urlopen(url.rstrip("/") + path, timeout=30) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, b""

        inside = project.root / "datasets_cfg" / "style" / "img0.png"
        assert get(f"/gradio_api/file={inside}") == (200, inside.read_bytes())
        for path in (tmp_path / "secret.txt", f"{project.root}/../secret.txt", "/etc/passwd"):
            status, body = get(f"/gradio_api/file={path}")
            assert status in (403, 404) and b"secret" not in body and b"root:" not in body
    finally:
        app.close()


def test_listen_warns_that_every_interface_is_served(tmp_path, monkeypatch, capsys):
    from sdlora.cli import main
    from sdlora.ui import app

    project, _ = make_project(tmp_path)
    calls = []
    monkeypatch.setattr(app.gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    assert main(["ui", "--root", str(tmp_path), "--port", "7999", "--listen"]) == 0
    assert calls[0]["server_name"] == "0.0.0.0" and calls[0]["server_port"] == 7999
    assert "warning: --listen serves on every network interface" in capsys.readouterr().err
    assert main(["ui", "--root", str(tmp_path), "--port", "7999"]) == 0
    assert calls[1]["server_name"] == "127.0.0.1"
    assert main(["ui", "--root", str(tmp_path / "missing")]) == 2


def test_stop_saves_the_state_and_resume_finishes_the_training(tmp_path, mini_base_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    project, config = make_project(tmp_path, base=str(mini_base_dir), extra="max_train_steps = 40")
    cfg = project.load(config)
    dataset_edit.build(cfg, log=lambda m: None)
    total = training.plan(cfg).total_steps
    training.start(cfg, tmp_path / config, [], False, tmp_path, total)
    deadline = time.time() + 180
    while training.status(cfg).step < 2 and time.time() < deadline:
        time.sleep(0.5)
    training.stop(cfg)
    while training.running_pid(cfg) and time.time() < deadline:
        time.sleep(0.5)
    stopped = training.status(cfg)
    assert stopped.state == "stopped", stopped.log_tail
    assert (cfg.output_dir / "state" / "training_state.safetensors").is_file()
    assert 2 <= stopped.step < total
    with pytest.raises(UserError, match="no training is running"):
        training.stop(cfg)
    training.start(cfg, tmp_path / config, [], True, tmp_path, total)
    deadline = time.time() + 240
    while training.running_pid(cfg) and time.time() < deadline:
        time.sleep(1)
    done = training.status(cfg)
    assert done.state == "finished", done.log_tail
    assert [s for s, _ in done.loss] == list(range(1, total + 1))  # the first session's steps, then the rest


def test_presets_are_the_readmes_family_settings_and_load(tmp_path):
    """Each preset equals the config the README (or the demo config) gives for its family, and a form
    with it applied is a valid config."""
    import re
    import tomllib

    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    sd = next(tomllib.loads(b) for b in blocks if 'v1-5-pruned-emaonly' in b)
    sdxl = next(tomllib.loads(b) for b in blocks if "sd_xl_base_1.0" in b)
    demo = tomllib.loads((REPO / "datasets_cfg" / "colorful_scenery.toml").read_text())
    sources = {"SD1.x / SD2.x (512 px)": sd, "SDXL (1024 px)": sdxl, "embedded tiny base (160 px)": demo}
    assert set(sources) == set(PRESETS)
    for name, preset in PRESETS.items():
        for key, value in preset.items():
            section, field = key.split(".")
            assert sources[name][section][field] == value, (name, key)
    project, config = make_project(tmp_path)
    for name in PRESETS:
        cfg = check(project, config, apply_preset(form_values(project, config), name))
        assert cfg.dataset.resolution == PRESETS[name]["dataset.resolution"]


def test_the_plan_estimates_time_from_sdlora_bench_on_the_base(tmp_path, mini_base_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    project, config = make_project(tmp_path, base=str(mini_base_dir))
    cfg = project.load(config)
    dataset_edit.build(cfg, log=lambda m: None)
    assert "not measured yet" in training.plan(cfg).text
    rate = training.measure_speed(cfg, tmp_path)
    figures = json.loads((cfg.output_dir / training.BENCH_JSON).read_text())["first_step"]
    assert figures["model"] == str(mini_base_dir) and figures["resolution"] == 64
    assert rate == pytest.approx(cfg.train.batch_size / figures["steps_per_s"])  # measured at batch 1
    plan = training.plan(cfg)
    assert plan.seconds_per_step == rate and "`sdlora bench` on this base" in plan.text
    # another base: those figures do not apply
    other = project.load(config, ["model.base=\"tiny\""])
    assert training.plan(other).seconds_per_step is None
