"""data=hf: a Hugging Face `datasets` data set, map-style: a local folder of Parquet (or
other data) files, a folder written by `save_to_disk`, or a data set already in the local
Hugging Face cache, by name (read offline: nothing is downloaded).

The image column's cells must hold the image bytes: a cell that names a file instead is
refused, since nothing read from a data set may choose a path to read. Labels come from a
`ClassLabel` column (its names), from a list of them (multi-label), or from a column of
plain values (the sorted distinct values). The images are then read as an image folder's
are (finetune/data/folders.py): the same transforms, the same start-up check for
unreadable images, the same image cache; so the same images in the same order train
exactly as the folder does. With data.streaming=true a folder of Parquet files is read as a
stream instead (finetune/data/streaming.py).
"""

import io
import os
from typing import Any

from omegaconf import DictConfig

from finetune.data.folders import CheckedImageFolder, multi_hot
from finetune.data.hf_labels import check_known_values, column_ids, label_kind, labelled_rows, value_classes
from finetune.data.streaming import ParquetSplit, StreamedImages
from finetune.data.transforms import image_transforms
from finetune.errors import ConfigError
from finetune.model.net import InputSpec

SAVED_DICT, SAVED_ONE = "dataset_dict.json", ("state.json", "dataset_info.json")  # save_to_disk's


def local_path(cfg: DictConfig) -> str | None:
    """data.path as a local folder, or None for a data set's name (a path that does not
    exist is an error, not a name)."""
    if not cfg.path:
        raise ConfigError("data.path is not set: data=hf needs data.path=FOLDER (Parquet files, "
                          "or a folder written by save_to_disk) or the name of a data set in the "
                          "local Hugging Face cache.")
    path = os.path.expanduser(cfg.path)
    if os.path.isdir(path):
        return path
    if path.startswith(("/", ".", "~")) or os.path.exists(path):
        raise ConfigError(f"data.path={cfg.path!r} is not a folder; give a folder of Parquet "
                          "files, a folder written by save_to_disk, or a data set's name.")
    return None


def plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(
        mark in name for mark in ("/", "\\", "\0"))


def saved_folder(path: str) -> bool:
    """Whether a folder was written by save_to_disk (a DatasetDict's, or one Dataset's)."""
    return (os.path.isfile(os.path.join(path, SAVED_DICT))
            or all(os.path.isfile(os.path.join(path, name)) for name in SAVED_ONE))


def check_saved_folder(path: str) -> None:
    """A save_to_disk folder names its splits' folders and its Arrow files in JSON that
    load_from_disk joins to the folder: each must be a plain name inside it, so the data
    set cannot choose a file elsewhere for the tool to read."""
    import json

    def read(file: str) -> Any:
        try:
            with open(file) as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise ConfigError(f"data.path: {file} cannot be read as JSON: {error}") from error

    index = os.path.join(path, SAVED_DICT)
    splits = read(index).get("splits", []) if os.path.isfile(index) else [None]
    for split in splits:
        if split is not None and not plain_name(split):
            raise ConfigError(f"data.path: {index} names the split {split!r}, which is not a "
                              "plain folder name inside it; the file is damaged or crafted.")
        state = os.path.join(path, split or "", "state.json")
        files = read(state).get("_data_files", []) if os.path.isfile(state) else []
        bad = [entry for entry in files
               if not (isinstance(entry, dict) and plain_name(entry.get("filename")))]
        if bad:
            raise ConfigError(f"data.path: {state} names the data file(s) {bad[:3]!r}, not plain "
                              "file names inside its folder; the file is damaged or crafted.")


SPLIT_KEYS = {"train": "data.train_split", "val": "data.val_split", "test": "data.test_split"}
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # data file -> datasets' reader


