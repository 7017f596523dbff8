"""Data stage: cfg.data and the backbone's InputSpec -> train/val loaders and class names."""

import copy
import functools
import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    TensorDataset,
    default_collate,
)
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms
from torchvision.transforms import v2

from finetune.config import augment_policy, is_multi_label
from finetune.digest import tensors_digest
from finetune.errors import ConfigError
from finetune.model import InputSpec
from finetune.threads import machine_cores

log = logging.getLogger(__name__)

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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def normalize(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (images - mean) / std


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


@functools.cache
def image_decoder() -> Callable | None:
    """TorchCodec's decode_image (the `decode` extra, in dev), or None: PIL decodes. It gives
    PIL's pixels for JPEG, PNG, WebP and GIF files, 1.5x faster on JPEG (docs/speed.md)."""
    try:
        from torchcodec.decoders import decode_image
    except ImportError:
        return None
    return decode_image


def decoder_name() -> str:
    """Which library decodes images here, and its version (part of the image cache's key)."""
    import importlib.metadata

    import PIL

    if image_decoder() is None:
        return f"PIL {PIL.__version__}"
    return f"torchcodec {importlib.metadata.version('torchcodec')} (else PIL {PIL.__version__})"


def read_image(path: str) -> torch.Tensor:
    """An image file as an RGB uint8 tensor (3, H, W), its first frame if animated. PIL reads
    its header first (open_image: a file it cannot identify is refused, its size unknown),
    then TorchCodec decodes it, else PIL (BMP, TIFF; a broken file, naming what is wrong)."""
    with open_image(path) as image:
        decode = image_decoder()
        # TorchCodec decodes every frame of an animation: PIL decodes the first one alone
        if decode is not None and not getattr(image, "is_animated", False):
            try:
                decoded = decode(path, mode="RGB")
                return decoded[0] if decoded.dim() == 4 else decoded
            except (RuntimeError, ValueError):  # another format, or a broken file: PIL says which
                pass
        return v2.functional.pil_to_tensor(image.convert("RGB"))


def open_image(path: str) -> Image.Image:
    """The image's header (PIL reads no pixels yet), refused past PIL's decompression-bomb
    limit before any decoder runs: TorchCodec has no limit of its own, and a small file can
    declare gigabytes of pixels. PIL reads Image.MAX_IMAGE_PIXELS at each call and refuses
    over twice it (PIL only warns below), so a user who raises or clears it is obeyed."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        raise ConfigError(f"{path} is too large an image to decode safely: {error} PIL refuses "
                          "images over twice PIL.Image.MAX_IMAGE_PIXELS pixels, and so does this "
                          "tool whichever library decodes them. If you trust the file, raise "
                          "PIL.Image.MAX_IMAGE_PIXELS in Python (None: no limit) before it is read, "
                          "or make the image smaller.") from error


class Prepared:
    """An image's preparation in two parts: `fixed` turns an image (a uint8 tensor; a PIL
    image is made one first) into a uint8 tensor the same way every epoch (resize, perhaps
    a center crop: what the decoded-image cache keeps,
    finetune/image_cache.py), then `varying` does the rest on that tensor (random
    augmentation, scaling to [0, 1], normalization). With or without the cache an image
    goes through the same steps, so both give the same batches."""

    def __init__(self, fixed: v2.Compose, varying: v2.Compose):
        self.fixed, self.varying = fixed, varying

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        return self.varying(self.fixed(image))

    def __repr__(self) -> str:
        return f"Prepared(fixed={self.fixed!r}, varying={self.varying!r})"


def image_transforms(spec: InputSpec, augment: str = "none") -> tuple[Prepared, Prepared]:
    """(training, evaluation) preparations; `augment` (data.augment) changes training only.
    Evaluation: resize, center crop. Random-crop policies crop from the image resized to its
    short side (spec.resize_size), on uint8 tensors, as FFCV-style pipelines do."""
    # a PIL image (load_model's callers pass them) becomes a tensor first, so every image is
    # resized by the same code as the files read with read_image
    resize = [v2.PILToTensor(), v2.Resize(spec.resize_size, interpolation=spec.interpolation)]
    center = [*resize, v2.CenterCrop(spec.image_size)]
    scale = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    evaluation = Prepared(v2.Compose(center), v2.Compose(scale))
    policy = augment_policy(augment)
    if policy == "none":
        return evaluation, evaluation
    if policy == "flip":
        return Prepared(v2.Compose(center), v2.Compose([v2.RandomHorizontalFlip(), *scale])), evaluation
    crop = v2.RandomResizedCrop(spec.image_size, interpolation=spec.interpolation)
    training = Prepared(v2.Compose(resize),
                        v2.Compose([crop, v2.RandomHorizontalFlip(), *POLICIES.get(policy, []),
                                    *scale]))
    return training, evaluation


# data.augment's policies on top of a random resized crop and a flip
POLICIES = {"randaugment": [v2.RandAugment()], "trivialaugment": [v2.TrivialAugmentWide()],
            "autoaugment": [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)]}


def batch_mixing(mixup_alpha: float, cutmix_alpha: float, classes: int) -> Callable | None:
    """MixUp and/or CutMix (one of the two per batch when both are on), or None. They draw
    from torch's generator, which checkpoints save, so a resumed run mixes as an unbroken
    one; the targets they return are class probabilities, each row summing to 1."""
    chosen = [mix(alpha=alpha, num_classes=classes) for mix, alpha in
              ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def check_data_paths(cfg: DictConfig, splits: tuple[str, ...] = ("train", "val")) -> None:
    """data=imagefolder: data.root holds the split folders, or (no train/) the class folders
    themselves; data=csv: data.file exists. A stat or two, so it runs before anything is
    built."""
    if cfg.name == "csv":
        from finetune.csv_data import csv_path

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
    from finetune.csv_data import fraction_split

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


def unreadable(paths: list[str]) -> dict[str, str]:
    """The files PIL cannot open and verify, with the reason (checked in threads)."""
    def problem(path: str) -> str | None:
        try:
            with open_image(path) as image:  # past PIL's pixel limit: refused, with the advice
                image.verify()
        except Exception as error:  # PIL raises many types for broken files
            return f"{type(error).__name__}: {error}"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:  # file reads: threads overlap the waits
        return {path: reason for path, reason in zip(paths, pool.map(problem, paths), strict=True)
                if reason is not None}


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder that names unreadable files: found at start-up, they are left out with one
    warning naming each (`skip`) or stop the run with their names (`fail`, a ConfigError).
    A file that breaks later (a truncated JPEG passes the check) is named in the error, or
    skipped with a warning, instead of crashing a loader worker anonymously."""

    def __init__(self, root: str, transform: Prepared, skip: bool):
        super().__init__(root, transform=transform, loader=read_image)
        self.skip = skip
        self.decoded = None  # image_cache.DecodedImages: the fixed part, read back
        self.whole_batches = False  # the cache's batches are read whole (image_cache.read_batch)
        bad = unreadable([path for path, _ in self.samples])
        named = "; ".join(f"{path} ({reason})" for path, reason in bad.items())
        if bad and not skip:
            raise ConfigError(f"data.bad_images=fail: {len(bad)} unreadable image file(s) in "
                              f"{root}: {named}. Remove or replace them, or set "
                              "data.bad_images=skip.")
        if bad:
            log.warning("data.bad_images=skip: leaving out %d unreadable image file(s) in %s: %s",
                        len(bad), root, named)
            self.samples = [sample for sample in self.samples if sample[0] not in bad]
            self.imgs, self.targets = self.samples, [target for _, target in self.samples]

    def __getitems__(self, indices: list[int]):
        """A batch's samples (what DataLoader fetches), or the batch itself, read whole."""
        if self.whole_batches:
            from finetune.image_cache import read_batch

            return ReadWhole(read_batch(self, indices))
        return [self[index] for index in indices]

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        if self.decoded is not None:  # None: unreadable when the entry was built (it said so)
            image = self.decoded.get(index)
            return None if image is None else (self.transform.varying(image), target)
        try:
            image = self.loader(path)
        except Exception as error:
            if not self.skip:
                raise RuntimeError(f"cannot read image {path}: {error}") from error
            log.warning("data.bad_images=skip: leaving out unreadable image %s: %s", path, error)
            return None
        return self.transform(image), target


