"""Trainer stage: the epoch loop (train pass, eval pass, metrics.csv, checkpoints)."""

import contextlib
import csv
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune.checkpoint import RunCheckpoints
from finetune.errors import ConfigError
from finetune.freeze import unchanging_state_names

log = logging.getLogger(__name__)

POSTFIX_EVERY = 10  # steps between progress-bar updates (each waits for the device; none without a bar)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float


METRIC_COLUMNS = list(EpochMetrics.__dataclass_fields__)


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
    """Loss and accuracy summed on the device, read back once per epoch."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss.detach() * labels.numel()
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.count += labels.numel()

    def means(self) -> tuple[float, float]:
        return self.loss.item() / self.count, self.correct.item() / self.count


PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class Step:
    """How a batch goes through the model: which callable, on which device, at what precision.

    `forward` is the Net, or only its head when the backbone's outputs are cached, or a
    torch.compile'd version of either; train()/eval() always go to the whole Net.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    precision: str = "32"  # 32 | bf16 | 16-mixed (autocast; fp16 adds a gradient scaler)
    channels_last: bool = False

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "16-mixed")

    def autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:  # full precision: not even a disabled autocast context per batch
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if not self.scaler.is_enabled():
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def to_device(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.forward(images).float()


def train_one_epoch(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    step: Step, description: str) -> tuple[float, float]:
    net.train()  # Net.train keeps fully frozen modules in eval mode
    totals = Totals(step.device)
    bar = tqdm(loader, desc=description, leave=False, disable=None, dynamic_ncols=True)
    for index, batch in enumerate(bar):
        images, labels = step.to_device(*batch)
        logits = step.logits(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        step.backward_and_step(loss, optimizer)
        totals.add(loss, logits, labels)
        if not bar.disable and index % POSTFIX_EVERY == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{base_lr(optimizer):.3g}")
    return totals.means()


def evaluate(net: nn.Module, loader: DataLoader, step: Step) -> tuple[float, float]:
    net.eval()
    totals = Totals(step.device)
    with torch.inference_mode():
        for batch in loader:
            images, labels = step.to_device(*batch)
            logits = step.logits(images)
            totals.add(F.cross_entropy(logits, labels), logits, labels)
    return totals.means()


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """optimizer.lr under the schedule: the first group's rate without its multiplier."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)


class MetricsCsv:
    """metrics.csv: one row per finished epoch, flushed so it can be watched."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerow(METRIC_COLUMNS)

    def append(self, metrics: EpochMetrics) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow(asdict(metrics).values())


@dataclass
class Monitor:
    """Which validation metric decides the best checkpoint."""

    key: str = "val_acc"
    higher_is_better: bool = True

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


@dataclass
class FitResult:
    history: list[EpochMetrics]
    best_epoch: int


def fit(net: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
        optimizer: torch.optim.Optimizer, scheduler: Any, max_epochs: int, step: Step,
        run_dir: str, monitor: Monitor, checkpoint_extras: Callable[[], dict[str, Any]],
        before_epoch: Callable[[int], None] = lambda epoch: None) -> FitResult:
    """Train for max_epochs, writing metrics.csv and checkpoints/ (RunCheckpoints) each epoch.

    `before_epoch(epoch)` runs first in each epoch (gradual unfreezing hooks in there).
    """
    metrics_csv = MetricsCsv(os.path.join(run_dir, "metrics.csv"))
    checkpoints = RunCheckpoints(os.path.join(run_dir, "checkpoints"))
    checkpoints.write_frozen(net.state_dict(), unchanging_state_names(net))
    history: list[EpochMetrics] = []
    best, best_epoch = None, 0
    for epoch in range(1, max_epochs + 1):
        started = time.perf_counter()
        before_epoch(epoch)
        lr = base_lr(optimizer)
        train_loss, train_acc = train_one_epoch(net, train_loader, optimizer, step,
                                                f"epoch {epoch}/{max_epochs}")
        val_loss, val_acc = evaluate(net, val_loader, step)
        if scheduler is not None:
            scheduler.step()
        metrics = EpochMetrics(epoch, train_loss, train_acc, val_loss, val_acc, lr,
                               time.perf_counter() - started)
        value = getattr(metrics, monitor.key)
        improved = monitor.improved(value, best)
        if improved:
            best, best_epoch = value, epoch
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "epoch": epoch, "metrics": asdict(metrics), **checkpoint_extras()}
        checkpoints.save(state, unchanging_state_names(net), best=improved)
        metrics.seconds = time.perf_counter() - started  # the checkpoint copy included
        history.append(metrics)
        metrics_csv.append(metrics)
        log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  lr %.3g  %.1fs",
                 epoch, max_epochs, train_loss, train_acc, val_loss, val_acc, lr, metrics.seconds)
    checkpoints.wait()
    return FitResult(history, best_epoch)
