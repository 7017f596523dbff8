"""data=hf labels: which kind the label column is, each row's classes, and the refusal of a
row without a valid label, the same for map-style tables and streams.

Map-style keeps (row, class names) per row, as an image folder keeps a target per file. A
stream may have millions of rows, so its labels are read with pyarrow's compute functions
into one array of class ids (ClassIds): no Python object per row, and nothing for a loader
worker's copy-on-write to copy.
"""

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from finetune.errors import ConfigError

MAX_LISTED = 5  # rows or classes an error lists
INVALID, UNKNOWN = -1, -2  # a value's class id: no valid label; a value the training split lacks


def label_kind(table: Any, cfg: DictConfig) -> tuple[list[str] | None, bool]:
    """(class names from the features or None for plain values, multi-label), once the
    columns the config names are found."""
    import datasets

    features = table.features
    for key in ("image_column", "label_column"):
        if cfg[key] not in features:
            raise ConfigError(f"data.{key}={cfg[key]!r} is not a column of the data set: its "
                              f"columns are {list(features)}.")
    if not isinstance(features[cfg.image_column], datasets.Image):
        raise ConfigError(f"data.image_column={cfg.image_column!r} holds "
                          f"{features[cfg.image_column]}, not images (datasets.Image).")
    label = features[cfg.label_column]
    inner = getattr(label, "feature", None)
    multi_label = isinstance(inner, datasets.ClassLabel)
    if multi_label != bool(cfg.multi_label):
        holds = ("a list of labels per image: set data.multi_label=true" if multi_label
                 else "one label per image: set data.multi_label=false")
        raise ConfigError(f"data.multi_label={cfg.multi_label}: the column data.label_column="
                          f"{cfg.label_column!r} holds {label}, {holds}.")
    if multi_label:
        return list(inner.names), True
    if isinstance(label, datasets.ClassLabel):
        return list(label.names), False
    if isinstance(label, datasets.Value):
        return None, False
    raise ConfigError(f"data.label_column={cfg.label_column!r} holds {label}: use a ClassLabel "
                      "column, a list of them (multi-label), or a column of plain values.")


def plain_value(value: Any) -> bool:
    """Whether a plain label column's cell holds a label (not empty, not NaN)."""
    return value is not None and str(value) != "" and value == value  # NaN != NaN


def value_classes(values: Iterable) -> list[str]:
    """A plain label column's classes: its distinct values, sorted as what they are (numbers
    as numbers), as text."""
    return [str(value) for value in sorted({value for value in values if plain_value(value)})]


def without_label(cfg: DictConfig, split: str, names: list[str] | None, rows: list[str],
                  count: int) -> ConfigError:
    allowed = f"class ids 0 to {len(names) - 1}" if names else "a value"
    return ConfigError(f"data.label_column={cfg.label_column!r}, split {split!r}: {count} row(s) "
                       f"without a valid label ({allowed}): {'; '.join(rows[:MAX_LISTED])}.")


def outside_training(cfg: DictConfig, split: str, classes: list[str], rows: list[str],
                     count: int) -> ConfigError:
    listed = ", ".join(classes[:MAX_LISTED]) + (", ..." if len(classes) > MAX_LISTED else "")
    return ConfigError(f"data.label_column={cfg.label_column!r}, split {split!r}: {count} row(s) "
                       f"with a label the training split {cfg.train_split!r} does not have (its "
                       f"{len(classes)} classes: {listed}): {'; '.join(rows[:MAX_LISTED])}.")