class CsvImages(CheckedImageFolder):
    """The images a CSV file lists (finetune/csv_data.py), read as an image folder's are:
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
        samples = []
        for path, labels in sorted(self.rows, key=lambda row: row[0]):
            target = torch.zeros(len(class_to_idx))
            target[[class_to_idx[label] for label in labels]] = 1.0
            samples.append((path, target))
        return samples


def csv_images(cfg: DictConfig, spec: InputSpec, splits: tuple[str, ...] = ("train", "val")):
    """data=csv: (train, the last split asked for: val or test, class names); train None
    when not asked for (not read)."""
    from finetune.csv_data import split_rows

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


def fake_data(cfg: DictConfig, spec: InputSpec):
    """torchvision FakeData (random images, deterministic per index) for smoke tests."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    shape = (3, spec.image_size, spec.image_size)
    train = datasets.FakeData(cfg.train_size, shape, cfg.num_classes, transform)
    val = datasets.FakeData(cfg.val_size, shape, cfg.num_classes, transform,
                            random_offset=cfg.train_size)
    return train, val, [str(index) for index in range(cfg.num_classes)]


BUILDERS = {"digits": digits_tensors, "imagefolder": image_folders, "fake": fake_data,
            "csv": csv_images}


def worker_count(setting: int | str) -> int:
    """data.num_workers: a number, or auto: a loader process for each core this process may
    use (its share of them under torchrun) but one, which trains; 1 at least, 8 at most."""
    if str(setting).lower() != "auto":
        return int(setting)
    share = machine_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(AUTO_WORKERS_MAX, share - 1))