def data_files(path: str) -> tuple[str, dict[str, list[str]]]:
    """A folder's data files by split, found by their names alone (datasets' own patterns:
    data/train-*.parquet, validation.parquet, ...), and the reader they share. Not
    load_dataset(folder): a README.md in the folder could then name files anywhere for the
    tool to read. Every file must lie inside the folder (a link out of it is refused)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
    except FileNotFoundError as error:
        raise ConfigError(f"data.path={path!r} holds no data file: {error}") from error
    root = os.path.realpath(path)
    files = {str(split): list(names) for split, names in found.items()}
    every = [name for names in files.values() for name in names]
    outside = [name for name in every
               if os.path.commonpath([root, os.path.realpath(name)]) != root]
    kinds = {os.path.splitext(name)[1].lower() for name in every}
    if outside:
        raise ConfigError(f"data.path={path!r}: {outside[0]} leads out of the folder (a link); "
                          "data files must lie inside it.")
    if len(kinds) != 1 or not kinds <= set(DATA_FILE_BUILDERS):
        raise ConfigError(f"data.path={path!r} holds {', '.join(sorted(kinds)) or 'no'} data "
                          f"files: data=hf reads a folder of {' or '.join(DATA_FILE_BUILDERS)} "
                          "files of one kind, or a folder written by save_to_disk.")
    return DATA_FILE_BUILDERS[kinds.pop()], files


def open_splits(cfg: DictConfig) -> dict[str, Any]:
    """{split name: datasets.Dataset} as the data set has them (streamed: ParquetSplit)."""
    if cfg.get("streaming"):
        return parquet_splits(cfg)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets reads it: never download
    import datasets

    if os.environ["HF_HUB_OFFLINE"] == "1":  # also when datasets was imported before (timm's hub)
        datasets.config.HF_HUB_OFFLINE = True
    path = local_path(cfg)
    cache = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else None
    try:
        if path is not None and saved_folder(path):
            check_saved_folder(path)
            found = datasets.load_from_disk(path)  # memory-mapped where it is
        elif path is not None:  # data files (their Arrow copy goes to data.cache_dir)
            builder, files = data_files(path)
            found = datasets.load_dataset(builder, data_files=files, cache_dir=cache)
        else:  # a data set already in the local Hugging Face cache, by name
            found = datasets.load_dataset(cfg.path, cache_dir=cache)
    except ConnectionError as error:
        raise ConfigError(f"data.path={cfg.path!r} is not a folder, and no data set of that name "
                          f"is in the local Hugging Face cache ({cache or 'HF_DATASETS_CACHE'}): "
                          f"{error}. Download it first with datasets' own tools, or give a "
                          "folder.") from error
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise ConfigError(f"data.path={cfg.path!r} cannot be read as a data set: {error}") from error
    return dict(found) if isinstance(found, datasets.DatasetDict) else {"train": found}


def parquet_splits(cfg: DictConfig) -> dict[str, ParquetSplit]:
    """data.streaming=true: a folder of Parquet files, each split's files found by name."""
    path = local_path(cfg)
    saved = path is not None and saved_folder(path)
    if path is None or saved:
        what = "a folder written by save_to_disk" if saved else "a data set in the Hugging Face cache"
        raise ConfigError(f"data.streaming=true: data.path={cfg.path!r} is {what}, "
                          "whose Arrow files are read where they are (memory-mapped, no copy); "
                          "set data.streaming=false. Streaming reads a folder of Parquet files.")
    builder, files = data_files(path)
    if builder != "parquet":
        raise ConfigError(f"data.streaming=true: data.path={cfg.path!r} holds {builder} files; "
                          "streaming reads Parquet files (set data.streaming=false for these).")
    return {split: ParquetSplit(names, f"the split {split!r} of {cfg.path}")
            for split, names in files.items()}


def checked_split(splits: dict[str, Any], key: str, name: str) -> Any:
    if name not in splits:
        raise ConfigError(f"{key}={name!r} is not a split of the data set: it has "
                          f"{', '.join(sorted(splits))}.")
    return splits[name]


def table_stamp(table: Any) -> str:
    """What changes when a table's data does: its Arrow files' names, sizes and times (a
    table in memory: datasets' fingerprint of it)."""
    files = [entry["filename"] for entry in table.cache_files]
    if not files:
        return table._fingerprint
    return ";".join(f"{name}|{os.stat(name).st_size}|{os.stat(name).st_mtime_ns}" for name in files)


