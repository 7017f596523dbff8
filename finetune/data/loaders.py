"""Data stage: cfg.data and the backbone's InputSpec -> train/val loaders and class names.

`build_data` picks the builder for data.name (digits, imagefolder, csv, fake), splits or
folds, and makes the loaders: a seeded order each (restored on resume), shards under
torchrun, workers and pinned memory as configured."""

import copy
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms

from finetune.config.schemas import augment_policy, is_multi_label
from finetune.data.digest import tensors_digest
from finetune.data.folders import (
    CheckedImageFolder,
    check_data_paths,
    collate_readable,
    csv_images,
    image_folders,
    split_folders,
)
from finetune.data.hf_data import hf_images, local_path, open_splits
from finetune.data.shards import webdataset_images
from finetune.data.streaming import StreamedImages
from finetune.data.transforms import batch_mixing, normalize
from finetune.errors import ConfigError
from finetune.model.net import InputSpec
from finetune.threads import machine_cores
from finetune.train.distributed import Shard

AUTO_WORKERS_MAX = 8  # data.num_workers=auto: more rarely helps a single training process


DIGITS_SPLIT_SEED = 0  # the digits train/val split is fixed, whatever the run's seed


@dataclass
class Data:
    train_loader: DataLoader
    val_loader: DataLoader
    class_names: list[str]
    random_augmentation: bool = False  # training images differ from epoch to epoch
    mix: Callable | None = None  # MixUp/CutMix on training batches: (images, labels) -> soft
    multi_label: bool = False  # targets are 0/1 vectors over the classes (data.label_delimiter)
    image_cache: str | None = None  # data.cache_images's decision, for image files only
    reading: str = ""  # how the data is read and split across processes (the report's line)
    streamed: bool = False  # data.streaming=true: read as a stream, nothing kept

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def select_digit_classes(images, labels, classes: list[int] | None):
    """Keep only `classes` (relabelled 0..k-1 in the given order); all ten when None."""
    if classes is None:
        return images, labels, [str(digit) for digit in range(10)]
    if len(set(classes)) != len(classes) or len(classes) < 2 or not set(classes) <= set(range(10)):
        raise ConfigError(f"data.classes={classes} is not valid: give two or more distinct "
                          "digits from 0 to 9, or null for all ten.")
    keep = [i for i, label in enumerate(labels) if label in classes]
    relabel = {digit: index for index, digit in enumerate(classes)}
    return images[keep], [relabel[labels[i]] for i in keep], [str(digit) for digit in classes]


def digits_tensors(cfg: DictConfig, spec: InputSpec):
    """scikit-learn's bundled 8x8 digits, resized and normalized once, kept as tensors."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bundle = load_digits()
    images, labels, class_names = select_digit_classes(
        bundle.images, bundle.target.tolist(), None if cfg.classes is None else list(cfg.classes))
    try:
        train_index, val_index = train_test_split(
            list(range(len(labels))), test_size=cfg.val_fraction, stratify=labels,
            random_state=DIGITS_SPLIT_SEED)
    except ValueError as error:  # too few images left on one side for every class
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} cannot split {len(labels)} "
                          f"images of {len(class_names)} classes: {error}") from error
    pixels = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=(spec.image_size, spec.image_size), mode="bilinear",
                           align_corners=False)
    targets = torch.tensor(labels)

    def split(index: list[int]) -> TensorDataset:  # to 3 channels after the split: less memory
        return TensorDataset(normalize(pixels[index].expand(-1, 3, -1, -1), spec).contiguous(),
                             targets[index])

    return split(train_index), split(val_index), class_names


def fake_data(cfg: DictConfig, spec: InputSpec):
    """torchvision FakeData (random images, deterministic per index) for smoke tests."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    shape = (3, spec.image_size, spec.image_size)
    train = datasets.FakeData(cfg.train_size, shape, cfg.num_classes, transform)
    val = datasets.FakeData(cfg.val_size, shape, cfg.num_classes, transform,
                            random_offset=cfg.train_size)
    return train, val, [str(index) for index in range(cfg.num_classes)]