def make_loader(dataset: Dataset, cfg: DictConfig, training: bool, seed: int, pin_memory: bool,
                shard: "Shard | None" = None) -> DataLoader:
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


@dataclass
class Shard:
    """This process's part of the data under torchrun: rank `rank` of `world` processes."""

    rank: int
    world: int


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


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """DistributedSampler shuffles by epoch; other orders ignore it."""
    order = loader.batch_sampler or loader.sampler  # tensor_loader: its sampler is batched
    order = getattr(order, "sampler", order)
    if isinstance(order, DistributedSampler):
        order.set_epoch(epoch)


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


def builder(cfg: DictConfig):
    if cfg.name not in BUILDERS:
        raise ConfigError(f"data.name={cfg.name!r} is not valid: use one of {', '.join(BUILDERS)}.")
    return BUILDERS[cfg.name]


def build_data(cfg: DictConfig, spec: InputSpec, seed: int, pin_memory: bool = False,
               shard: Shard | None = None, cache_dir: str | None = None) -> Data:
    train, val, class_names = builder(cfg)(cfg, spec)
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
                image_cache=image_cache)


def attach_image_caches(cfg: DictConfig, datasets: tuple[Dataset, ...], cache_dir: str) -> str | None:
    """data.cache_images: each image dataset reads its fixed part from its cache entry
    (finetune/image_cache.py); the decision for the start-up report (None: no image files)."""
    from finetune import image_cache

    files = [getattr(dataset, "dataset", dataset) for dataset in datasets]  # a fold's Subset
    files = [dataset for dataset in files if isinstance(dataset, CheckedImageFolder)]
    if not files:
        return None
    sizes = [image_cache.estimated_bytes([path for path, _ in dataset.samples], dataset.transform.fixed)
             for dataset in files]  # read once: the decision, then each entry's room
    decision = image_cache.decide(str(cfg.cache_images).lower(), sum(map(len, files)), sum(sizes),
                                  cfg.cache_max_gb)
    if decision.enabled:
        built = [image_cache.attach(dataset, cache_dir, cfg.cache_max_gb, size)
                 for dataset, size in zip(files, sizes, strict=True)]
        decision.reason += "; built now" if any(built) else "; read from the cache"
    return decision.reason


FOLD_SEED = 0  # the folds are fixed, whatever the run's seed


def cross_validation_fold(cfg: DictConfig, train: Dataset, val: Dataset) -> tuple[Subset, Subset]:
    """data.folds=K data.fold=i: the training data in K stratified folds (random ones for
    multi-label data); fold i validates (with the validation transform, no augmentation)
    and the other K-1 train. The data's own validation split is not used."""
    from sklearn.model_selection import KFold, StratifiedKFold

    from finetune.loss import dataset_labels

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
                    shard: Shard | None = None) -> tuple[DataLoader, list[str]]:
    """The split data.split names alone (mode=evaluate: val, or test: images training never
    saw); an image folder's train/ is not read."""
    split = cfg.get("split", "val")
    if cfg.name in ("imagefolder", "csv"):
        _, val, class_names = builder(cfg)(cfg, spec, splits=(split,))
    elif split != "val":
        raise ConfigError(f"data.split={split!r}: data={cfg.name} has no test split; data=imagefolder "
                          "(a test/ folder) and data=csv (rows with split=test) can have one.")
    else:  # in memory or generated: the split needs both sides, and costs nothing to read
        _, val, class_names = builder(cfg)(cfg, spec)
    if len(val) == 0:
        raise ConfigError(f"data={cfg.name}: the {'validation' if split == 'val' else 'test'} set "
                          "is empty.")
    return make_loader(val, cfg, False, seed, pin_memory, shard), class_names


def has_test_split(cfg: DictConfig) -> bool:
    """Whether the data holds a test split (a test/ folder, or rows with split=test)."""
    if cfg.name == "imagefolder":
        return split_folders(cfg) and os.path.isdir(os.path.join(os.path.expanduser(cfg.root), "test"))
    if cfg.name == "csv" and cfg.split_column:  # the column alone: no image is looked up
        from finetune.csv_data import read_rows

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
    if isinstance(dataset, datasets.ImageFolder):
        for path, label in dataset.samples:
            stat = os.stat(path)
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update(repr(dataset.transform).encode())
    elif isinstance(dataset, datasets.FakeData):
        digest.update(f"{dataset.size}|{dataset.image_size}|{dataset.num_classes}|"
                      f"{dataset.random_offset}|{dataset.transform!r}".encode())
    else:
        raise TypeError(f"no fingerprint for {type(dataset).__name__}")
    return digest.hexdigest()
