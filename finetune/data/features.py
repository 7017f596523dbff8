"""Feature cache: run a frozen backbone once per image, not once per image per epoch.

When every trainable parameter sits in the head, the backbone is fully frozen and kept in
eval mode, and the training images come out the same every epoch, the backbone's outputs
never change: they are computed once, stored on disk under a key made of everything that
determines them, and the head trains on them. A second run or every job of a sweep over
head and optimizer settings then loads them instead of computing them.
"""

import hashlib
import logging
import os
import shlex
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from finetune.data.digest import tensors_digest
from finetune.data.folders import collate_readable
from finetune.data.loaders import tensor_loader
from finetune.errors import ConfigError
from finetune.model.adapters import is_adapter_parameter
from finetune.model.freeze import trainable_names
from finetune.state.files import load_safe, save_atomic
from finetune.train.trainer import autocast

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout changes: old entries then miss


@dataclass
class CacheDecision:
    enabled: bool
    reason: str  # why it is on or off, for the start-up log


@dataclass
class CacheEntry:
    """The cache entry a run trains on (None: no cache). A checkpoint keeps its key; a
    resumed run whose entry has another key says that its result may differ."""

    key: str | None = None
    path: str | None = None  # the entry's file (this process's; a checkpoint keeps the key)
    written: bool = False  # this run computed and saved it

    def state_dict(self) -> dict[str, str | None]:
        return {"key": self.key}

    def load_state_dict(self, state: dict[str, str | None]) -> None:
        if state["key"] != self.key:
            log.warning("resume: the cached backbone outputs now have key %s, the checkpoint's "
                        "had %s (torch, the weights or the data changed?): the result may "
                        "differ from an uninterrupted run", self.key, state["key"])


def reasons_against(net: nn.Module, random_train_transform: bool, has_phases: bool,
                    streamed: bool = False) -> list[str]:
    """Everything that would make cached features differ from computing them each epoch (or,
    for a stream, what is not there to cache)."""
    reasons = ["the data is streamed (data.streaming=true): its images are read as they come, "
               "not kept, and each epoch reads other rows"] if streamed else []
    trainable = trainable_names(net.pretrained)
    adapters = [name for name in trainable if is_adapter_parameter(name)]
    if adapters:
        reasons.append(f"LoRA adapters in the backbone train (adapter=lora: {len(adapters)} "
                       "tensors), so its outputs change every step")
    trainable = [name for name in trainable if not is_adapter_parameter(name)]
    if trainable:
        reasons.append(f"{len(trainable)} backbone parameters are trainable (e.g. "
                       f"pretrained.{trainable[0]})")
    elif not adapters and "pretrained" not in net.frozen_eval_modules:
        reasons.append("the frozen backbone runs in train mode (frozen_modules=train), so its "
                       "BatchNorm statistics and dropout change its outputs")
    if has_phases:
        reasons.append("unfreeze phases make backbone parameters trainable during the run")
    if random_train_transform:
        reasons.append("the training images are randomly augmented (data.augment, or "
                       "MixUp/CutMix: data.mixup_alpha, data.cutmix_alpha)")
    return reasons


def timm_version() -> str:
    """Part of every key, since a timm backbone's outputs depend on timm's code too."""
    import importlib.metadata

    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return "no timm"


def decide(setting: str, net: nn.Module, random_train_transform: bool,
           has_phases: bool, streamed: bool = False) -> CacheDecision:
    """auto: on exactly when the results do not change; true: on, or an error saying why not."""
    if setting == "false":
        return CacheDecision(False, "off (trainer.cache_features=false)")
    against = reasons_against(net, random_train_transform, has_phases, streamed)
    if not against:
        return CacheDecision(True, "on: the backbone is frozen and deterministic, so its "
                                   "outputs are computed once and the head trains on them")
    if setting == "true":
        raise ConfigError("trainer.cache_features=true would change the results: "
                          + "; ".join(against) + ". Use trainer.cache_features=auto or false.")
    return CacheDecision(False, "off: " + "; ".join(against))


def weights_digest(module: nn.Module) -> str:
    state = module.state_dict()
    return tensors_digest(state.values(), labels=state)


def numerics(device: torch.device, precision: str) -> list[str]:
    """What decides the arithmetic: device kind, precision, TF32 switches, library versions."""
    return [device.type, precision, torch.get_float32_matmul_precision(),
            str(torch.backends.cudnn.allow_tf32), torch.__version__, torchvision.__version__,
            timm_version()]