BUILDERS = {"digits": digits_tensors, "imagefolder": image_folders, "fake": fake_data,
            "csv": csv_images, "hf": hf_images, "webdataset": webdataset_images}
FILE_DATA = ("imagefolder", "csv", "hf", "webdataset")  # a split read alone (image files, a
# table's images, tar shards' images)


def worker_count(setting: int | str) -> int:
    """data.num_workers: a number, or auto: a loader process for each core this process may
    use (its share of them under torchrun) but one, which trains; 1 at least, 8 at most."""
    if str(setting).lower() != "auto":
        return int(setting)
    share = machine_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(AUTO_WORKERS_MAX, share - 1))


def make_loader(dataset: Dataset, cfg: DictConfig, training: bool, seed: int, pin_memory: bool,
                shard: "Shard | None" = None) -> DataLoader:
    if isinstance(dataset, StreamedImages):
        return stream_loader(dataset, cfg, training, seed, pin_memory, shard)
    # a last batch of one image breaks BatchNorm in training mode (unless it is the only one)
    drop_last = training and len(dataset) > cfg.batch_size and len(dataset) % cfg.batch_size == 1
    # its own generator: shuffling, and even starting an iterator, then leaves the global
    # RNG (dropout masks) alone, so what runs before training cannot change the result
    generator = torch.Generator().manual_seed(seed)
    order = index_order(dataset, training, generator, seed, shard)
    if isinstance(dataset, TensorDataset):
        return tensor_loader(dataset, cfg.batch_size, order, drop_last, generator)
    whole = getattr(getattr(dataset, "dataset", dataset), "whole_batches", False)  # a fold's Subset
    return DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=order,
        num_workers=0 if whole else worker_count(cfg.num_workers),  # whole: read from the image cache
        # no persistent workers: each epoch's workers then take their seeds from `generator`,
        # which checkpoints save, so a resumed run shuffles and augments as an unbroken one
        pin_memory=pin_memory, drop_last=drop_last, generator=generator,
        collate_fn=collate_readable)


def stream_loader(dataset: StreamedImages, cfg: DictConfig, training: bool, seed: int,
                  pin_memory: bool, shard: Shard | None) -> DataLoader:
    """data.streaming=true: the stream deals its rows to the processes and workers itself
    (finetune/data/streaming.py); the generator seeds the workers' augmentation."""
    dataset.place(training, seed, *((shard.rank, shard.world) if shard else (0, 1)))
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=worker_count(cfg.num_workers),
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                      collate_fn=collate_readable)


class EveryNth(Sampler):
    """Indices rank, rank + world, ...: each validation image on exactly one process (no
    padding, unlike DistributedSampler), so summed metrics equal a single-process pass."""

    def __init__(self, size: int, shard: Shard):
        self.indices = range(shard.rank, size, shard.world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def index_order(dataset: Dataset, training: bool, generator: torch.Generator, seed: int,
                shard: Shard | None) -> Sampler:
    if shard is None:
        return RandomSampler(dataset, generator=generator) if training else SequentialSampler(dataset)
    if training:  # a different shuffle each epoch (set_epoch), the same on every process
        return DistributedSampler(dataset, shard.world, shard.rank, shuffle=True, seed=seed)
    return EveryNth(len(dataset), shard)


def tensor_loader(dataset: TensorDataset, batch_size: int, order: Sampler | None = None,
                  drop_last: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    """Batches of an in-memory data set, each taken with one indexing operation.

    The usual loader fetches images one by one and stacks them. This one yields the same
    batches in the same order (same sampler, same generator draws) without that per-image
    work, and with no workers: there is nothing to decode. `order` defaults to dataset order.
    """
    generator = generator if generator is not None else torch.Generator()
    order = order if order is not None else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last),
                      batch_size=None, generator=generator)


def check_data_source(cfg: DictConfig) -> None:
    """The cheap start-up check of where the data is: a folder, a file, a data set's path."""
    if cfg.name == "hf":
        local_path(cfg)
    else:
        check_data_paths(cfg)