def labelled_rows(table: Any, cfg: DictConfig, names: list[str] | None, multi_label: bool,
                  split: str) -> list[tuple[int, tuple[str, ...]]]:
    """Map-style: (row, its labels as class names) per row. A row without a valid label (a
    class id outside the class list: datasets writes -1 for "no label"; an empty value) is
    refused, naming the row. A multi-label row may have none."""
    rows, problems = [], []
    for row, value in enumerate(table[cfg.label_column]):
        ids = list(value or []) if multi_label else [value]  # a null list: no label
        if names is None and plain_value(value):
            rows.append((row, (str(value),)))
        elif names is not None and all(valid_id(item, names) for item in ids):
            rows.append((row, tuple(sorted({names[item] for item in ids}))))
        else:
            problems.append(f"row {row}: {value!r}")
    if problems:
        raise without_label(cfg, split, names, problems, len(problems))
    return rows


def valid_id(value: Any, names: list[str]) -> bool:
    return isinstance(value, int) and 0 <= value < len(names)


def check_known_values(chosen: dict[str, tuple[Any, list, str]], classes: list[str],
                       cfg: DictConfig) -> None:
    """Map-style, a plain label column: its classes are the training split's values (so a
    checkpoint means the same classes whichever split is read later); another split's value
    outside them is refused, naming its rows."""
    known = set(classes)
    for _, rows, name in chosen.values():
        unknown = [f"row {row}: {labels[0]!r}" for row, labels in rows if labels[0] not in known]
        if unknown:
            raise outside_training(cfg, name, classes, unknown, len(unknown))


class ClassIds:
    """A streamed split's labels: row r's class ids are ids[r] (one label), or
    ids[starts[r]:starts[r + 1]] (multi-label)."""

    def __init__(self, ids: np.ndarray, starts: np.ndarray | None, classes: int):
        self.ids, self.starts, self.classes = ids, starts, classes

    def __len__(self) -> int:
        return len(self.ids) if self.starts is None else len(self.starts) - 1

    def target(self, row: int) -> int | torch.Tensor:
        """Row's target: its class id, or (multi-label) 1 for each of its classes."""
        if self.starts is None:
            return int(self.ids[row])
        target = torch.zeros(self.classes)
        target[torch.from_numpy(self.ids[self.starts[row]:self.starts[row + 1]])] = 1.0
        return target

    def targets(self) -> torch.Tensor:
        """Every row's target (multi-label: a row of 0/1 per image)."""
        if self.starts is None:
            return torch.from_numpy(self.ids)
        rows = torch.from_numpy(np.repeat(np.arange(len(self)), np.diff(self.starts)))
        dense = torch.zeros(len(self), self.classes)
        dense[rows, torch.from_numpy(self.ids)] = 1.0
        return dense


def column_ids(column: Any, cfg: DictConfig, names: list[str] | None, multi_label: bool,
               classes: list[str], split: str) -> ClassIds:
    """A streamed split's label column (a pyarrow ChunkedArray) as class ids, checked as
    labelled_rows and check_known_values check a table's rows."""
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy() if multi_label else None
    values = pc.list_flatten(column) if multi_label else column
    distinct = pc.unique(values)  # few: each is mapped to its class id once
    index = {name: number for number, name in enumerate(classes)}
    ids_of_distinct = np.array([class_id(value, names, index) for value in distinct.to_pylist()],
                               dtype=np.int64)
    ids = ids_of_distinct[pc.index_in(values, value_set=distinct).to_numpy()]
    starts = None if lengths is None else np.concatenate(([0], np.cumsum(lengths)))
    for code, error in ((INVALID, without_label), (UNKNOWN, outside_training)):
        bad = np.flatnonzero(ids == code)
        if len(bad):
            rows = np.unique(np.searchsorted(starts, bad, side="right") - 1) if multi_label else bad
            listed = [f"row {row}: {column[int(row)].as_py()!r}" for row in rows[:MAX_LISTED]]
            raise error(cfg, split, names if code == INVALID else classes, listed, len(rows))
    return ClassIds(ids, starts, len(classes))


def class_id(value: Any, names: list[str] | None, index: dict[str, int]) -> int:
    if names is not None:
        return value if valid_id(value, names) else INVALID
    if not plain_value(value):
        return INVALID
    return index.get(str(value), UNKNOWN)
