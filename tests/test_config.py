"""Config: validated before any work starts, with messages naming the file, the key and the fix."""

from pathlib import Path

import pytest

from sdlora.cli import main
from sdlora.config import ConfigError, config_from_dict, describe, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "style.toml"
    path.write_text(text)
    return path


def test_shipped_config_loads_with_paths_relative_to_the_file():
    cfg = load_config(REPO / "datasets_cfg" / "colorful_scenery.toml")
    assert cfg.name == "colorful_scenery" and cfg.trigger == "clrscn"
    assert Path(cfg.dataset.image_dir) == REPO / "datasets_cfg" / "colorful_scenery"
    assert cfg.train.unet_lr == 5e-4 and cfg.train.text_encoder_lr == 1e-4
    assert (cfg.sample.width, cfg.sample.height) == (1080, 720)


def test_defaults_match_the_product_card(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.name == "style"  # the file's stem
    assert (cfg.network.dim, cfg.network.alpha, cfg.network.unet_targets) == (16, 8.0, "transformer")
    assert (cfg.train.unet_lr, cfg.train.text_encoder_lr) == (5e-4, 1e-4)


@pytest.mark.parametrize("text, expected", [
    ("[train]\nepochz = 3\n", ["style.toml", "[train]", "epochz", "did you mean 'epochs'"]),
    ("[trian]\nepochs = 3\n", ["unknown key 'trian'", "did you mean 'train'"]),
    ("[train]\nepochs = \"ten\"\n", ["[train] epochs", "expected an integer", "'ten'"]),
    ("[train]\nepochs = 0\n", ["[train] epochs", "below the minimum 1"]),
    ("[network]\nunet_targets = \"everything\"\n", ["unet_targets", "choose one of", "'attn2'"]),
    ("[dataset]\nresolution = 500\n", ["resolution", "multiples of 8"]),
    ("[sample]\nwidth = 1081\n", ["width = 1081", "multiple of 8", "try 1080"]),
    ("[train\n", ["not valid TOML"]),
])
def test_mistakes_name_file_key_and_fix(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    for part in expected:
        assert part in str(e.value)


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 3\n")
    cfg = load_config(path, ["train.epochs=5", "network.train_text_encoder=false", "sample.prompts=['a', 'b']"])
    assert cfg.train.epochs == 5 and cfg.network.train_text_encoder is False and cfg.sample.prompts == ["a", "b"]
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path, ["train.epochs"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["train.epochs=many"])


def test_int_accepted_where_a_float_is_expected(tmp_path):
    assert load_config(write(tmp_path, "[network]\nalpha = 8\n")).network.alpha == 8.0


def test_cli_reports_config_mistakes_without_traceback(tmp_path, capsys):
    path = write(tmp_path, "[train]\nepochz = 3\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "epochz" in err and "Traceback" not in err


def test_missing_config_lists_available_ones(tmp_path):
    (tmp_path / "other.toml").write_text("")
    with pytest.raises(ConfigError, match="other"):
        load_config(tmp_path / "nope.toml")


def test_every_key_has_help():
    rows = describe()
    assert len(rows) > 60
    assert all(help_text for _, _, help_text in rows)


def test_readme_config_reference_is_current():
    from sdlora.config import reference_markdown

    assert reference_markdown() in (REPO / "README.md").read_text(), \
        "README's config reference is stale: regenerate it from `sdlora config keys`"


def test_epoch_adapter_names_are_read_back_by_the_rule_that_writes_them(tmp_path):
    from sdlora.config import epoch_of_adapter

    cfg = config_from_dict({"name": "pastel-v2", "output": {"dir": str(tmp_path)}})
    assert epoch_of_adapter(cfg.adapter_path(epoch=3).name) == ("pastel-v2", 3)
    assert epoch_of_adapter(cfg.adapter_path().name) is None  # the final adapter
    assert epoch_of_adapter(cfg.adapter_path(step=40).name) is None  # a save_every_n_steps one
