"""data=webdataset: image classification data in WebDataset tar shards on a local disk.

A shard is a tar file whose members are grouped into samples by key (the member name up to
its first dot in the file name: `00042.jpg` and `00042.cls` are sample `00042`), as
WebDataset writes and reads them. Local shards can be read at any place, so at start-up each
shard's member headers are indexed (tarfile, nothing extracted) and every sample is read by
its offset: map-style, like an image folder (finetune/data/folders.py). The image cache,
the feature cache, folds, the exact resume and DistributedSampler's equal share per process
then hold as for folders, whatever the number of shards.

Only the members the config names are ever read: an image (data.image_keys: jpg, png, ...)
and the label (data.label_key, an integer as text). Nothing in a shard is unpickled or
decoded by type: a `.pyd` or `.pth` member is never opened.
"""

import io
import os
import re
import tarfile
from typing import Any

from omegaconf import DictConfig

from finetune.data.folders import CheckedImageFolder
from finetune.data.transforms import image_transforms
from finetune.errors import ConfigError
from finetune.model.net import InputSpec

MAX_SHARDS = 100_000  # a brace pattern expanding to more is refused before it is listed
MAX_IMAGE_BYTES = 256 * 2**20  # an image member over this is refused (it is read whole)
MAX_LABEL_BYTES = 64
MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key, extension (WebDataset's grouping)
SPLIT_KEYS = {"train": "data.train_shards", "val": "data.val_shards", "test": "data.test_shards"}


def shard_files(cfg: DictConfig, key: str) -> list[str]:
    """The shards a brace pattern names (`/data/train-{0000..0127}.tar`), each a local tar
    file; a URL, a `pipe:` command or a missing file is refused, naming the key."""
    try:
        from braceexpand import braceexpand
    except ImportError as error:
        raise ConfigError("data=webdataset needs the webdataset extra: pip install -e "
                          "'.[webdataset]'") from error
    pattern = cfg[key.removeprefix("data.")]
    if not pattern:
        raise ConfigError(f"{key} is not set: data=webdataset needs {key}=PATTERN, e.g. "
                          "'/data/train-{0000..0127}.tar' (local tar files).")
    if "://" in pattern or pattern.startswith(("pipe:", "-")):
        raise ConfigError(f"{key}={pattern!r}: data=webdataset reads local tar files; a URL or "
                          "a pipe: command is not followed.")
    files = []
    for path in braceexpand(os.path.expanduser(pattern)):
        files.append(path)
        if len(files) > MAX_SHARDS:
            raise ConfigError(f"{key}={pattern!r} names more than {MAX_SHARDS:,} shards.")
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise ConfigError(f"{key}={pattern!r}: {len(missing)} of its {len(files)} shard(s) are "
                          f"not files, e.g. {missing[0]}.")
    return files


def shard_samples(path: str, cfg: DictConfig) -> list[tuple[str, tuple[int, int], int]]:
    """(key, (offset, size) of its image, label) per sample of one shard, in the shard's
    order; a sample without an image or a label is refused, naming it."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    order: dict[str, None] = {}  # each key once, in the shard's order
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                found = MEMBER.match(member.name) if member.isfile() else None
                if found is None:
                    continue  # a folder, a link, a device: never read
                key, extension = found.groups()
                order.setdefault(key)
                if extension == cfg.label_key:
                    labels[key] = read_label(tar, member, path)
                elif extension in cfg.image_keys and key not in images:
                    if member.size > MAX_IMAGE_BYTES:
                        raise ConfigError(f"{path}: {member.name} is {member.size:,} bytes, over "
                                          f"the {MAX_IMAGE_BYTES:,} an image may take.")
                    images[key] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as error:
        raise ConfigError(f"{path} cannot be read as an uncompressed tar shard: {error}") from error
    incomplete = [key for key in order if key not in images or key not in labels]
    if incomplete:
        raise ConfigError(f"{path}: sample {incomplete[0]!r} (and {len(incomplete) - 1} more) "
                          f"lacks an image ({', '.join(cfg.image_keys)}) or a label "
                          f"({cfg.label_key}); every sample needs both.")
    return [(key, images[key], labels[key]) for key in order]


def read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> int:
    text = tar.extractfile(member).read(MAX_LABEL_BYTES + 1) if member.size <= MAX_LABEL_BYTES else b""
    try:
        return int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{path}: {member.name} is not a class number (an integer as text, "
                          "as WebDataset writes an int).") from None


def class_names(cfg: DictConfig, labels: list[int]) -> list[str]:
    """data.class_names, else the lines of data.classes_file, else 0..the largest label."""
    if cfg.class_names:
        return [str(name) for name in cfg.class_names]
    if cfg.classes_file:
        try:
            with open(os.path.expanduser(cfg.classes_file), encoding="utf-8") as handle:
                names = [line.strip() for line in handle if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"data.classes_file={cfg.classes_file!r} cannot be read: "
                              f"{error}") from error
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"data.classes_file={cfg.classes_file!r} must list distinct class "
                              "names, one per line.")
        return names
    return [str(label) for label in range(max(labels, default=-1) + 1)]


class ShardImages(CheckedImageFolder):
    """The samples of tar shards, each image read by its offset, as an image folder's files
    are read; each sample's source is '<shard>#<key>'."""

    def __init__(self, samples: list[tuple[str, int]], places: dict[str, tuple[str, int, int]],
                 classes: list[str], transform, skip: bool, source: str):
        self.listed_samples, self.places, self.listed_classes = samples, places, classes
        self.stamps = {shard: f"{shard}|{os.stat(shard).st_size}|{os.stat(shard).st_mtime_ns}"
                       for shard, _, _ in places.values()}
        super().__init__(source, transform, skip)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.listed_classes, {name: index for index, name in enumerate(self.listed_classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], **unused) -> list:
        return list(self.listed_samples)

    def image_bytes(self, source: str) -> bytes:
        shard, offset, size = self.places[source]
        with open(shard, "rb") as stream:
            stream.seek(offset)
            return stream.read(size)

    def image_file(self, path: str) -> io.BytesIO:
        return io.BytesIO(self.image_bytes(path))

    def source_stamp(self, path: str) -> str:
        return f"{self.stamps[self.places[path][0]]}#{path}"


def split_images(cfg: DictConfig, key: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """(source, label) per sample of a split's shards, and where each image lies."""
    samples, places = [], {}
    for shard in shard_files(cfg, key):
        for sample_key, (offset, size), label in shard_samples(shard, cfg):
            source = f"{shard}#{sample_key}"
            samples.append((source, label))
            places[source] = (shard, offset, size)
    if not samples:
        raise ConfigError(f"{key}={cfg[key.removeprefix('data.')]!r}: its shards hold no sample.")
    return samples, places


def webdataset_images(cfg: DictConfig, spec: InputSpec, splits: tuple[str, ...] = ("train", "val")):
    """data=webdataset: (train, the last split asked for: val or test, class names); train
    None when not asked for. A label outside the class list is refused, naming the shard."""
    read = {split: split_images(cfg, SPLIT_KEYS[split]) for split in splits}
    classes = class_names(cfg, [label for samples, _ in read.values() for _, label in samples])
    for split, (samples, _) in read.items():
        wrong = next(((source, label) for source, label in samples
                      if not 0 <= label < len(classes)), None)
        if wrong is not None:
            raise ConfigError(f"{SPLIT_KEYS[split]}: sample {wrong[0]} has label {wrong[1]}, "
                              f"outside the {len(classes)} classes (0 to {len(classes) - 1}); "
                              "set data.class_names or data.classes_file to the full list.")
    transforms = dict(zip(("train", "val"), image_transforms(spec, cfg.augment), strict=True))
    found = {split: ShardImages(samples, places, classes, transforms.get(split, transforms["val"]),
                                cfg.bad_images == "skip", cfg[SPLIT_KEYS[split].removeprefix("data.")])
             for split, (samples, places) in read.items()}
    return found.get("train"), found[splits[-1]], classes
