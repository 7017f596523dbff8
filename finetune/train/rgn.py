"""auto.mode=scale: each stage's learning rate follows its relative gradient norm (Auto-RGN,
Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023).

Before each epoch a few training batches go through the model without a step. For each
optimizer group's parameters (one group per stage alias: @stem, @stage1, ..., @head)
RGN = ||g|| / ||theta||, and the group's learning rate for that epoch is multiplied by
RGN / the largest RGN, on top of its own lr_mult. The measurement leaves everything a run
keeps as it was (weights, BatchNorm statistics, gradients, every random stream), so a run
whose scales are all 1 is bit-identical to a plain run.
"""

import csv
import itertools
import logging
import random
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from finetune.hooks import Hook
from finetune.state.files import spreadsheet_cell
from finetune.train import distributed

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def unit(group_name: str) -> str:
    """The stage a group belongs to: `@stage2/no_decay` and `@stage2` are one unit."""
    return group_name.split("/")[0]


def parameter_units(optimizer: torch.optim.Optimizer) -> dict[str, list[nn.Parameter]]:
    units: dict[str, list[nn.Parameter]] = {}
    for group in optimizer.param_groups:
        units.setdefault(unit(group["name"]), []).extend(group["params"])
    return units


@contextmanager
def untouched(net: nn.Module):
    """The model's buffers (BatchNorm statistics), gradients and requires_grad flags, and
    the random streams (torch, CUDA, Python, NumPy), as they were before the body ran."""
    buffers = [(buffer, buffer.detach().clone()) for buffer in net.buffers()]
    params = [(param, param.grad, param.requires_grad) for param in net.parameters()]
    streams = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    for param, _, _ in params:
        param.grad = None
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for param, grad, flag in params:
            param.grad = grad
            param.requires_grad_(flag)
        torch.set_rng_state(streams[0])
        random.setstate(streams[1])
        np.random.set_state(streams[2])
        if streams[3] is not None:
            torch.cuda.set_rng_state_all(streams[3])


def relative_gradient_norms(net: nn.Module, batches: Iterable[Batch],
                            loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            units: dict[str, list[nn.Parameter]]) -> dict[str, float]:
    """||g|| / ||theta|| per unit, g the gradient of `loss` summed over `batches` (the
    ratio between units is what matters); nothing the run keeps changes."""
    with untouched(net):
        net.train()
        for images, labels in batches:
            loss(images, labels).backward()
        norms = {}
        for name, params in units.items():
            grads = [param.grad.float().square().sum() for param in params if param.grad is not None]
            weights = [param.detach().float().square().sum() for param in params]
            weight = torch.stack(weights).sum().sqrt().item() if weights else 0.0
            grad = torch.stack(grads).sum().sqrt().item() if grads else 0.0
            norms[name] = grad / weight if weight > 0 else 0.0
    return norms


def step_loss(step) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of a batch through the step's module itself (not DDP's wrapper, so
    measuring syncs nothing), at the step's device and precision."""
    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, labels = step.to_device(images, labels)
        with step.autocast():
            logits = step.module(images).float()
        return step.criterion(logits, labels)

    return loss


def scales_from(norms: dict[str, float]) -> dict[str, float]:
    """Each unit's RGN over the largest (all 1 when no unit has a gradient)."""
    top = max(norms.values(), default=0.0)
    return {name: (value / top if top > 0 else 1.0) for name, value in norms.items()}


