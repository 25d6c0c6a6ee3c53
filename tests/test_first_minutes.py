"""A newcomer's first minutes (issue 20): a mistyped command is answered with the closest one,
help texts name every adapter kind, `sdlora new` writes a starting config for a pip user, `tiny
build` keeps the packaged base unless told, and a normal run's log holds no library bars or
tagger-internal notes."""

import dataclasses
import re
import tomllib

import pytest

from sdlora.cli import main
from sdlora.config import SECTION_CLASSES, Config, load_config

# The adapter kinds of issue 20 that every help text about adapters names.
ADAPTER_KINDS = ["LoRA", "LoCon", "LoHa", "LoKr", "DoRA"]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, suggestion", [
    (["trian"], "did you mean train?"),
    (["import-kohay", "x"], "did you mean import-kohya?"),
    (["config", "chek", "x.toml"], "did you mean check?"),
    (["train", "x.toml", "--resme"], "--resme (did you mean --resume?)"),
    (["sample", "x.toml", "--sampler", "eular"], "did you mean euler?"),
])
def test_a_mistyped_command_or_option_suggests_the_closest(capsys, argv, suggestion):
    err = _error(capsys, *argv)
    assert suggestion in err and "Traceback" not in err


def test_an_unknown_word_far_from_every_command_suggests_nothing(capsys):
    assert "did you mean" not in _error(capsys, "xyzzy")


def test_train_help_names_every_kind_it_trains(capsys):
    text = _help(capsys, "train").lower()
    types = next(f for f in dataclasses.fields(SECTION_CLASSES["network"]) if f.name == "type")
    for kind in [*types.metadata["choices"], "dora"]:
        assert kind in text, kind


@pytest.mark.parametrize("command", ["resize", "convert", "inspect", "merge", "sample"])
def test_help_of_commands_reading_adapters_names_every_kind(capsys, command):
    text = _help(capsys, command)
    assert all(kind in text for kind in ADAPTER_KINDS), text


def _uncommented(text: str) -> str:
    """The starter config with every `# key = value  # meaning` line turned into `key = value`."""
    return "\n".join(re.sub(r"^# (\w+ = .*?)  # .*$", r"\1", line) for line in text.splitlines())


def test_new_writes_a_starter_config_whose_commented_defaults_are_the_real_ones(tmp_path, capsys):
    images = tmp_path / "shots"
    images.mkdir()
    out = tmp_path / "cfg" / "pastel.toml"
    assert main(["new", "pastel", "--images", str(images), "-o", str(out)]) == 0
    assert "sdlora dataset" in capsys.readouterr().out
    cfg = load_config(out)
    assert (cfg.name, cfg.trigger) == ("pastel", "pastel")
    assert cfg.dataset.image_dir == str(images.resolve())
    # Every commented line, uncommented, loads and changes nothing: the comments show the schema's defaults.
    text = out.read_text()
    assert text.count("\n# ") > 50
    full = tomllib.loads(_uncommented(text))
    default = Config()
    for section in SECTION_CLASSES:
        for key, value in full[section].items():
            assert getattr(getattr(default, section), key) == value or key in ("image_dir", "dir"), (section, key)
    assert load_config(out).to_dict() == cfg.to_dict()


def test_new_refuses_to_overwrite_and_names_the_way_out(tmp_path, capsys):
    out = tmp_path / "mine.toml"
    out.write_text("# the user's own\n")
    assert main(["new", "mine", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and out.read_text() == "# the user's own\n"
    assert main(["new", "mine", "-o", str(out), "--overwrite"]) == 0
    assert 'name = "mine"' in out.read_text()


def test_new_refuses_a_name_that_is_no_file_name(tmp_path, capsys):
    assert main(["new", "a/b", "-o", str(tmp_path / "x.toml")]) == 2
    assert "NAME" in capsys.readouterr().err and not (tmp_path / "x.toml").exists()


def test_help_points_pip_users_at_sdlora_new(capsys):
    assert "sdlora new" in _help(capsys) and "sdlora new" in _help(capsys, "run")


def test_tiny_build_states_its_duration_and_keeps_the_packaged_base(tmp_path, capsys):
    from sdlora import ASSETS

    assert "45 minutes" in _help(capsys, "tiny", "build")
    # Refused before any stage runs: with no work folder, the export stage would fail otherwise.
    assert main(["tiny", "build", "--stages", "export", "--work-dir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert str(ASSETS / "tiny") in err and "--overwrite" in err and "--assets-dir" in err
    assert not (tmp_path / "work").exists()


def test_a_packaged_vocabulary_partly_unknown_to_the_tagger_is_no_news(tmp_path):
    from sdlora.data import caption

    tagger = caption.tiny_tagger("cpu")
    said = []
    vocabulary, unknown = caption.checked_vocabulary(tagger, "", log=said.append)
    assert unknown and vocabulary and said == []
    own = tmp_path / "tags.txt"
    own.write_text("sunset\nbaroque cathedral\n")
    caption.checked_vocabulary(tagger, str(own), log=said.append)
    assert len(said) == 1 and str(own) in said[0] and "baroque cathedral" in said[0] and "remove them" in said[0]


def test_loading_an_adapter_for_sampling_shows_no_library_progress_bar(tmp_path, mini_base_dir, capfd):
    from test_sample import make_cfg, write_adapter

    from sdlora.sampling import sampler as sample

    cfg = make_cfg(mini_base_dir, tmp_path / "out")
    adapter = write_adapter(cfg, tmp_path / "style.safetensors")
    sampler = sample.Sampler(cfg)
    capfd.readouterr()
    sampler.adapters.add(adapter)  # diffusers' load_lora_weights: transformers drew "Loading weights" here
    assert sampler.adapters.adapters and "Loading weights" not in capfd.readouterr().err


def test_the_startup_bench_times_every_help_and_the_version(monkeypatch):
    from sdlora.bench import parts
    from sdlora.commands.bench import startup_argvs

    argvs = startup_argvs()
    assert ["--help"] in argvs and ["--version"] in argvs and ["train", "--help"] in argvs and ["new", "--help"] in argvs
    figures = parts.bench_startup([["--version"], ["config", "--help"]], repeats=1)
    assert set(figures) == {"--version_s", "config --help_s"} and all(0 < s < 60 for s in figures.values())
