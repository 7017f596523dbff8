"""data=csv: images listed in a CSV or TSV file, one row per image, with its label.

The file names each image (relative to data.root, by default the file's folder) in
`data.image_column` and its class in `data.label_column`. The split comes from
`data.split_column` (train / val) when the file has it, else a stratified split of
`data.val_fraction`, fixed (seed 0) whatever the run's seed. The images are then read as an
image folder's are: the same transforms, the same check for unreadable files, and the
same order (class, then path), so a CSV listing an image folder trains exactly as the
folder does. A bad row is named by its line number.
"""

import csv
import os
from collections.abc import Sequence

from omegaconf import DictConfig

from finetune.errors import ConfigError

SPLITS = ("train", "val")
SPLIT_SEED = 0
MAX_NAMED = 5  # bad rows named in one error


def csv_path(cfg: DictConfig) -> str:
    if not cfg.file:
        raise ConfigError("data.file is not set: data=csv needs data.file=PATH, a CSV or TSV "
                          "file with an image path column and a label column.")
    path = os.path.expanduser(cfg.file)
    if not os.path.isfile(path):
        raise ConfigError(f"data.file={cfg.file!r} does not exist.")
    return path


def image_root(cfg: DictConfig) -> str:
    return os.path.expanduser(cfg.root) if cfg.root else os.path.dirname(os.path.abspath(csv_path(cfg)))


def read_rows(cfg: DictConfig) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row; the columns the config names must exist."""
    path = csv_path(cfg)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.endswith(".tsv") else ",")
        columns = reader.fieldnames or []
        for key in ("image_column", "label_column"):
            if cfg[key] not in columns:
                raise ConfigError(f"data.{key}={cfg[key]!r} is not a column of {cfg.file}: its "
                                  f"columns are {columns}.")
        return [(reader.line_num, row) for row in reader]


def refuse(problems: Sequence[str], cfg: DictConfig) -> None:
    if problems:
        more = f" (and {len(problems) - MAX_NAMED} more)" if len(problems) > MAX_NAMED else ""
        raise ConfigError(f"data.file={cfg.file!r}: {len(problems)} bad row(s): "
                          f"{'; '.join(problems[:MAX_NAMED])}{more}.")


def labelled_images(cfg: DictConfig) -> list[tuple[str, str, str | None, int]]:
    """(image path, label, split or None, line) per row; missing files, empty labels and
    unknown split names are refused together, each with its line."""
    root = image_root(cfg)
    rows, problems = [], []
    for line, row in read_rows(cfg):
        image, label = (row.get(cfg.image_column) or "").strip(), (row.get(cfg.label_column) or "").strip()
        split = row.get(cfg.split_column) if cfg.split_column else None
        path = os.path.join(root, image)
        if not image or not label:
            problems.append(f"line {line}: empty {'image path' if not image else 'label'}")
        elif not os.path.isfile(path):
            problems.append(f"line {line}: {path} does not exist")
        elif split is not None and split.strip() not in SPLITS:
            problems.append(f"line {line}: split {split!r} is not train or val")
        rows.append((path, label, split.strip() if split is not None else None, line))
    refuse(problems, cfg)
    if not rows:
        raise ConfigError(f"data.file={cfg.file!r} lists no image.")
    return rows


def split_rows(cfg: DictConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(train rows, val rows, class names): (path, label) pairs, classes sorted by name."""
    rows = labelled_images(cfg)
    classes = sorted({label for _, label, _, _ in rows})
    if rows[0][2] is not None:  # the file's own split
        train = [(path, label) for path, label, split, _ in rows if split == "train"]
        val = [(path, label) for path, label, split, _ in rows if split == "val"]
        return train, val, classes
    from sklearn.model_selection import train_test_split

    pairs = [(path, label) for path, label, _, _ in rows]
    try:
        train, val = train_test_split(pairs, test_size=cfg.val_fraction, random_state=SPLIT_SEED,
                                      stratify=[label for _, label in pairs])
    except ValueError as error:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} cannot split the {len(pairs)} "
                          f"images of {cfg.file} by class: {error} Add a split column "
                          f"(data.split_column) or images.") from error
    return train, val, classes
