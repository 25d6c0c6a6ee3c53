"""The project folder the UI works in, and the config form generated from the config schema.

Every path the browser names is resolved inside the project folder (`Project.path`); a path
that leaves it ('..', an absolute path elsewhere, a link out) is refused with a message. The
form is `config.describe`'s fields with their types and limits; what the form changes reaches
the config the way the CLI's `--set section.key=value` does, so it gets the same validation
and the same messages.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlora.config import (
    SECTION_CLASSES,
    Config,
    ConfigError,
    load_config,
    parse_override,
)
from sdlora.errors import UserError
from sdlora.io import atomic_write_text, file_name_problem, inside

CONFIG_FOLDER = "datasets_cfg"  # where `bash train.sh NAME` looks for NAME.toml


class Project:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise UserError(f"{root}: project folder not found; run `sdlora ui` in your project, or pass --root DIR")

    def path(self, text: str | Path, what: str = "path") -> Path:
        """`text` (relative to the project folder, or absolute) as a path inside it, else a UserError."""
        text = str(text).strip()
        if not text:
            raise UserError(f"{what}: empty; give a path inside the project folder {self.root}")
        path = Path(text) if Path(text).is_absolute() else self.root / text
        try:
            inside(self.root, path, what)
        except UserError:
            raise UserError(f"{what} {text!r} is outside the project folder {self.root}; the UI only reads and "
                            "writes inside it") from None
        return path.resolve()

    def relative(self, path: str | Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def configs(self) -> list[str]:
        """The style configs of the project: datasets_cfg/*.toml, then *.toml at the top."""
        found = sorted((self.root / CONFIG_FOLDER).glob("*.toml")) + sorted(self.root.glob("*.toml"))
        return [self.relative(p) for p in found if p.name != "pyproject.toml"]

    def load(self, config: str, overrides: list[str] = ()) -> Config:
        path = self.path(config, "config")
        cfg = load_config(path, overrides)
        for what, folder in (("[output] dir", cfg.output_dir), ("[dataset] image_dir", Path(cfg.dataset.image_dir))):
            try:
                inside(self.root, folder, what)
            except UserError:
                raise UserError(f"{path}: {what} = {folder} is outside the project folder {self.root}; the UI only "
                                "works inside it (use the CLI for this config, or move the folder)") from None
        return cfg

    def create_style(self, name: str, trigger: str = "", folder: str = CONFIG_FOLDER) -> str:
        """A new style: `<folder>/NAME.toml` and its empty image folder `<folder>/NAME/`; never replaces one."""
        name = name.strip()
        problem = file_name_problem(name) if name else "it is empty"
        if problem:
            raise UserError(f"style name {name!r} cannot be a file name: {problem}; use letters, digits, '-' and '_'")
        if trigger and "," in trigger:
            raise UserError(f"trigger {trigger!r} must be one tag without commas")
        where = self.path(folder, "config folder")
        path = where / f"{name}.toml"
        if path.exists():
            raise UserError(f"{self.relative(path)} already exists; choose it in the list, or pick another name")
        output = self.root / "output" / name
        lines = [f"# {name}: made by `sdlora ui`. Every key and its default: `sdlora config keys`.",
                 f"name = {_toml(name)}", f"trigger = {_toml(trigger.strip())}", "", "[dataset]",
                 f"image_dir = {_toml(name)}", "", "[output]",
                 f"dir = {_toml(Path(_relpath(output, where)).as_posix())}", ""]
        (where / name).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines))
        load_config(path)  # what it wrote must load
        return self.relative(path)


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)


# ---------------------------------------------------------------------------------------------
# The config form


@dataclass
class FormField:
    key: str  # "train.epochs"; top-level keys have no section
    kind: str  # bool | choice | int | float | str | toml (lists, tables and values of several types)
    default: Any
    help: str
    choices: list | None = None
    min: float | None = None
    max: float | None = None


def form_fields() -> list[FormField]:
    """Every config key the way `config.describe` lists them, with the type the form edits it as."""
    fields = []
    for section, cls in [("", Config), *SECTION_CLASSES.items()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or (cls is Config and f.name in SECTION_CLASSES):
                continue
            meta = f.metadata
            t = hints[f.name]
            kind = ("choice" if meta.get("choices") else {bool: "bool", int: "int", float: "float", str: "str"}.get(t, "toml"))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fields.append(FormField(f"{section}.{f.name}" if section else f.name, kind, default, meta.get("help", ""),
                                    meta.get("choices"), meta.get("min"), meta.get("max")))
    return fields


# Starting points per base family: the values the README's "Using a real Stable Diffusion checkpoint"
# and "SDXL" configs give, and datasets_cfg/colorful_scenery.toml for the embedded base (a test keeps
# them equal). Applying one changes only these keys of the form; nothing is saved until Save config.
PRESETS = {
    "embedded tiny base (160 px)": {"dataset.resolution": 160, "dataset.min_bucket_reso": 64,
                                    "dataset.max_bucket_reso": 256, "dataset.bucket_reso_steps": 32,
                                    "sample.first_pass_resolution": 160},
    "SD1.x / SD2.x (512 px)": {"dataset.resolution": 512, "dataset.min_bucket_reso": 256,
                               "dataset.max_bucket_reso": 1024, "dataset.bucket_reso_steps": 64},
    "SDXL (1024 px)": {"dataset.resolution": 1024, "dataset.min_bucket_reso": 512, "dataset.max_bucket_reso": 2048,
                       "dataset.bucket_reso_steps": 64, "train.unet_lr": 1e-4, "train.text_encoder_lr": [5e-5, 2.5e-5],
                       "train.mixed_precision": "bf16", "train.gradient_checkpointing": True},
}


def apply_preset(values: dict[str, Any], preset: str) -> dict[str, Any]:
    """The form's values with a preset's keys set (toml fields as TOML text)."""
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    kinds = {f.key: f.kind for f in form_fields()}
    return {**values, **{k: _toml(v) if kinds[k] == "toml" else v for k, v in PRESETS[preset].items()}}


def _file_values(path: Path) -> dict[str, Any]:
    """key -> the value the config file sets (absent keys: not in the dict)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    values = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in SECTION_CLASSES:
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    return values


def form_values(project: Project, config: str) -> dict[str, Any]:
    """key -> the form's value: the file's value, else the default (as the file would have to say it);
    toml fields as TOML text."""
    path = project.path(config, "config")
    try:
        set_in_file = _file_values(path)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    set_in_file.setdefault("name", path.stem)
    values = {}
    for f in form_fields():
        value = set_in_file.get(f.key, f.default)
        values[f.key] = _toml(value) if f.kind == "toml" else value
    return values


def overrides(project: Project, config: str, values: dict[str, Any]) -> list[str]:
    """The `--set key=value` list that turns the config file into the form's values (changed keys only)."""
    current = form_values(project, config)
    kinds = {f.key: f.kind for f in form_fields()}
    out = []
    for key, value in values.items():
        if key not in kinds:
            raise ConfigError(f"{config}: unknown key '{key}'")
        if kinds[key] == "toml":
            text = str(value).strip()
            parsed = parse_override(f"{key}={text}")[1]
            if isinstance(parsed, str) and parsed == text:  # not TOML: parse_override fell back to a string
                raise ConfigError(f"{config}: {key} = {text!r} is not a TOML value; write e.g. [1, 2] or "
                                  "\"text\" or { key = \"value\" }")
            if parsed != parse_override(f"{key}={current[key]}")[1]:
                out.append(f"{key}={text}")
            continue
        if value == current[key]:
            continue
        if value is None:
            raise ConfigError(f"{config}: {key} is empty; give a value (default {current[key]!r})")
        if kinds[key] == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        out.append(f"{key}={_toml(value)}")
    return out


def check(project: Project, config: str, values: dict[str, Any]) -> Config:
    """The config the form describes, validated as the CLI validates `CONFIG --set ...`."""
    return project.load(config, overrides(project, config, values))


def save(project: Project, config: str, values: dict[str, Any]) -> list[str]:
    """Write the form's changed keys into the config file (comments and layout kept); returns them."""
    import tomlkit

    changed = overrides(project, config, values)
    project.load(config, changed)  # refused before anything is written
    path = project.path(config, "config")
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    for text in changed:
        keys, value = parse_override(text)
        table = doc
        for k in keys[:-1]:
            if k not in table:
                table[k] = tomlkit.table()
            table = table[k]
        table[keys[-1]] = value
    atomic_write_text(path, tomlkit.dumps(doc))
    return changed


def _toml(value) -> str:
    """One TOML value as text (strings quoted, tables inline)."""
    import tomlkit

    if isinstance(value, dict):
        table = tomlkit.inline_table()
        table.update(value)
        return table.as_string()
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        array = tomlkit.array()
        array.extend(_inline(v) for v in value)
        return array.as_string()
    return tomlkit.item(value).as_string()


def _inline(value):
    import tomlkit

    if isinstance(value, dict):
        table = tomlkit.inline_table()
        table.update(value)
        return table
    return value