class HfImages(CheckedImageFolder):
    """The rows of a `datasets.Dataset` (its image column read as bytes, decoded here), read
    as an image folder's files are; each sample's source is '<data.path>/<split>#<row>'."""

    def __init__(self, table: Any, rows: list[tuple[int, tuple[str, ...]]], classes: list[str],
                 image_column: str, transform, skip: bool, source: str, multi_label: bool):
        import datasets

        self.table = table.cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.source = image_column, source
        self.rows, self.listed_classes, self.multi_label = rows, classes, multi_label
        self.stamp = table_stamp(table)
        super().__init__(source, transform, skip)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.listed_classes, {name: index for index, name in enumerate(self.listed_classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], **unused) -> list:
        samples = []
        for row, labels in self.rows:
            target = (multi_hot(labels, class_to_idx) if self.multi_label
                      else class_to_idx[labels[0]])
            samples.append((f"{self.source}#{row}", target))
        return samples

    def image_bytes(self, source: str) -> bytes:
        row = int(source.rpartition("#")[2])
        cell = self.table[row][self.image_column]
        if not cell or not cell.get("bytes"):  # a path in a data set's cell is not followed
            raise ValueError(f"row {row} of {self.source} holds no image bytes (its cell names a "
                             f"file, {cell and cell.get('path')!r}, which this tool does not open)")
        return cell["bytes"]

    def image_file(self, path: str) -> io.BytesIO:
        return io.BytesIO(self.image_bytes(path))

    def source_stamp(self, path: str) -> str:
        return f"{self.stamp}|{path}"


def hf_images(cfg: DictConfig, spec: InputSpec, splits: tuple[str, ...] = ("train", "val")):
    """data=hf: (train, the last split asked for: val or test, class names); train None when
    not asked for. The classes are the training split's, whichever split is read."""
    tables = open_splits(cfg)
    train_table = checked_split(tables, "data.train_split", cfg.train_split)
    names, multi_label = label_kind(train_table, cfg)
    transforms = dict(zip(("train", "val"), image_transforms(spec, cfg.augment), strict=True))
    if cfg.get("streaming"):
        found, classes = streamed_splits(cfg, tables, names, multi_label, splits, transforms)
        return found.get("train"), found[splits[-1]], classes
    chosen = split_rows(cfg, tables, names, multi_label, splits)
    classes = names or value_classes(train_table[cfg.label_column])
    if names is None:
        check_known_values(chosen, classes, cfg)
    found = {split: HfImages(table, rows, classes, cfg.image_column,
                             transforms.get(split, transforms["val"]), cfg.bad_images == "skip",
                             f"{cfg.path}/{name}", multi_label)
             for split, (table, rows, name) in chosen.items()}
    return found.get("train"), found[splits[-1]], classes


def streamed_splits(cfg: DictConfig, tables: dict[str, ParquetSplit], names: list[str] | None,
                    multi_label: bool, splits: tuple[str, ...], transforms: dict
                    ) -> tuple[dict[str, StreamedImages], list[str]]:
    """{split: its stream} and the class names; the labels read as class ids, column-wise."""
    import pyarrow.compute as pc

    classes = names or value_classes(
        pc.unique(tables[cfg.train_split].column(cfg.label_column)).to_pylist())
    found = {}
    for split in splits:
        name = cfg[SPLIT_KEYS[split].removeprefix("data.")]
        table = checked_split(tables, SPLIT_KEYS[split], name)
        labels = column_ids(table.column(cfg.label_column), cfg, names, multi_label, classes, name)
        found[split] = StreamedImages(table, labels, classes, cfg.image_column,
                                      transforms.get(split, transforms["val"]),
                                      cfg.bad_images == "skip", cfg.batch_size, cfg.shuffle_buffer)
    return found, classes


def split_rows(cfg: DictConfig, tables: dict[str, Any], names: list[str] | None,
               multi_label: bool, splits: tuple[str, ...]) -> dict[str, tuple[Any, list, str]]:
    """{split: (table, rows, its name in the data set)} for the splits asked for; without
    data.val_split (data.val_fraction set), a fixed share of the training split validates."""
    from finetune.data.csv_data import fraction_split

    chosen = {}
    if cfg.val_fraction is not None and ("train" in splits or "val" in splits):
        table = tables[cfg.train_split]
        train, val = fraction_split(labelled_rows(table, cfg, names, multi_label, cfg.train_split),
                                    cfg.val_fraction, not multi_label, f"{cfg.path} {cfg.train_split}",
                                    "Give a validation split (data.val_split) or more images.")
        chosen = {"train": (table, sorted(train), cfg.train_split),
                  "val": (table, sorted(val), cfg.train_split)}
    for split in splits:
        if split not in chosen:
            name = cfg[SPLIT_KEYS[split].removeprefix("data.")]
            table = checked_split(tables, SPLIT_KEYS[split], name)
            chosen[split] = (table, labelled_rows(table, cfg, names, multi_label, name), name)
    return {split: chosen[split] for split in splits}
