"""data=csv: images listed in a CSV or TSV file, one row per image, with its label.

The file names each image (relative to data.root, by default the file's folder) in
`data.image_column` and its class in `data.label_column`. The split comes from
`data.split_column` (train / val) when the file has it, else a stratified split of
`data.val_fraction`, fixed (seed 0) whatever the run's seed. The images are then read as an
image folder's are: the same transforms, the same check for unreadable files, and the
same order (class, then path), so a CSV listing an image folder trains exactly as the
folder does. A bad row is named by its line number.

Multi-label data lists several labels per image, either in the label column separated by
`data.label_delimiter`, or as one 0/1 column per class (`data.label_columns`). An image
may then have no label at all (an empty cell, or 0 in every column). Its split, without a
split column, is a random one (scikit-learn cannot stratify label sets), again fixed.
"""

import codecs
import csv
import os
from collections.abc import Sequence

from omegaconf import DictConfig

from finetune.config.schemas import is_multi_label
from finetune.errors import ConfigError

SPLITS = ("train", "val", "test")  # a test row is never trained or validated on
SPLIT_SEED = 0
MAX_NAMED = 5  # bad rows named in one error
CHUNK = 1 << 20  # bytes read at a time to find the line that is not UTF-8


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
    """(line number, row) for every data row; the columns the config names must exist. A
    file the csv module cannot parse, or that is not UTF-8, is named with its line."""
    path = csv_path(cfg)
    tsv = path.endswith(".tsv")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if tsv else ",")
        try:
            return checked_rows(reader, cfg)
        except csv.Error as error:  # a cell over csv.field_size_limit(), say
            raise ConfigError(f"data.file={cfg.file!r}: line {reader.reader.line_num} cannot be "
                              f"parsed ({error}); data=csv reads a {'TSV' if tsv else 'CSV'} file "
                              f"with cells of at most {csv.field_size_limit():,} characters. Fix "
                              "that line.") from error
        except UnicodeDecodeError as error:  # decoded in chunks: the line is found again
            raise ConfigError(f"data.file={cfg.file!r}: line {undecodable_line(path)} is not UTF-8 "
                              f"({error.reason}); data=csv reads files as UTF-8 (a byte order mark "
                              "allowed). Save the file as UTF-8 (in a spreadsheet: CSV UTF-8).") from error


def undecodable_line(path: str) -> int:
    """The line of the file's first byte that is not UTF-8, read in chunks (a file without
    line breaks could be any size)."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as stream:
        while True:
            chunk = stream.read(CHUNK)
            try:  # final (at the end): a character cut short there is an error too
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:  # error.object: the bytes held over, then chunk
                return line + error.object.count(b"\n", 0, error.start)
            if not chunk:
                return line
            line += chunk.count(b"\n")


def checked_rows(reader: csv.DictReader, cfg: DictConfig) -> list[tuple[int, dict[str, str]]]:
    """The reader's rows, once the columns the config names are found in its header."""
    columns = reader.fieldnames or []
    named = [(f"data.image_column={cfg.image_column!r}", cfg.image_column)]
    if cfg.label_columns:
        named += [(f"data.label_columns: {column!r}", column) for column in cfg.label_columns]
    else:
        named.append((f"data.label_column={cfg.label_column!r}", cfg.label_column))
    for key, column in named:
        if column not in columns:
            raise ConfigError(f"{key} is not a column of {cfg.file}: its columns are {columns}.")
    return [(reader.line_num, row) for row in reader]


def row_labels(row: dict[str, str], cfg: DictConfig) -> tuple[tuple[str, ...], str | None]:
    """The row's labels, and what is wrong with them (None when nothing is)."""
    if cfg.label_columns:
        values = {column: (row.get(column) or "").strip() for column in cfg.label_columns}
        wrong = [f"{column}={value!r}" for column, value in values.items() if value not in ("0", "1")]
        if wrong:
            return (), f"{', '.join(wrong)} (a label column holds 0 or 1)"
        return tuple(column for column, value in values.items() if value == "1"), None
    text = (row.get(cfg.label_column) or "").strip()
    if cfg.label_delimiter:
        return tuple(sorted({label.strip() for label in text.split(cfg.label_delimiter)
                             if label.strip()})), None
    return (text,), None if text else "empty label"


def refuse(problems: Sequence[str], cfg: DictConfig) -> None:
    if problems:
        more = f" (and {len(problems) - MAX_NAMED} more)" if len(problems) > MAX_NAMED else ""
        raise ConfigError(f"data.file={cfg.file!r}: {len(problems)} bad row(s): "
                          f"{'; '.join(problems[:MAX_NAMED])}{more}.")


Labels = tuple[str, ...]  # one label, or a multi-label image's (perhaps none)


def labelled_images(cfg: DictConfig) -> list[tuple[str, Labels, str | None, int]]:
    """(image path, labels, split or None, line) per row; missing files, empty or invalid
    labels and unknown split names are refused together, each with its line."""
    root = image_root(cfg)
    rows, problems = [], []
    for line, row in read_rows(cfg):
        image = (row.get(cfg.image_column) or "").strip()
        labels, wrong = row_labels(row, cfg)
        split = row.get(cfg.split_column) if cfg.split_column else None
        path = os.path.join(root, image)
        if not image or wrong:
            problems.append(f"line {line}: {'empty image path' if not image else wrong}")
        elif not os.path.isfile(path):
            problems.append(f"line {line}: {path} does not exist")
        elif split is not None and split.strip() not in SPLITS:
            problems.append(f"line {line}: split {split!r} is not train, val or test")
        rows.append((path, labels, split.strip() if split is not None else None, line))
    refuse(problems, cfg)
    if not rows:
        raise ConfigError(f"data.file={cfg.file!r} lists no image.")
    return rows


def class_names(cfg: DictConfig, rows: list[tuple[str, Labels, str | None, int]]) -> list[str]:
    """Sorted by name; the label columns' own order for 0/1 columns."""
    if cfg.label_columns:
        return list(cfg.label_columns)
    return sorted({label for _, labels, _, _ in rows for label in labels})


Rows = list[tuple[str, Labels]]  # (path, labels)


def split_rows(cfg: DictConfig) -> tuple[dict[str, Rows], list[str]]:
    """({split: rows} for train, val and test, class names)."""
    rows = labelled_images(cfg)
    classes = class_names(cfg, rows)
    if rows[0][2] is not None:  # the file's own split
        return {name: [(path, labels) for path, labels, split, _ in rows if split == name]
                for name in SPLITS}, classes
    pairs = [(path, labels) for path, labels, _, _ in rows]
    train, val = fraction_split(pairs, cfg.val_fraction, not is_multi_label(cfg), f"{cfg.file}",
                                "Add a split column (data.split_column) or images.")
    return {"train": train, "val": val, "test": []}, classes


def fraction_split(pairs: Rows, fraction: float, single_label: bool, what: str,
                   advice: str) -> tuple[Rows, Rows]:
    """A fixed split (seed 0, whatever the run's seed) of `fraction` of the images to
    validation: per class for single-label data (scikit-learn cannot stratify label sets)."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(pairs, test_size=fraction, random_state=SPLIT_SEED,
                                stratify=[labels[0] for _, labels in pairs] if single_label else None)
    except ValueError as error:
        raise ConfigError(f"data.val_fraction={fraction} cannot split the {len(pairs)} images of "
                          f"{what} by class: {error} {advice}") from error
