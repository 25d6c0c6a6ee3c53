"""`sdlora run CONFIG`: the whole job of `bash train.sh NAME`.

dataset (captions, report) -> train (skipped when the adapter is up to date) -> samples
and grids -> style figures -> where everything is. Each stage reuses its caches, so a
second run of an unchanged config re-encodes and retrains nothing.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.adapters.file import read_adapter
from sdlora.config import Config
from sdlora.data import dataset
from sdlora.data.dataset import Manifest
from sdlora.digest import stored_digest
from sdlora.io import atomic_write_text, refuse_to_overwrite
from sdlora.models.load import base_weights_file
from sdlora.sampling import sampler
from sdlora.sampling.metrics import style_shift
from sdlora.training import loop, results
from sdlora.training.examples import collect_examples
from sdlora.training.stats import config_hash


def adapter_up_to_date(cfg: Config, path: Path, manifest: Manifest | None = None) -> bool:
    """True when `path` was trained from exactly this config, base and dataset (the run's manifest,
    resolved here when None: no image is scanned or decoded).

    The base counts by content: the sha256 its metadata records (ss_new_sd_model_hash) must be
    that of the file now at model.base, so another model copied over the same path retrains.
    """

    if not path.is_file():
        return False
    _, metadata = read_adapter(path)
    if metadata.get("sdlora_config_hash") != config_hash(cfg, collect_examples(cfg, lambda m: None, manifest)):
        return False
    weights = base_weights_file(cfg.model)
    return weights is None or metadata.get("ss_new_sd_model_hash") == stored_digest(
        weights, cfg.output_dir / "cache" / "base_digests.json")


def style_figures(cfg: Config, rendered, manifest: Manifest) -> dict | None:
    """Colourfulness and palette distance of scale-1.0 samples vs the base (scale 0), same prompts and seeds."""
    from PIL import Image

    base = [Image.open(r.path) for r in rendered if r.scale == 0.0]
    lora = [Image.open(r.path) for r in rendered if r.scale == 1.0]
    if not base or not lora:
        return None
    return style_shift(base, lora, manifest.style_images())


def append_style_report(cfg: Config, figures: dict) -> None:
    report = cfg.report_path
    text = report.read_text() if report.exists() else f"# {cfg.output_name}\n"
    section = "\n## Style shift (samples at LoRA scale 1.0 vs the base, same prompts and seeds)\n\n"
    marker = section.strip().splitlines()[0]
    if marker in text:
        text = text[: text.index(marker)].rstrip() + "\n"
    rows = [
        "| figure | base (scale 0) | LoRA (scale 1.0) | style set |", "|---|---|---|---|",
        f"| colourfulness (Hasler-Suesstrunk) | {figures['colourfulness_base']:.1f} | "
        f"{figures['colourfulness_lora']:.1f} | {figures['colourfulness_style_set']:.1f} |",
        f"| palette distance to the style set (CIELAB delta-E) | {figures['palette_distance_base']:.1f} | "
        f"{figures['palette_distance_lora']:.1f} | 0 |",
        f"| lightness L* (mean +- spread) | {results.lab_text(figures['lab_base'])} | {results.lab_text(figures['lab_lora'])} | "
        f"{results.lab_text(figures['lab_style_set'])} |",
        f"| chroma C* (0 = grey) | {figures['lab_base']['chroma']:.0f} | {figures['lab_lora']['chroma']:.0f} | "
        f"{figures['lab_style_set']['chroma']:.0f} |",
        "", f"Colourfulness ratio LoRA / base: **{figures['colourfulness_ratio']:.2f}x**", "", results.PALETTE_NOTE, "",
    ]
    atomic_write_text(report, text + section + "\n".join(rows))


def run(cfg: Config, log=print) -> dict:
    out = cfg.output_dir
    sampler.sample_prompts(cfg)  # stage 3's prompts, refused now rather than after the training
    log("== 1/3 dataset: validate, tag, prune, captions, manifest")
    manifest = dataset.build_dataset(cfg, log=log).manifest  # the run's one manifest, handed to every stage
    final = cfg.adapter_path()
    trained = None  # the TrainResult, when this run trains
    if adapter_up_to_date(cfg, final, manifest):
        log(f"== 2/3 train: {final} is up to date with this config and dataset; not retraining")
        after = results.after_training(cfg, manifest, log=log, trained=False)
    else:
        log("== 2/3 train")
        refuse_to_overwrite(final, cfg.train.overwrite, "rerun with --set train.overwrite=true",
                            why=" but was trained with other settings or images",
                            rename="set output.output_name to another name")
        trained = loop.train(cfg, log=log, manifest=manifest)
        after = results.after_training(cfg, manifest, log=log)
    log("== 3/3 samples")
    # the trainer's previews noted the [sample] keys its family ignores
    result = sampler.run_sample(cfg, loras=[(final, None)], log=log,
                                setting_notes=trained is None or not cfg.sample.every_n_epochs)
    figures = style_figures(cfg, result.images, manifest)
    if figures:
        append_style_report(cfg, figures)
        log(f"style: colourfulness {figures['colourfulness_base']:.1f} -> {figures['colourfulness_lora']:.1f} "
            f"({figures['colourfulness_ratio']:.2f}x); palette distance to the style set "
            f"{figures['palette_distance_base']:.1f} -> {figures['palette_distance_lora']:.1f} delta-E")
    paths = {"adapter": final, "samples": result.folder, "report": cfg.report_path,
             "dataset report": out / dataset.REPORT_MD}
    if "resized" in after:
        paths["resized adapter"] = after["resized"]["path"]
    log("\nDone.")
    for name, path in paths.items():
        log(f"  {name:15s} {path}")
    return {"paths": paths, "figures": figures, "sample": result, "train": trained, **after}