def builder(cfg: DictConfig):
    if cfg.name not in BUILDERS:
        raise ConfigError(f"data.name={cfg.name!r} is not valid: use one of {', '.join(BUILDERS)}.")
    return BUILDERS[cfg.name]


def build_data(cfg: DictConfig, spec: InputSpec, seed: int, pin_memory: bool = False,
               shard: Shard | None = None, cache_dir: str | None = None) -> Data:
    train, val, class_names = builder(cfg)(cfg, spec)
    check_images((train, val), cache_dir)
    if cfg.get("folds") is not None:
        train, val = cross_validation_fold(cfg, train, val)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(f"data={cfg.name}: the training or validation set is empty.")
    image_cache = attach_image_caches(cfg, (train, val), cache_dir) if cache_dir else None
    mix = batch_mixing(cfg.mixup_alpha, cfg.cutmix_alpha, len(class_names))
    return Data(make_loader(train, cfg, True, seed, pin_memory, shard),
                make_loader(val, cfg, False, seed, pin_memory, shard), class_names,
                random_augmentation=augment_policy(cfg.get("augment", "none")) != "none"
                or mix is not None, mix=mix, multi_label=is_multi_label(cfg),
                image_cache=image_cache, reading=reading(cfg, train, val, shard),
                streamed=isinstance(train, StreamedImages))


def check_images(found: tuple[Dataset | None, ...], cache_dir: str | None) -> None:
    """Image data sets' start-up check, its verdict kept under trainer.cache_dir."""
    for dataset in found:
        if isinstance(dataset, CheckedImageFolder):
            dataset.check_images(cache_dir)


def reading(cfg: DictConfig, train: Dataset, val: Dataset, shard: Shard | None) -> str:
    """How the data is read (map-style: any image by its index) and split across processes."""
    if isinstance(train, StreamedImages):
        return train.describe(val)
    where = {"hf": lambda: f"rows of the data set {cfg.path} (map-style: read by index)",
             "imagefolder": lambda: f"image files under {cfg.root}",
             "csv": lambda: f"image files listed in {cfg.file}",
             "webdataset": lambda: f"tar shards {cfg.train_shards} (their members indexed at "
                                   "start-up, each image read by its offset: map-style)"
             }.get(cfg.name, lambda: "in memory")
    line = f"{len(train)} training and {len(val)} validation images, {where()}"
    if shard is not None:
        line += (f"; each of {shard.world} processes trains on its own 1/{shard.world} of the "
                 f"shuffled training images and validates 1/{shard.world} of the validation "
                 "images (each image on one process)")
    return line


def attach_image_caches(cfg: DictConfig, datasets: tuple[Dataset, ...], cache_dir: str) -> str | None:
    """data.cache_images: each image dataset reads its fixed part from its cache entry
    (finetune/data/image_cache.py); the decision for the start-up report (None: no image files)."""
    from finetune.data import image_cache

    files = [getattr(dataset, "dataset", dataset) for dataset in datasets]  # a fold's Subset
    files = [dataset for dataset in files if isinstance(dataset, CheckedImageFolder)]
    if not files:
        return None
    setting = str(cfg.cache_images).lower()
    if setting == "false":  # no entry to find, no size to estimate
        return image_cache.decide(setting, 0, 0, cfg.cache_max_gb).reason
    entries = [image_cache.entry_of(dataset, cache_dir) for dataset in files]
    sizes = [image_cache.entry_bytes(dataset, entry) for dataset, entry in zip(files, entries, strict=True)]
    decision = image_cache.decide(setting, sum(map(len, files)), sum(sizes), cfg.cache_max_gb)
    if decision.enabled:  # the sizes: the decision, then each entry's room
        built = [image_cache.attach(dataset, entry, cfg.cache_max_gb, size)
                 for dataset, entry, size in zip(files, entries, sizes, strict=True)]
        decision.reason += "; built now" if any(built) else "; read from the cache"
    return decision.reason


FOLD_SEED = 0  # the folds are fixed, whatever the run's seed