def measuring_batches(dataset: Dataset, batch_size: int, count: int, seed: int,
                      collate: Callable) -> Iterable[Batch]:
    """`count` batches of the training set drawn by their own generator (seeded by the run's
    seed and the epoch), the same on every rank; the run's loaders are not touched."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[:count * batch_size].tolist()
    # its generator, not the global one, seeds the iterator: the run's streams stay as they are
    loader = DataLoader(Subset(dataset, chosen), batch_size=batch_size, collate_fn=collate,
                        generator=generator)
    # lazy: read (and augmented) inside the measurement, whose streams are put back after
    return (batch for batch in itertools.islice(loader, count) if batch is not None)


class RelativeGradientScale(Hook):
    """A trainer hook (after the unfreeze phases, which add groups): measure, scale the
    groups' rates for the epoch, and put them back before the schedule steps. Its history
    (each epoch's RGN and scales) is a stateful part and goes to rgn.csv on rank 0."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: Callable[[int], Iterable[Batch]], loss: Callable):
        self.net, self.optimizer, self.batches, self.loss = net, optimizer, batches, loss
        self.csv_path: str | None = None
        self.history: list[dict[str, Any]] = []  # {"epoch", "rgn": {unit: ..}, "scale": {unit: ..}}
        self.saved: list[tuple[dict, float, float]] = []

    def write_to(self, csv_path: str) -> None:
        """rgn.csv (rank 0 only)."""
        self.csv_path = csv_path

    def on_fit_start(self, progress: Any) -> None:
        if self.csv_path is not None:  # a resumed run: the rows its checkpoint has, no more
            with open(self.csv_path, "w", newline="") as handle:
                csv.writer(handle).writerow(["epoch", "group", "rgn", "scale"])
            for row in self.history:
                self.write(row)

    def on_epoch_start(self, epoch: int) -> None:
        units = parameter_units(self.optimizer)
        norms = relative_gradient_norms(self.net, self.batches(epoch), self.loss, units)
        names = sorted(norms)
        device = next(self.net.parameters()).device  # nccl reduces tensors on the GPU only
        shared = distributed.all_sum(torch.tensor([norms[name] for name in names],
                                                  dtype=torch.float64, device=device)).cpu()
        norms = {name: shared[index].item() / distributed.world() for index, name in enumerate(names)}
        row = {"epoch": epoch, "rgn": norms, "scale": scales_from(norms)}
        self.history.append(row)
        self.scale(row["scale"])
        log.info("auto: epoch %d learning-rate scales %s", epoch,
                 ", ".join(f"{name} {value:.3g}" for name, value in row["scale"].items()))
        if self.csv_path is not None:
            self.write(row)

    def scale(self, scales: dict[str, float]) -> None:
        self.saved = [(group, group["lr"], group.get("lr_mult", 1.0))
                      for group in self.optimizer.param_groups]
        for group, lr, mult in self.saved:
            factor = scales.get(unit(group["name"]), 1.0)
            group["lr"], group["lr_mult"] = lr * factor, mult * factor

    def on_validation_end(self) -> None:  # the schedule steps from the unscaled rates
        for group, lr, mult in self.saved:
            group["lr"], group["lr_mult"] = lr, mult
        self.saved = []

    def on_fit_end(self, progress: Any) -> None:
        self.on_validation_end()

    def write(self, row: dict[str, Any]) -> None:
        with open(self.csv_path, "a", newline="") as handle:
            writer = csv.writer(handle)
            for name, value in row["rgn"].items():
                writer.writerow([row["epoch"], spreadsheet_cell(name), f"{value:.6g}",
                                 f"{row['scale'][name]:.6g}"])

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state["history"]
        if not isinstance(history, list) or not all(
                isinstance(row, dict) and isinstance(row.get("scale"), dict) for row in history):
            raise ValueError("auto: its history is not a list of epochs")
        self.history = [{"epoch": int(row["epoch"]),
                         "rgn": {str(k): float(v) for k, v in row["rgn"].items()},
                         "scale": {str(k): float(v) for k, v in row["scale"].items()}}
                        for row in history]


def describe(batches: int) -> str:
    return (f"auto: before each epoch, {batches} training batches measure each stage's relative "
            "gradient norm ||g|| / ||theta||; its learning rate for the epoch is scaled by it over "
            "the largest (on top of its lr_mult); rgn.csv has the figures")

