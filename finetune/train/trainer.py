"""Trainer stage: the epoch loop (train pass, eval pass, schedule step) and its own state;
everything else a run does each epoch is a hook (finetune/hooks.py)."""

import contextlib
import csv
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune.config.schemas import PRECISIONS
from finetune.config.store import direction
from finetune.errors import ConfigError, TrainingFailed
from finetune.hooks import Hook
from finetune.state.files import atomic_write, spreadsheet_cell
from finetune.train import distributed
from finetune.train.distributed import set_epoch
from finetune.train.multilabel import MultiLabelScores, multi_label_scores

log = logging.getLogger(__name__)

SAMPLE_EVERY = 10  # steps between progress-bar updates (each waits for the device; none without a bar)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    group_lrs: dict[str, float] = field(default_factory=dict)  # each optimizer group's rate
    lr_scales: dict[str, float] = field(default_factory=dict)  # freeze=auto's, per unit (rgn.py)
    # from the validation confusion matrix: the mean recall over classes, and the mean F1
    # (NaN in an older run's epochs, which did not record them)
    val_balanced_acc: float = math.nan
    val_macro_f1: float = math.nan
    # multi-label data (finetune/train/multilabel.py; its accuracies are NaN): mean average
    # precision, and micro F1 (val_macro_f1 is then its macro F1)
    val_map: float = math.nan
    val_micro_f1: float = math.nan
    # the share of images whose class is among the 5 highest logits (NaN with 5 classes or
    # fewer, where it is always 1, and for multi-label data)
    val_top5_acc: float = math.nan


TOP_K = 5  # val_top5_acc
METRIC_COLUMNS = [name for name in EpochMetrics.__dataclass_fields__
                  if name not in ("group_lrs", "lr_scales")]
SCALE_COLUMN = "lr_scale/{}"  # metrics.csv's column of each freeze=auto unit


def epoch_line(metrics: EpochMetrics) -> str:
    """The console's line for an epoch's train and val scores."""
    if math.isnan(metrics.val_map):
        return (f"train loss {metrics.train_loss:.4f} acc {metrics.train_acc:.4f}  "
                f"val loss {metrics.val_loss:.4f} acc {metrics.val_acc:.4f}")
    return (f"train loss {metrics.train_loss:.4f}  val loss {metrics.val_loss:.4f} "
            f"mAP {metrics.val_map:.4f} micro-F1 {metrics.val_micro_f1:.4f}")


def confusion_scores(confusion: list[list[int]]) -> tuple[float, float]:
    """Balanced accuracy and macro F1 from a confusion matrix (rows: true class), as
    scikit-learn's balanced_accuracy_score and f1_score(average="macro") compute them:
    recall over the classes that have images, F1 over those that have images or predictions
    (a class never right scores 0)."""
    counts = torch.tensor(confusion, dtype=torch.float64)
    if counts.numel() == 0:
        return math.nan, math.nan
    right, actual, predicted = counts.diagonal(), counts.sum(dim=1), counts.sum(dim=0)
    present = actual > 0
    balanced = (right[present] / actual[present]).mean().item() if present.any() else math.nan
    seen = present | (predicted > 0)
    f1 = torch.where(actual + predicted > 0, 2 * right / (actual + predicted).clamp(min=1), 0.0)
    return balanced, f1[seen].mean().item() if seen.any() else math.nan


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a named device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"trainer.device={name!r} is not a device: use auto, cpu, cuda, "
                          "cuda:N or mps.") from error
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ConfigError(f"trainer.device={name!r} is not available on this machine: use "
                          "trainer.device=auto or cpu.")
    return device