def cross_validation_fold(cfg: DictConfig, train: Dataset, val: Dataset) -> tuple[Subset, Subset]:
    """data.folds=K data.fold=i: the training data in K stratified folds (random ones for
    multi-label data); fold i validates (with the validation transform, no augmentation)
    and the other K-1 train. The data's own validation split is not used."""
    from sklearn.model_selection import KFold, StratifiedKFold

    from finetune.train.loss import dataset_labels

    labels = dataset_labels(train).numpy()
    split = KFold if labels.ndim > 1 else StratifiedKFold
    folds = split(n_splits=cfg.folds, shuffle=True, random_state=FOLD_SEED)
    try:
        train_index, val_index = list(folds.split(labels, labels))[cfg.fold]
    except ValueError as error:
        raise ConfigError(f"data.folds={cfg.folds} cannot split the {len(labels)} training "
                          f"images by class: {error}") from error
    evaluated = copy.copy(train)  # the same images, prepared as validation prepares them
    if hasattr(train, "transform"):
        evaluated.transform = getattr(val, "transform", None)
    return Subset(train, train_index.tolist()), Subset(evaluated, val_index.tolist())


def validation_data(cfg: DictConfig, spec: InputSpec, seed: int, pin_memory: bool = False,
                    shard: Shard | None = None, cache_dir: str | None = None
                    ) -> tuple[DataLoader, list[str]]:
    """The split data.split names alone (mode=evaluate: val, or test: images training never
    saw); an image folder's train/ is not read."""
    split = cfg.get("split", "val")
    if cfg.name in FILE_DATA:
        _, val, class_names = builder(cfg)(cfg, spec, splits=(split,))
    elif split != "val":
        raise ConfigError(f"data.split={split!r}: data={cfg.name} has no test split; data=imagefolder "
                          "(a test/ folder) and data=csv (rows with split=test) can have one.")
    else:  # in memory or generated: the split needs both sides, and costs nothing to read
        _, val, class_names = builder(cfg)(cfg, spec)
    check_images((val,), cache_dir)
    if len(val) == 0:
        raise ConfigError(f"data={cfg.name}: the {'validation' if split == 'val' else 'test'} set "
                          "is empty.")
    return make_loader(val, cfg, False, seed, pin_memory, shard), class_names


def has_test_split(cfg: DictConfig) -> bool:
    """Whether the data holds a test split (a test/ folder, or rows with split=test)."""
    if cfg.name == "imagefolder":
        return split_folders(cfg) and os.path.isdir(os.path.join(os.path.expanduser(cfg.root), "test"))
    if cfg.name == "hf":
        return cfg.test_split in open_splits(cfg)
    if cfg.name == "webdataset":
        return bool(cfg.test_shards)
    if cfg.name == "csv" and cfg.split_column:  # the column alone: no image is looked up
        from finetune.data.csv_data import read_rows

        return any((row.get(cfg.split_column) or "").strip() == "test" for _, row in read_rows(cfg))
    return False


def fingerprint(dataset: Dataset) -> str:
    """What determines a data set's model inputs: its images, their order and the transform."""
    if isinstance(dataset, Subset):  # a cross-validation fold
        indices = ",".join(map(str, dataset.indices))
        return hashlib.sha256(f"{fingerprint(dataset.dataset)}|{indices}".encode()).hexdigest()
    if isinstance(dataset, TensorDataset):
        return tensors_digest(dataset.tensors)
    digest = hashlib.sha256()
    if isinstance(dataset, CheckedImageFolder):  # files, a table's rows, tar shards' members
        for path, label in dataset.samples:
            digest.update(f"{dataset.source_stamp(path)}|{label}".encode())
        digest.update(repr(dataset.transform).encode())
    elif isinstance(dataset, datasets.FakeData):
        digest.update(f"{dataset.size}|{dataset.image_size}|{dataset.num_classes}|"
                      f"{dataset.random_offset}|{dataset.transform!r}".encode())
    else:
        raise TypeError(f"no fingerprint for {type(dataset).__name__}")
    return digest.hexdigest()
