"""Image files as data sets: an image folder (train/ and val/ folders, or one folder split
by data.val_fraction) and the images a CSV lists, each checked at start-up (missing,
empty or unreadable files named), read through the image cache when it is on."""

import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.utils.data import default_collate
from torchvision import datasets

from finetune.config.schemas import is_multi_label
from finetune.data.image_check import checked_unreadable
from finetune.data.images import open_image, read_image
from finetune.data.transforms import Prepared, image_transforms
from finetune.errors import ConfigError
from finetune.model.net import InputSpec

log = logging.getLogger(__name__)


def check_data_paths(cfg: DictConfig, splits: tuple[str, ...] = ("train", "val")) -> None:
    """data=imagefolder: data.root holds the split folders, or (no train/) the class folders
    themselves; data=csv: data.file exists. A stat or two, so it runs before anything is
    built."""
    if cfg.name == "csv":
        from finetune.data.csv_data import csv_path

        csv_path(cfg)
        return
    if cfg.name != "imagefolder":
        return
    if not cfg.root:
        raise ConfigError("data.root is not set: data=imagefolder needs data.root=PATH where "
                          "PATH/train/<class>/ and PATH/val/<class>/ hold the images (or "
                          "PATH/<class>/, split by data.val_fraction).")
    root = os.path.expanduser(cfg.root)
    if not os.path.isdir(root):
        raise ConfigError(f"data.root={cfg.root!r}: {root} does not exist (or is not a folder); "
                          "give the folder holding train/<class>/ and val/<class>/, or a folder "
                          "per class.")
    if not split_folders(cfg):
        return
    for split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise ConfigError(f"data.root={cfg.root!r}: {os.path.join(root, split)} does not "
                              "exist; the root must hold train/<class>/ and val/<class>/ folders"
                              f"{' (and test/<class>/ for data.split=test)' if split == 'test' else ''}.")


def split_folders(cfg: DictConfig) -> bool:
    """Whether an image folder is laid out as train/ and val/ (and perhaps test/) folders,
    rather than one folder per class under data.root."""
    return os.path.isdir(os.path.join(os.path.expanduser(cfg.root), "train"))


def image_folder(cfg: DictConfig, split: str, transform) -> "CheckedImageFolder":
    folder = os.path.join(os.path.expanduser(cfg.root), split)
    try:
        return CheckedImageFolder(folder, transform, skip=cfg.bad_images == "skip")
    except (FileNotFoundError, RuntimeError) as error:
        raise folder_error(cfg, folder, f"{split}/", error) from error


def folder_error(cfg: DictConfig, folder: str, prefix: str, error: Exception) -> ConfigError:
    """What ImageFolder's error means: the empty class folders named (`prefix` + name), else
    its own text."""
    empty = empty_class_folders(folder)
    if empty:
        return ConfigError(f"data.root={cfg.root!r}: {', '.join(prefix + name for name in empty)} "
                           "holds no image file (.jpg, .png, ...); add images or remove the folder.")
    return ConfigError(f"data.root={cfg.root!r}: {error}")