class Totals:
    """Loss and accuracy summed on the device, read back once per epoch, and the first step
    whose loss was not finite, read back every CHECK_EVERY steps. With `validation`, also the
    confusion matrix (rows: true class, columns: predicted), or for `multi_label` data (no
    accuracy) every image's probabilities and targets, which its scores need."""

    def __init__(self, device: torch.device, validation: bool = False, multi_label: bool = False):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = 0
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.multi_label = multi_label
        # [true * classes + predicted] counts; sized at the first batch (the head's width)
        self.confusion_counts = (torch.zeros(0, device=device, dtype=torch.long)
                                 if validation and not multi_label else None)
        self.scores: list[tuple[torch.Tensor, torch.Tensor]] | None = (
            [] if validation and multi_label else None)
        self.in_top_k = torch.zeros((), device=device, dtype=torch.long)  # validation, > TOP_K classes

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            step: int | None = None) -> None:
        """`step`: the training step, watched for a non-finite loss (validation is not)."""
        loss = loss.detach()
        self.loss += loss * len(labels)
        self.count += len(labels)
        if step is not None:
            bad = (self.first_bad_step < 0) & ~torch.isfinite(loss)
            self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        if self.multi_label:
            if self.scores is not None:
                self.scores.append((logits.sigmoid(), labels))
            return
        predicted = logits.argmax(dim=1)
        self.correct += (predicted == labels).sum()
        if self.confusion_counts is not None:
            classes = logits.shape[1]
            if self.confusion_counts.numel() == 0:
                self.confusion_counts = self.confusion_counts.new_zeros(classes * classes)
            # index_add_, not bincount: bincount reads the largest index back (a device wait)
            self.confusion_counts.index_add_(0, labels * classes + predicted,
                                             torch.ones_like(labels))
            if classes > TOP_K:
                self.in_top_k += (logits.topk(TOP_K, dim=1).indices == labels[:, None]).any(1).sum()

    def check_finite(self, epoch: int, steps: int) -> None:
        step = int(distributed.all_max(self.first_bad_step.clone()))  # every rank stops
        if step >= 0:
            raise TrainingFailed(
                f"the training loss is not finite at epoch {epoch}, step {step + 1} of {steps}. "
                "The last good checkpoint is kept. Lower optimizer.lr, set trainer.grad_clip "
                "(e.g. 1.0), or use trainer.precision=32.")

    def means(self) -> tuple[float, float]:
        """Means over every image, summed over the ranks under torchrun."""
        sums = torch.stack([self.loss.double(), self.correct.double(),
                            torch.tensor(float(self.count), device=self.loss.device).double()])
        loss, correct, count = distributed.all_sum(sums).tolist()
        if count == 0:  # nothing readable (data.bad_images=skip): the caller says so
            return math.nan, math.nan
        return loss / count, math.nan if self.multi_label else correct / count

    def top_k_accuracy(self) -> float:
        """The share of images whose class is among the TOP_K highest logits, over the ranks."""
        counts = torch.stack([self.in_top_k.double(),
                              torch.tensor(float(self.count), device=self.in_top_k.device).double()])
        hits, count = distributed.all_sum(counts).tolist()
        return hits / count if count else math.nan

    def running_accuracy(self) -> float:
        return self.correct.item() / max(self.count, 1)

    def confusion(self) -> list[list[int]]:
        """The matrix, summed over the ranks under torchrun (a rank that saw no batch, with
        fewer validation images than ranks, adds zeros)."""
        counts = self.confusion_counts
        classes = int(distributed.all_max(torch.tensor(math.isqrt(counts.numel()),
                                                       device=counts.device)))
        counts = counts if counts.numel() else counts.new_zeros(classes * classes)
        return distributed.all_sum(counts).view(classes, classes).tolist()

    def probabilities_and_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-label validation: every image's probabilities and 0/1 targets, on the CPU,
        gathered from the ranks under torchrun."""
        pairs = self.scores or []
        probabilities = torch.cat([p.cpu() for p, _ in pairs]) if pairs else torch.zeros(0)
        targets = torch.cat([t.cpu() for _, t in pairs]) if pairs else torch.zeros(0)
        return distributed.all_rows(probabilities), distributed.all_rows(targets)


CHECK_EVERY = 50  # steps between checks for a non-finite loss (each waits for the device)


def autocast(device: torch.device, precision: str):
    """The context a forward pass runs in at `precision` (32 | bf16 | 16-mixed)."""
    dtype = PRECISIONS[precision]
    if dtype is None:  # full precision: not even a disabled autocast context per batch
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def unwrapped(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return module


@dataclass
class Step:
    """How a batch goes through the model: which module, on which device, at what precision.

    `module` is the Net, or only its head when the backbone's outputs are cached; `wrap`
    puts DDP and/or torch.compile around it (`rewrap` again when the trainable set
    changes: DDP must see it). train()/eval() always go to the whole Net.
    """

    module: nn.Module
    device: torch.device
    precision: str = "32"  # 32 | bf16 | 16-mixed (autocast; fp16 adds a gradient scaler)
    channels_last: bool = False
    grad_clip: float | None = None  # max total gradient norm
    wrap: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = unwrapped
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy  # training
    mix: Callable | None = None  # MixUp/CutMix: (images, labels) -> (mixed, class probabilities)
    accumulate: int = 1  # batches per optimizer step (trainer.accumulate_grad_batches)
    multi_label: bool = False  # labels are 0/1 vectors: sigmoid per class, no accuracy
    threshold: float = 0.5  # multi-label: a label is predicted at this probability or more

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "16-mixed")
        self.forward = self.wrap(self.module)

    def rewrap(self) -> None:
        self.forward = self.wrap(self.module)

    def autocast(self):
        return autocast(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        # scale, unscale_, step and update do nothing more than plain PyTorch when fp16 is off
        self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_clip is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(
                [param for group in optimizer.param_groups for param in group["params"]],
                self.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def steps_per_epoch(self, batches: int) -> int:
        return math.ceil(batches / self.accumulate)

    def share(self, index: int, batches: int) -> tuple[int, bool]:
        """Batch `index` of `batches` in its accumulation group: the group's size (its loss
        is divided by it, so the step sees the group's mean, a short last group included)
        and whether the batch ends the group (the optimizer steps after it)."""
        start = index - index % self.accumulate
        size = min(self.accumulate, batches - start)
        return size, index == start + size - 1

    def to_device(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.forward(images).float()


def train_one_epoch(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    step: Step, epoch: int, max_epochs: int,
                    hooks: Sequence[Hook] = ()) -> tuple[float, float]:
    """One pass over the training data; a non-finite loss stops it (TrainingFailed).

    The progress bar shows only on a terminal (no bar spam in CI or SLURM logs); updating it
    waits for the device, so it is updated every SAMPLE_EVERY steps only.
    """
    net.train()  # Net.train keeps fully frozen modules in eval mode
    totals = Totals(step.device, multi_label=step.multi_label)
    bar = tqdm(loader, desc=f"epoch {epoch}/{max_epochs}", leave=False,
               disable=None if distributed.is_main() else True, dynamic_ncols=True)
    steps_before = (epoch - 1) * step.steps_per_epoch(len(loader))
    optimizer.zero_grad(set_to_none=True)
    pending = False  # gradients added since the last optimizer step
    for index, batch in enumerate(bar):
        group_size, ends_group = step.share(index, len(loader))
        if batch is not None:  # None: every image of it was unreadable (data.bad_images=skip)
            images, labels = step.to_device(*batch)
            loss, logits = training_loss(step, images, labels)
            step.backward(loss if group_size == 1 else loss / group_size)  # no op when 1
            pending = True
            totals.add(loss, logits, labels, index)
            if index % CHECK_EVERY == CHECK_EVERY - 1:
                totals.check_finite(epoch, len(loader))
            if not bar.disable and index % SAMPLE_EVERY == 0:
                shown = {"loss": f"{loss.item():.4f}"}
                if not step.multi_label:
                    shown["acc"] = f"{totals.running_accuracy():.3f}"
                bar.set_postfix({**shown, "lr": f"{base_lr(optimizer):.3g}"})
        if ends_group and pending:
            step.optimizer_step(optimizer)
            pending = False
            for hook in hooks:
                hook.on_train_batch_end(steps_before + index // step.accumulate + 1, loss)
    totals.check_finite(epoch, len(loader))
    loss, accuracy = totals.means()
    # a mixed image has two labels: no accuracy is claimed for it
    return loss, math.nan if step.mix is not None else accuracy


def training_loss(step: Step, images: torch.Tensor, labels: torch.Tensor):
    """The batch's training loss and logits: mixed first (MixUp/CutMix, soft targets) if
    asked, then the run's criterion (class weights, label smoothing)."""
    targets = labels
    if step.mix is not None:
        images, targets = step.mix(images, labels)
    logits = step.logits(images)
    return step.criterion(logits, targets), logits


