"""freeze=auto: each stage's learning rate follows its relative gradient norm (Auto-RGN,
Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023),
and freeze=auto:select's one measurement that chooses the stages to freeze.

Before each epoch a few training batches go through the model without a step. For each
optimizer group's parameters (one group per stage alias: @stem, @stage1, ..., @head, or
one per tensor with auto.granularity=tensor)
RGN = ||g|| / ||theta||, and the group's learning rate for that epoch is multiplied by
RGN / the largest RGN, on top of its own lr_mult; the new head is not compared (its weights
are random) and keeps scale 1. The measurement leaves everything a run
keeps as it was (weights, BatchNorm statistics, gradients, every random stream), so a run
whose scales are all 1 is bit-identical to a plain run.
"""

import csv
import itertools
import logging
import math
import random
from collections.abc import Callable, Collection, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from finetune.errors import ConfigError
from finetune.hooks import Hook
from finetune.model.stages import Aliases
from finetune.state.files import spreadsheet_cell
from finetune.train import distributed
from finetune.train.optim import layer_decay_rules

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def unit(group_name: str) -> str:
    """The stage a group belongs to: `@stage2/no_decay` and `@stage2` are one unit."""
    return group_name.split("/")[0]


def parameter_units(optimizer: torch.optim.Optimizer,
                    net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Each unit's parameters, the units in the model's order (the stem first)."""
    units: dict[str, list[nn.Parameter]] = {}
    for group in optimizer.param_groups:
        units.setdefault(unit(group["name"]), []).extend(group["params"])
    position = {id(param): index for index, param in enumerate(net.parameters())}
    return dict(sorted(units.items(), key=lambda item: min(position[id(p)] for p in item[1])))


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
            norms[name] = grad / weight if weight > 0 else math.nan  # all zero: no ratio
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


def mean_over_ranks(norms: dict[str, float], net: nn.Module) -> dict[str, float]:
    """Under torchrun every rank measured the same batches: their mean, the same on all."""
    names = list(norms)  # the model's order, the same on every rank
    device = next(net.parameters()).device  # nccl reduces tensors on the GPU only
    shared = distributed.all_sum(torch.tensor([norms[name] for name in names],
                                              dtype=torch.float64, device=device)).cpu()
    return {name: shared[index].item() / distributed.world() for index, name in enumerate(names)}


def scales_from(norms: dict[str, float], fresh: Collection[str] = ()) -> dict[str, float]:
    """Each unit's RGN over the largest (all 1 when no unit has a gradient). The `fresh`
    units (the new head: random weights, whose RGN says nothing about the shift) train at
    the full rate and are not compared; so does a unit whose weights are all zero."""
    compared = [value for name, value in norms.items()
                if name not in fresh and not math.isnan(value)]
    top = max(compared, default=0.0)
    return {name: (value / top if top > 0 and name not in fresh and not math.isnan(value)
                   else 1.0) for name, value in norms.items()}


def measuring_batches(dataset: Dataset, batch_size: int, count: int, seed: int,
                      collate: Callable) -> Iterable[Batch]:
    """`count` batches of the training set drawn by their own generator (seeded by the run's
    seed and the epoch), the same on every rank; the run's loaders are not touched."""
    generator = torch.Generator().manual_seed(seed)
    if hasattr(dataset, "measuring_copy"):  # a stream (data.streaming=true): no random access,
        measured = dataset.measuring_copy(seed)  # its rows from a place the seed draws
    else:
        measured = Subset(dataset, torch.randperm(len(dataset), generator=generator)
                          [:count * batch_size].tolist())
    # its generator, not the global one, seeds the iterator: the run's streams stay as they are
    loader = DataLoader(measured, batch_size=batch_size, collate_fn=collate, generator=generator)
    # lazy: read (and augmented) inside the measurement, whose streams are put back after
    return (batch for batch in itertools.islice(loader, count) if batch is not None)


def head_units(units: dict[str, list[nn.Parameter]], net: nn.Module) -> list[str]:
    """The units made only of the new head's parameters (Net.add_layers)."""
    head = {id(param) for param in net.add_layers.parameters()} if hasattr(net, "add_layers") else set()
    return [name for name, params in units.items() if all(id(param) in head for param in params)]


def scales_line(scales: dict[str, float], most: int = 12) -> str:
    """The scales for the log: each one, or past `most` units (a tensor each) the range."""
    if len(scales) <= most:
        return ", ".join(f"{name} {value:.3g}" for name, value in scales.items())
    ordered = sorted(scales, key=scales.__getitem__)
    return (f"for {len(scales)} tensors from {scales[ordered[0]]:.3g} ({ordered[0]}) to "
            f"{scales[ordered[-1]]:.3g} ({ordered[-1]}); rgn.csv has each")


class RelativeGradientScale(Hook):
    """A trainer hook (after the unfreeze phases, which add groups): measure, scale the
    groups' rates for the epoch, and put them back before the schedule steps. Its history
    (each epoch's RGN and scales) is a stateful part and goes to rgn.csv on rank 0."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: Callable[[int], Iterable[Batch]], loss: Callable):
        self.net, self.optimizer, self.batches, self.loss = net, optimizer, batches, loss
        self.csv_path: str | None = None
        self.picture_path: str | None = None
        self.history: list[dict[str, Any]] = []  # {"epoch", "rgn": {unit: ..}, "scale": {unit: ..}}
        self.saved: list[tuple[dict, float, float]] = []

    def write_to(self, csv_path: str, picture_path: str | None) -> None:
        """rgn.csv and, with plots on, rgn.png when the fit ends (rank 0 only)."""
        self.csv_path, self.picture_path = csv_path, picture_path

    def on_fit_start(self, progress: Any) -> None:
        if self.csv_path is not None:  # a resumed run: the rows its checkpoint has, no more
            with open(self.csv_path, "w", newline="") as handle:
                csv.writer(handle).writerow(["epoch", "group", "rgn", "scale"])
            for row in self.history:
                self.write(row)

    def on_epoch_start(self, epoch: int) -> None:
        units = parameter_units(self.optimizer, self.net)
        norms = mean_over_ranks(relative_gradient_norms(self.net, self.batches(epoch), self.loss,
                                                        units), self.net)
        row = {"epoch": epoch, "rgn": norms, "scale": scales_from(norms, head_units(units, self.net))}
        self.history.append(row)
        self.scale(row["scale"])
        log.info("auto: epoch %d learning-rate scales %s", epoch, scales_line(row["scale"]))
        if self.csv_path is not None:
            self.write(row)

    def scale(self, scales: dict[str, float]) -> None:
        self.saved = [(group, group["lr"], group.get("lr_mult", 1.0))
                      for group in self.optimizer.param_groups]
        for group, lr, mult in self.saved:
            factor = scales.get(unit(group["name"]), 1.0)
            group["lr"], group["lr_mult"] = lr * factor, mult * factor

    def on_epoch_end(self, progress: Any, improved: bool) -> None:
        """The epoch's scales join its record: metrics.csv, the loggers, the checkpoint."""
        progress.history[-1].lr_scales = dict(self.history[-1]["scale"])

    def units(self) -> list[str]:
        """The units it scales (metrics.csv's lr_scale/<unit> columns), in the model's order."""
        return list(parameter_units(self.optimizer, self.net))

    def on_validation_end(self) -> None:  # the schedule steps from the unscaled rates
        for group, lr, mult in self.saved:
            group["lr"], group["lr_mult"] = lr, mult
        self.saved = []

    def on_fit_end(self, progress: Any) -> None:
        self.on_validation_end()
        if self.picture_path is not None and self.history:
            from finetune.show.plots import draw_or_warn, plot_rgn

            draw_or_warn(plot_rgn, self.history, self.picture_path)

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


def stage_units(net: nn.Module, aliases: Aliases) -> dict[str, list[nn.Parameter]]:
    """Each stage alias's parameters (@stem, @stage1, .., @head, and @classifier where the
    backbone keeps one); a parameter in no stage belongs to `other`."""
    stages = layer_decay_rules(1.0, aliases)
    units: dict[str, list[nn.Parameter]] = {}
    for name, param in net.named_parameters():
        alias = next((rule.name for rule in stages if rule.matches(name)), "other")
        units.setdefault(alias, []).append(param)
    return units


NEVER_FROZEN = ("@head", "other")  # the new head trains; a part in no stage cannot be named


@dataclass
class StageChoice:
    """freeze=auto:select's decision: the stages frozen, and the norms that chose them (none
    when a resumed run takes its first run's decision from its checkpoint)."""

    frozen: list[str]
    keep: float
    norms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def measured(cls, norms: dict[str, float], keep: float) -> "StageChoice":
        scales = scales_from(norms, NEVER_FROZEN)
        return cls([unit for unit in norms if unit not in NEVER_FROZEN and scales[unit] < keep],
                   keep, norms)

    def describe(self) -> str:
        frozen = ", ".join(self.frozen) or "none"
        if not self.norms:
            return f"freeze=auto:select: frozen as the run first chose (its checkpoint): {frozen}"
        scales = scales_from(self.norms, NEVER_FROZEN)
        figures = ", ".join(f"{unit} {value:.3g} ({scales[unit]:.2f})"
                            for unit, value in self.norms.items())
        return (f"freeze=auto:select: relative gradient norms (share of the largest): {figures}; "
                f"below auto.keep={self.keep:g}, frozen: {frozen}")


def choose_stages(net: nn.Module, aliases: Aliases, batches: Iterable[Batch], loss: Callable,
                  keep: float, first_choice: Any = None) -> StageChoice:
    """freeze=auto:select: each stage's relative gradient norm, measured once with the whole
    model trainable, chooses the stages below keep x the largest to freeze. A resumed run
    takes the choice its first run made (`first_choice`, read from its checkpoint)."""
    if aliases.stage_count == 0:
        raise ConfigError(f"freeze=auto:select freezes whole stages, but the backbone "
                          f"({aliases.family}) has no stage mapping; use a freeze pattern list.")
    units = stage_units(net, aliases)
    if first_choice is not None:
        return StageChoice(checked_choice(first_choice, units), keep)
    return StageChoice.measured(
        mean_over_ranks(relative_gradient_norms(net, batches, loss, units), net), keep)


def checked_choice(first_choice: Any, units: dict[str, Any]) -> list[str]:
    """A checkpoint's freeze=auto:select choice: stages of this backbone, nothing else."""
    allowed = [unit for unit in units if unit not in NEVER_FROZEN]
    if not (isinstance(first_choice, list)
            and all(isinstance(unit, str) and unit in allowed for unit in first_choice)):
        raise ConfigError(f"resume: the checkpoint's freeze=auto:select choice {first_choice!r} "
                          f"is not a list of this backbone's stages ({', '.join(allowed)}); the "
                          "file is damaged or from another model. Start a new run.")
    return list(first_choice)


def describe(batches: int, granularity: str) -> str:
    part = "stage" if granularity == "stage" else "parameter tensor"
    return (f"freeze=auto: before each epoch, {batches} training batches measure each {part}'s "
            "relative gradient norm ||g|| / ||theta||; its learning rate for the epoch is scaled "
            "by it over the largest (on top of its lr_mult); rgn.csv and rgn.png have the figures")