def cache_key(backbone: nn.Module, fingerprints: tuple[str, str], device: torch.device,
              precision: str) -> str:
    """Everything the cached outputs depend on: the backbone (its class and every weight and
    buffer), the train and val inputs (images and transforms) and the numerics."""
    parts = [str(CACHE_FORMAT), type(backbone).__qualname__, weights_digest(backbone),
             *fingerprints, *numerics(device, precision)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def compute(backbone: nn.Module, dataset: Dataset, batch_size: int, workers: int,
            device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's outputs for every image, in dataset order, on the CPU in float32."""
    if isinstance(dataset, TensorDataset):
        loader = tensor_loader(dataset, batch_size)
    else:  # its own generator leaves the global RNG as it was
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            generator=torch.Generator(), collate_fn=collate_readable)
    outputs, labels = [], []
    backbone.eval()
    with torch.inference_mode():
        for batch in loader:
            if batch is None:  # all of it unreadable (data.bad_images=skip)
                continue
            images, targets = batch
            with autocast(device, precision):
                outputs.append(backbone(images.to(device)).float().cpu())
            labels.append(torch.as_tensor(targets))
    return torch.cat(outputs), torch.cat(labels)


def backbone_width(backbone: nn.Module, dataset: Dataset, device: torch.device,
                   precision: str) -> int | None:
    """How many features the backbone gives an image: one of `dataset`'s through it (None
    when that one cannot be read)."""
    sample = collate_readable([dataset[0]]) if len(dataset) else None
    if sample is None:
        return None
    backbone.eval()
    with torch.inference_mode(), autocast(device, precision):
        return backbone(sample[0].to(device)).shape[-1]


def split_problem(name: str, features: torch.Tensor, labels: torch.Tensor, dataset: Dataset,
                  width: int) -> str | None:
    """What is wrong with a split's cached tensors, if anything: they must be what compute
    gives, float32 rows of the backbone's width, one per image, and the dataset's labels."""
    from finetune.train.loss import dataset_labels

    shape = (len(dataset), width)
    if features.dtype != torch.float32 or features.shape != shape:
        return f"its {name} features are {features.dtype} {tuple(features.shape)}, not torch.float32 {shape}"
    if not torch.isfinite(features).all():
        return f"its {name} features are not all finite"
    expected = dataset_labels(dataset)  # the key covers them: an entry's are these exactly
    if labels.dtype != expected.dtype or labels.shape != expected.shape or not torch.equal(labels, expected):
        return (f"its {name} labels ({labels.dtype} {tuple(labels.shape)}) are not the data's "
                f"({expected.dtype} {tuple(expected.shape)})")
    return None


def entry_problem(entry: dict, key: str, splits: tuple[Dataset, Dataset], width: int | None) -> str | None:
    """What keeps a cache entry from being this run's, if anything. `width`: the backbone's
    (None: unknown, then the val split's must be the train split's)."""
    if entry["key"] != key:
        return "it has another key"
    width = entry["train"].shape[-1] if width is None else width
    for name, dataset in zip(("train", "val"), splits, strict=True):
        problem = split_problem(name, entry[name], entry[f"{name}_labels"], dataset, width)
        if problem is not None:
            return problem
    return None


def load_entry(path: str, key: str, splits: tuple[Dataset, Dataset], width: int | None) -> dict | None:
    """A cache entry that is complete and belongs to `key`, else None (it gets rebuilt)."""
    if not os.path.isfile(path):
        return None
    try:
        entry = load_safe(path, "feature cache")  # weights only, its zip index checked first
        problem = entry_problem(entry, key, splits, width)
    except Exception as error:  # truncated, corrupt or from another format
        log.warning("feature cache %s is unreadable (%s); rebuilding it", path, error)
        return None
    if problem is not None:  # a stale entry, or other tensors under this key: never trained on
        log.warning("feature cache %s does not match this run (%s); rebuilding it", path, problem)
        return None
    return entry


def cached_features(backbone: nn.Module, train: Dataset, val: Dataset, fingerprints: tuple[str, str],
                    cache_dir: str, batch_size: int, workers: int, device: torch.device,
                    precision: str) -> tuple[TensorDataset, TensorDataset, CacheEntry]:
    """Train and val features from the disk cache, computing and storing them on a miss;
    and the entry."""
    key = cache_key(backbone, fingerprints, device, precision)
    path = os.path.join(os.path.expanduser(cache_dir), f"{key}.pt")
    width = backbone_width(backbone, val, device, precision) if os.path.isfile(path) else None
    entry, written = load_entry(path, key, (train, val), width), False
    if entry is not None:
        log.info("feature cache: loaded %s", path)
    else:
        train_features, train_labels = compute(backbone, train, batch_size, workers, device,
                                               precision)
        val_features, val_labels = compute(backbone, val, batch_size, workers, device, precision)
        entry = {"key": key, "train": train_features, "train_labels": train_labels,
                 "val": val_features, "val_labels": val_labels}
        if torch.isfinite(train_features).all() and torch.isfinite(val_features).all():
            save_atomic(entry, path)  # concurrent writers each rename a complete file
            written = True
            log.info("feature cache: computed %d + %d backbone outputs, saved to %s",
                     len(train), len(val), path)
        else:  # an fp16 overflow, say: nothing worth keeping
            log.warning("feature cache: the backbone's outputs are not all finite; not saved")
    return (TensorDataset(entry["train"], entry["train_labels"]),
            TensorDataset(entry["val"], entry["val_labels"]), CacheEntry(key, path, written))


def cache_report(entry: CacheEntry) -> str | None:
    """Where a run that filled the cache left its entry, the folder's size, how to clear it."""
    if not entry.written or entry.path is None or not os.path.isfile(entry.path):
        return None
    folder = os.path.dirname(entry.path)
    total = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
                if name.endswith(".pt"))
    return (f"feature cache: {entry.path} ({mib(os.path.getsize(entry.path))}); {folder} holds "
            f"{mib(total)} in all, reused by later runs on the same data and backbone "
            f"(rm -r {shlex.quote(folder)} clears it)")


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