@dataclass
class Evaluation:
    loss: float
    accuracy: float  # NaN for multi-label data
    confusion: list[list[int]]  # [true class][predicted class] image counts; [] multi-label
    scores: dict[str, float]  # the other epoch scores, as EpochMetrics names them
    images: int  # readable validation images, over all ranks
    multi_label: MultiLabelScores | None = None


def evaluate(net: nn.Module, loader: DataLoader, step: Step) -> Evaluation:
    """The plain validation loss (cross-entropy, or BCE for multi-label data) and scores."""
    net.eval()
    totals = Totals(step.device, validation=True, multi_label=step.multi_label)
    loss_of = F.binary_cross_entropy_with_logits if step.multi_label else F.cross_entropy
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            images, labels = step.to_device(*batch)
            logits = step.logits(images)
            totals.add(loss_of(logits, labels), logits, labels)
    loss, accuracy = totals.means()
    if step.multi_label:
        probabilities, targets = totals.probabilities_and_targets()
        scores = (multi_label_scores(probabilities, targets, step.threshold) if len(targets)
                  else None)
        return Evaluation(loss, accuracy, [], scores.epoch_scores() if scores else {},
                          len(targets), scores)
    confusion = totals.confusion()
    balanced, macro_f1 = confusion_scores(confusion)
    top_k = totals.top_k_accuracy() if len(confusion) > TOP_K else math.nan
    return Evaluation(loss, accuracy, confusion,
                      {"val_balanced_acc": balanced, "val_macro_f1": macro_f1,
                       f"val_top{TOP_K}_acc": top_k}, sum(map(sum, confusion)))


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """optimizer.lr under the schedule: the first group's rate without its multiplier."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)


@dataclass
class Monitor:
    """Which validation metric decides the best checkpoint."""

    key: str = "val_acc"
    higher_is_better: bool = True

    @classmethod
    def for_metric(cls, optimized_metric: str) -> "Monitor":
        """The epoch metric behind best_X / last_X: X, lower is better for a loss."""
        key = optimized_metric.split("_", 1)[1]  # best_val_loss -> val_loss
        return cls(key, direction(optimized_metric) == "maximize")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


@dataclass
class Progress:
    """Where training stands after `epoch` finished epochs; a checkpoint holds it."""

    epoch: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    best: float | None = None
    best_epoch: int = 0
    best_confusion: list[list[int]] = field(default_factory=list)  # the best epoch's, on val
    stop_reason: str | None = None  # why training ended before max_epochs (early stopping)
    monitor: Monitor = field(default_factory=Monitor)  # from the config, not saved

    def record(self, metrics: EpochMetrics, confusion: list[list[int]]) -> bool:
        """Add a finished epoch; whether it is the best so far."""
        value = getattr(metrics, self.monitor.key)
        improved = self.monitor.improved(value, self.best)
        if improved:
            self.best, self.best_epoch, self.best_confusion = value, metrics.epoch, confusion
        self.epoch = metrics.epoch
        self.history.append(metrics)
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": [asdict(row) for row in self.history],
                "best": self.best, "best_epoch": self.best_epoch,
                "best_confusion": self.best_confusion, "stop_reason": self.stop_reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
        self.history = [EpochMetrics(**row) for row in state["history"]]
        self.best_confusion = state.get("best_confusion", [])
        self.stop_reason = state.get("stop_reason")
        self.check()

    def check(self) -> None:
        """A file's progress must add up: an epoch per history row in order, the best one
        among them (a ValueError: restore names the file)."""
        epochs = [row.epoch for row in self.history]
        if (type(self.epoch) is not int or epochs != list(range(1, self.epoch + 1))
                or type(self.best_epoch) is not int or not 0 <= self.best_epoch <= self.epoch
                or (self.epoch > 0) != (self.best_epoch > 0)
                or not isinstance(self.stop_reason, str | None)):
            raise ValueError(f"epoch {self.epoch!r}, best epoch {self.best_epoch!r} and the "
                             f"epochs of its history {epochs[:5]} do not add up")


class RandomStreams:
    """Every random stream the next epoch draws from: dropout and augmentation (torch,
    CUDA, numpy, random) and each loader's own generator (shuffling)."""

    def __init__(self, loaders: Sequence[DataLoader]):
        self.loaders = loaders

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
                "numpy": numpy_rng_state(), "python": random.getstate(),
                "loaders": [loader.generator.get_state() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None:  # this process's GPU (each rank's own under torchrun)
            torch.cuda.set_rng_state(state["cuda"])
        name, keys, position, has_gauss, cached_gauss = state["numpy"]
        np.random.set_state((name, keys.numpy(), position, has_gauss, cached_gauss))
        random.setstate(state["python"])
        for loader, generator_state in zip(self.loaders, state["loaders"], strict=True):
            loader.generator.set_state(generator_state)


def numpy_rng_state() -> tuple:
    """numpy's RNG state with its key array as a tensor: loadable with weights_only=True."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return name, torch.from_numpy(keys.copy()), position, has_gauss, cached_gauss


class MetricsCsv(Hook):
    """metrics.csv: one row per finished epoch, flushed so it can be watched. Its `seconds`
    are the wall time since the previous row (or the fit's start): what the epoch cost the
    run, with what every hook did in it (the checkpoint's copy, say).

    A resumed run rewrites it from its checkpoint's history first: a row written after that
    checkpoint is dropped and one the kill cut off is restored, so no epoch is missing or
    doubled whichever of the two files was written last.
    """

    def __init__(self, path: str, scale_units: Sequence[str] = ()):
        self.path, self.scale_units = path, list(scale_units)  # freeze=auto's units
        self.last_row = 0.0

    def on_fit_start(self, progress: Progress) -> None:
        with atomic_write(self.path) as handle:
            writer = csv.writer(handle)
            writer.writerow(METRIC_COLUMNS + [SCALE_COLUMN.format(unit) for unit in self.scale_units])
            writer.writerows(csv_row(row, self.scale_units) for row in progress.history)
        self.last_row = time.perf_counter()

    def on_epoch_end(self, progress: Progress, improved: bool) -> None:
        now = time.perf_counter()
        row = replace(progress.history[-1], seconds=now - self.last_row)
        self.last_row = now
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow(csv_row(row, self.scale_units))


def csv_row(metrics: EpochMetrics, scale_units: Sequence[str] = ()) -> list:
    return ([spreadsheet_cell(getattr(metrics, column)) for column in METRIC_COLUMNS]
            + [spreadsheet_cell(metrics.lr_scales.get(unit, math.nan)) for unit in scale_units])


def fit(net: nn.Module, step: Step, optimizer: torch.optim.Optimizer, scheduler: Any,
        loaders: tuple[DataLoader, DataLoader], max_epochs: int, progress: Progress,
        hooks: Sequence[Hook] = ()) -> None:
    """Train from the epoch after `progress.epoch` up to max_epochs, recording each epoch in
    `progress`; the hooks do everything else (checkpoints, metrics.csv, loggers, unfreeze
    phases), in order, at the loop's moments. On the CPU a run resumed from a checkpoint of
    all the run's parts ends bit-identical to one never stopped."""
    for hook in hooks:
        hook.on_fit_start(progress)
    try:
        for epoch in range(progress.epoch + 1, max_epochs + 1):
            started = time.perf_counter()
            for hook in hooks:
                hook.on_epoch_start(epoch)
            metrics, confusion = train_and_validate(net, loaders, optimizer, scheduler, step,
                                                    epoch, max_epochs, hooks)
            metrics.seconds = time.perf_counter() - started
            improved = progress.record(metrics, confusion)
            log.info("epoch %d/%d  %s  lr %.3g  %.1fs%s", epoch, max_epochs, epoch_line(metrics),
                     metrics.lr, metrics.seconds, "  (best)" if improved else "")
            for hook in hooks:
                hook.on_epoch_end(progress, improved)
            if progress.stop_reason:  # a hook ended training (early stopping)
                break
    finally:  # also on Ctrl-C or a failure: the hooks finish what is pending
        for hook in hooks:
            hook.on_fit_end(progress)


def train_and_validate(net: nn.Module, loaders: tuple[DataLoader, DataLoader],
                       optimizer: torch.optim.Optimizer, scheduler: Any, step: Step, epoch: int,
                       max_epochs: int, hooks: Sequence[Hook] = ()
                       ) -> tuple[EpochMetrics, list[list[int]]]:
    """One epoch: train, validate, step the schedule (`seconds` is left to the caller).
    Returns the metrics and the validation confusion matrix."""
    train_loader, val_loader = loaders
    set_epoch(train_loader, epoch)
    lr = base_lr(optimizer)
    group_lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    train_loss, train_acc = train_one_epoch(net, train_loader, optimizer, step, epoch,
                                            max_epochs, hooks)
    for hook in hooks:
        hook.on_validation_start()
    val = evaluate(net, val_loader, step)
    for hook in hooks:
        hook.on_validation_end()
    if scheduler is not None:
        scheduler.step()
    return EpochMetrics(epoch, train_loss, train_acc, val.loss, val.accuracy, lr, seconds=0.0,
                        group_lrs=group_lrs, **val.scores), val.confusion