def empty_class_folders(folder: str) -> list[str]:
    """The class folders under `folder` with no image file in them (at any depth)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))
                  and not any(file.lower().endswith(datasets.folder.IMG_EXTENSIONS)
                              for _, _, files in os.walk(os.path.join(folder, name)) for file in files))


def image_folders(cfg: DictConfig, spec: InputSpec, splits: tuple[str, ...] = ("train", "val")):
    """data=imagefolder: (train, val, class names), a split not asked for None. ROOT/train
    and ROOT/val (and ROOT/test) with a folder per class; or the class folders directly under
    ROOT, data.val_fraction of each class to validation (fixed, as for a CSV without splits)."""
    check_data_paths(cfg, splits)
    transforms = dict(zip(("train", "val"), image_transforms(spec, cfg.augment), strict=True))
    if not split_folders(cfg):
        return one_folder(cfg, transforms, splits)
    found = {split: image_folder(cfg, split, transforms.get(split, transforms["val"]))
             for split in splits}
    classes = next(iter(found.values())).classes
    for split, dataset in found.items():
        if dataset.classes != classes:
            raise ConfigError(f"data.root={cfg.root!r}: {splits[0]} and {split} have different "
                              f"class folders ({classes} vs {dataset.classes}); they must match.")
    return found.get("train"), found.get(splits[-1]), classes


def one_folder(cfg: DictConfig, transforms: dict[str, Prepared], splits: tuple[str, ...]):
    """The class folders directly under data.root, split by data.val_fraction per class."""
    from finetune.data.csv_data import fraction_split

    if "test" in splits:
        raise ConfigError(f"data.split=test: data.root={cfg.root!r} holds the class folders "
                          "themselves, so it has no test split; lay it out as train/, val/ and "
                          "test/ folders (each with a folder per class).")
    root = os.path.expanduser(cfg.root)
    try:
        classes, class_to_index = datasets.folder.find_classes(root)
        samples = datasets.folder.make_dataset(root, class_to_index, datasets.folder.IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as error:
        raise folder_error(cfg, root, "", error) from error
    pairs = [(path, (classes[index],)) for path, index in samples]
    train, val = fraction_split(pairs, cfg.val_fraction, True, root,
                                "Lay it out as train/ and val/ folders, or add images.")
    skip = cfg.bad_images == "skip"
    return (CsvImages(train, classes, transforms["train"], skip, root) if "train" in splits else None,
            CsvImages(val, classes, transforms["val"], skip, root), classes)


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder that names unreadable files: found by check_images at start-up (the data
    stage calls it once the data sets are built), they are left out with one warning naming
    each (`skip`) or stop the run with their names (`fail`, a ConfigError).
    A file that breaks later (a truncated JPEG passes the check) is named in the error, or
    skipped with a warning, instead of crashing a loader worker anonymously."""

    def __init__(self, root: str, transform: Prepared, skip: bool):
        super().__init__(root, transform=transform, loader=self.read_source)
        self.skip = skip
        self.decoded = None  # image_cache.DecodedImages: the fixed part, read back
        self.whole_batches = False  # the cache's batches are read whole (image_cache.read_batch)

    def check_images(self, cache_dir: str | None) -> None:
        """The start-up check (finetune/data/image_check.py, its verdict kept under cache_dir):
        unreadable images stop the run naming each, or (`skip`) are left out with a warning."""
        bad = checked_unreadable([path for path, _ in self.samples], self.open_source,
                                 self.source_stamp, cache_dir)
        named = "; ".join(f"{path} ({reason})" for path, reason in bad.items())
        if bad and not self.skip:
            raise ConfigError(f"data.bad_images=fail: {len(bad)} unreadable image file(s) in "
                              f"{self.root}: {named}. Remove or replace them, or set "
                              "data.bad_images=skip.")
        if bad:
            log.warning("data.bad_images=skip: leaving out %d unreadable image file(s) in %s: %s",
                        len(bad), self.root, named)
            self.samples = [sample for sample in self.samples if sample[0] not in bad]
            self.imgs, self.targets = self.samples, [target for _, target in self.samples]

    # Where each sample's image comes from: a file here; a table's row (data=hf,
    # finetune/data/hf_data.py) or a tar shard's member (data=webdataset, shards.py) in the
    # subclasses, which override image_file and source_stamp. The image cache reads
    # through these too.
    def image_file(self, path: str) -> "str | io.BytesIO":
        """The image as PIL and the decoders open it: the file's path, or its bytes."""
        return path

    def read_source(self, path: str) -> torch.Tensor:
        return read_image(self.image_file(path))

    def open_source(self, path: str):
        """The image's header, for the start-up check and the image cache's size."""
        return open_image(self.image_file(path))

    def source_stamp(self, path: str) -> str:
        """What changes when the image does (the image cache's key)."""
        stat = os.stat(path)
        return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"

    def __getitems__(self, indices: list[int]):
        """A batch's samples (what DataLoader fetches), or the batch itself, read whole."""
        if self.whole_batches:
            from finetune.data.image_cache import read_batch

            return ReadWhole(read_batch(self, indices))
        return [self[index] for index in indices]

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        if self.decoded is not None:  # None: unreadable when the entry was built (it said so)
            image = self.decoded.get(index)
            return None if image is None else (self.transform.varying(image), target)
        image = read_or_skip(lambda: self.loader(path), path, self.skip)
        return None if image is None else (self.transform(image), target)


def read_or_skip(read: Callable[[], torch.Tensor], where: str, skip: bool) -> torch.Tensor | None:
    """An image read while training: one that breaks (a truncated file passes the start-up
    check; a stream checks none) is named in the error, or left out with a warning naming
    it (data.bad_images=skip: None)."""
    try:
        return read()
    except Exception as error:
        if not skip:
            raise RuntimeError(f"cannot read image {where}: {error}") from error
        log.warning("data.bad_images=skip: leaving out unreadable image %s: %s", where, error)
        return None


class CsvImages(CheckedImageFolder):
    """The images a CSV file lists (finetune/data/csv_data.py), read as an image folder's are:
    the same unreadable-file checks, and the same order (class, then path). A multi-label
    image's target is a 0/1 float vector over the classes (what BCE-with-logits takes)."""

    def __init__(self, rows: list[tuple[str, tuple[str, ...]]], classes: list[str], transform,
                 skip: bool, source: str, multi_label: bool = False):
        self.rows, self.listed_classes, self.multi_label = rows, classes, multi_label
        super().__init__(source, transform, skip)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.listed_classes, {name: index for index, name in enumerate(self.listed_classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], **unused) -> list:
        if not self.multi_label:
            return sorted((path, class_to_idx[labels[0]]) for path, labels in self.rows)
        return [(path, multi_hot(labels, class_to_idx))
                for path, labels in sorted(self.rows, key=lambda row: row[0])]


def multi_hot(labels: tuple[str, ...], class_to_idx: dict[str, int]) -> torch.Tensor:
    """A multi-label image's target: 1 for each of its classes, 0 elsewhere (what
    BCE-with-logits takes)."""
    target = torch.zeros(len(class_to_idx))
    target[[class_to_idx[label] for label in labels]] = 1.0
    return target


def csv_images(cfg: DictConfig, spec: InputSpec, splits: tuple[str, ...] = ("train", "val")):
    """data=csv: (train, the last split asked for: val or test, class names); train None
    when not asked for (not read)."""
    from finetune.data.csv_data import split_rows

    rows, classes = split_rows(cfg)
    transforms = dict(zip(("train", "val"), image_transforms(spec, cfg.augment), strict=True))
    source, skip = os.path.expanduser(cfg.file), cfg.bad_images == "skip"
    found = {split: CsvImages(rows[split], classes, transforms.get(split, transforms["val"]), skip,
                              source, is_multi_label(cfg)) for split in splits}
    return found.get("train"), found[splits[-1]], classes


@dataclass
class ReadWhole:
    """A batch a dataset read whole: (images, labels), or None when none was readable."""

    batch: tuple[torch.Tensor, torch.Tensor] | None


def collate_readable(batch: "list | ReadWhole"):
    """default_collate over the samples that could be read (CheckedImageFolder gives None);
    None when there are none. A batch read whole is already one."""
    if isinstance(batch, ReadWhole):
        return batch.batch
    readable = [sample for sample in batch if sample is not None]
    return default_collate(readable) if readable else None
