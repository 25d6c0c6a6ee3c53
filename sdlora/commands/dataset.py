"""`sdlora dataset CONFIG`: validate, de-duplicate and auto-tag the images, write the manifest."""

from __future__ import annotations

from sdlora.config import add_override_argument, load_config


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "dataset", help="validate, de-duplicate and auto-tag a folder of images (writes .txt captions)",
        description="Step one of the pipeline. Validates every image of [dataset] image_dir (rejects are "
                    "listed with their reason), finds near-duplicates, auto-tags images without a caption "
                    "with the open_clip tagger ([caption] section), prunes the tags (blacklist, replace, "
                    "duplicates, style tags, trigger first, min_tag_count) and writes .txt sidecars next to "
                    "the images (or into OUTPUT/captions when the folder is read-only). Writes "
                    "dataset_report.md/.json, dataset_contact_sheet.png and dataset_manifest.json (what the "
                    "trainer reads) to [output] dir. Subsets: [[dataset.subsets]] and kohya's N_words / img / reg "
                    "folders; regularisation images are never tagged nor written to. Existing captions "
                    "are kept unless --retag. Re-running on an unchanged folder changes nothing.")
    p.add_argument("config", help="a style's TOML config (`sdlora new NAME --images DIR` writes one)")
    add_override_argument(p, "caption.threshold=0.5")
    p.add_argument("--retag", action="store_true", default=None,
                   help="re-tag images that already have captions; the old captions are kept as "
                        "NAME.txt.bak-<timestamp> (same as caption.retag = true)")
    p.add_argument("--keep-duplicates", action="store_true", default=None,
                   help="report near-duplicates but train on all of them (default: only the first of "
                        "each group is kept)")
    p.set_defaults(func=_cmd_dataset)


def _cmd_dataset(args) -> int:
    from sdlora.data.dataset import build_dataset

    cfg = load_config(args.config, args.overrides)
    build_dataset(cfg, retag=args.retag, keep_duplicates=args.keep_duplicates, log=print)
    return 0
