"""`sdlora new NAME --images DIR`: a commented starter config, for a user without the repository."""

from __future__ import annotations

import dataclasses
import json
import os
import string
import tomllib
from pathlib import Path

from sdlora.config import SECTION_CLASSES, config_from_dict
from sdlora.errors import UserError
from sdlora.io import atomic_write_text, file_name_problem, refuse_to_overwrite

# Keys the template sets itself (the rest are listed commented, with the schema's defaults).
TEMPLATE_KEYS = {"dataset.image_dir", "output.dir"}


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "new", help="write a commented starter config for a folder of images (start here)",
        description="Write NAME.toml: a config for a style LoRA trained on the images in DIR, with every other "
                    "key listed as a comment showing its default. Then `sdlora dataset NAME.toml` (captions) "
                    "and `sdlora run NAME.toml` (train, export, samples).")
    p.add_argument("name", metavar="NAME", help="the style's name: the adapter is written as NAME.safetensors")
    p.add_argument("--images", metavar="DIR", help="the folder of the style's images (default: a folder NAME next "
                                                   "to the config)")
    p.add_argument("--trigger", help="the trigger word put first in every caption (default: NAME)")
    p.add_argument("-o", "--output", metavar="FILE", help="the config to write (default: NAME.toml here)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=_cmd_new)


def _commented_keys(section: str) -> str:
    """`# key = default  # meaning` for every key of [section] that the template does not set."""
    lines = []
    for f in dataclasses.fields(SECTION_CLASSES[section]):
        if f"{section}.{f.name}" in TEMPLATE_KEYS or f.name == "subsets":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # JSON writes strings, numbers, booleans, arrays and the empty table as TOML reads them.
        choices = f.metadata.get("choices")
        meaning = f.metadata.get("help", "") + (f" (one of: {', '.join(map(str, choices))})" if choices else "")
        lines.append(f"# {f.name} = {json.dumps(default)}  # {meaning}")
    return "\n".join(lines)


def starter_config(name: str, image_dir: str, trigger: str, config_file: str) -> str:
    """The starter config's text: the packaged template (assets/templates/starter.toml), the keys the user
    chose, and every other key commented with the config schema's default."""
    from importlib.resources import files  # ~0.08 s: not on every command's --help

    template = string.Template(files("sdlora").joinpath("assets/templates/starter.toml").read_text("utf-8"))
    text = template.substitute(
        name=name, config_file=config_file, name_value=json.dumps(name), trigger_value=json.dumps(trigger),
        image_dir_value=json.dumps(image_dir), output_dir_value=json.dumps(f"output/{name}"),
        **{section: _commented_keys(section) for section in SECTION_CLASSES})
    config_from_dict(tomllib.loads(text))  # what it writes is a valid config, whatever the schema grows
    return text


def _cmd_new(args) -> int:
    problem = file_name_problem(args.name)
    if problem:
        raise UserError(f"NAME {args.name!r} cannot be a file name: {problem}; choose a plain name such as "
                        "pastel_style")
    out = Path(args.output or f"{args.name}.toml")
    refuse_to_overwrite(out, args.overwrite, rename="choose another NAME or -o FILE")
    images = Path(args.images) if args.images else out.parent / args.name
    # Written relative to the config's folder (how the config reads it) when it lies below it.
    image_dir = os.path.relpath(images.resolve(), out.parent.resolve())
    if image_dir.startswith(".."):
        image_dir = str(images.resolve())
    text = starter_config(args.name, Path(image_dir).as_posix(), args.trigger or args.name, out.name)
    atomic_write_text(out, text)
    print(f"wrote {out}")
    if not images.is_dir():
        print(f"next: put the style's images in {images} (a folder of your images), then "
              f"`sdlora dataset {out}`")
    else:
        print(f"next: `sdlora dataset {out}` (captions; read them), then `sdlora run {out}`")
    return 0
