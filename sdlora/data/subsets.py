"""Subsets, kohya's unit of a dataset: a folder, its repeats and its caption rules.

The configured subsets are the `[[dataset.subsets]]` tables, or the `[dataset]` keys as
the one-subset shorthand. A configured folder that holds kohya's layout is read as kohya
reads it:

- a child folder named `N_words` (N an integer >= 1) is a subset with N repeats and
  class tokens `words` (kohya's `generate_dreambooth_subsets_config_by_subdirs`: the name
  split on the first `_`; folders whose prefix is not an integer are ignored);
- `img/` and `reg/` children (the kohya_ss GUI's project layout) hold the training and
  the regularisation `N_words` folders;
- `[dataset] reg_dir` (kohya's `reg_data_dir`) holds regularisation `N_words` folders.

Images lying directly in a kohya root are not trained, as in kohya; the log says so.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.config import SUBSET_SHARED_KEYS, Config, Subset
from sdlora.data.images import scan_images
from sdlora.errors import UserError


def configured_subsets(cfg: Config) -> list[Subset]:
    """`[[dataset.subsets]]`, or one subset made of the `[dataset]` keys."""
    d = cfg.dataset
    if d.subsets:
        return list(d.subsets)
    return [Subset(**{k: getattr(d, k) for k in SUBSET_SHARED_KEYS})]


def repeat_folder(name: str) -> tuple[int, str] | None:
    """kohya's `N_words` folder name -> (N, "words"); None when the prefix is not an integer >= 1."""
    head, sep, words = name.partition("_")
    if not sep or not head.isdigit() or int(head) < 1:
        return None
    return int(head), words


def _repeat_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and repeat_folder(p.name)) if root.is_dir() else []


def _from_folder(base: Subset, folder: Path, is_reg: bool) -> Subset:
    repeats, words = repeat_folder(folder.name)
    values = {k: getattr(base, k) for k in SUBSET_SHARED_KEYS if k not in ("image_dir", "num_repeats")}
    return Subset(image_dir=str(folder), num_repeats=repeats, class_tokens=words or base.class_tokens, is_reg=is_reg,
                  validation=base.validation and not is_reg,
                  origin=f"folder {folder.name}", **values)


def resolve_subsets(cfg: Config, log=print) -> list[Subset]:
    """The subsets training reads, kohya folder trees expanded; logs how each tree was read."""
    out: list[Subset] = []
    for base in configured_subsets(cfg):
        folder = Path(base.image_dir)
        if not folder.is_dir():
            raise UserError(f"{cfg.source}: [dataset] image_dir = {folder} does not exist; point it at your "
                            "image folder (relative to the config file)")
        roots = [(folder, base.is_reg), (folder / "img", base.is_reg), (folder / "reg", True)]
        found = [(f, reg) for root, reg in roots for f in _repeat_folders(root)]
        if not found:
            out.append(Subset(**{k: getattr(base, k) for k in SUBSET_SHARED_KEYS if k != "image_dir"},
                              image_dir=str(folder), class_tokens=base.class_tokens, is_reg=base.is_reg,
                              validation=base.validation))
            continue

        expanded = [_from_folder(base, f, reg) for f, reg in found]
        log(f"{folder} is a kohya folder tree: " + "; ".join(
            f"{Path(s.image_dir).relative_to(folder).as_posix()} -> {'regularisation ' if s.is_reg else ''}subset "
            f"x{s.num_repeats} repeats, class tokens '{s.class_tokens}'" for s in expanded))
        inside = {f for f, _ in found}
        loose = [p for p in scan_images(folder) if not any(q in p.parents for q in inside)]
        if loose:
            log(f"warning: {len(loose)} image(s) in {folder} outside its N_words folders are not trained "
                f"(e.g. {loose[0].relative_to(folder).as_posix()}); kohya reads only N_words folders")
        out += expanded
    if cfg.dataset.reg_dir:
        reg = Subset(**{k: getattr(configured_subsets(cfg)[0], k) for k in SUBSET_SHARED_KEYS},
                           is_reg=True, validation=False)
        folders = _repeat_folders(Path(cfg.dataset.reg_dir))
        if not folders:
            raise UserError(f"{cfg.source}: [dataset] reg_dir = {cfg.dataset.reg_dir} holds no N_words folder "
                            "(e.g. 1_scenery); put the regularisation images in one")
        out += [_from_folder(reg, f, True) for f in folders]
    return out


def balanced_repeats(counts: list[int], repeats: list[int], is_reg: list[bool]) -> list[list[int]]:
    """Per-image repeats for each subset, kohya's rule for regularisation images.

    counts[i] images in subset i; training images repeat `repeats[i]` times. Regularisation
    images are then visited in order (subset by subset), each registered with its subset's
    repeats, until their total reaches the training total N = sum(count x repeats); while
    short, further rounds add one repeat per image. Reg images not reached get 0 (kohya's
    "some of reg images are not used"). Returns one list of repeats per subset.
    """
    out = [[r if not reg else 0] * n for n, r, reg in zip(counts, repeats, is_reg)]
    n_train = sum(n * r for n, r, reg in zip(counts, repeats, is_reg) if not reg)
    reg_slots = [(i, j) for i, reg in enumerate(is_reg) if reg for j in range(counts[i])]
    total, first = 0, True
    while reg_slots and total < n_train:
        for i, j in reg_slots:
            step = repeats[i] if first else 1
            out[i][j] += step
            total += step
            if total >= n_train:
                break
        first = False
    return out

