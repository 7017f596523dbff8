"""mode=lr_find: the learning-rate range test (Smith 2015, as fastai's lr_find runs it).

The configured run is built as for training: the same trainable set, optimizer groups
(their lr_mult ratios kept), loss, precision and feature cache. The rate then grows
exponentially from lr_find.start to lr_find.end, one optimizer step per batch, while the
loss is recorded; the test stops early once the loss has diverged. Afterwards the weights,
BatchNorm statistics and random streams are put back as they were: nothing is trained.

The suggestion is a tenth of the rate at the lowest smoothed loss, the classic rule: the
lowest point is already at the edge of divergence.
"""

import copy
import itertools
import logging
import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from finetune.show.plots import draw_or_warn
from finetune.state.files import atomic_write
from finetune.train.trainer import RandomStreams, Step

log = logging.getLogger(__name__)

SMOOTHING = 0.98  # exponential smoothing of the recorded loss, bias-corrected
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


@dataclass
class RangeTest:
    rates: list[float]
    losses: list[float]
    smoothed: list[float]

    def suggestion(self) -> float:
        lowest = min(range(len(self.smoothed)), key=self.smoothed.__getitem__)
        return self.rates[lowest] / 10


def range_test(net: torch.nn.Module, step: Step, optimizer: torch.optim.Optimizer,
               loader: torch.utils.data.DataLoader, base_lr: float, start: float, end: float,
               steps: int) -> RangeTest:
    """Train `steps` batches at rates from `start` to `end` (each group at its own multiple
    of `base_lr`), then restore the weights, the optimizer and the random streams."""
    weights, optimizer_state = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    streams = RandomStreams([loader])
    random_state = streams.state_dict()
    ratios = [group.get("initial_lr", group["lr"]) / base_lr for group in optimizer.param_groups]
    result, average, best = RangeTest([], [], []), 0.0, math.inf
    try:
        net.train()
        batches = itertools.islice(itertools.cycle(loader), steps)  # the loader again if short
        for index, (images, labels) in enumerate(batches):
            rate = start * (end / start) ** (index / max(steps - 1, 1))
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = rate * ratio
            images, labels = step.to_device(images, labels)
            loss = step.criterion(step.logits(images), labels)
            step.backward(loss)
            step.optimizer_step(optimizer)
            value = loss.item()
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            smoothed = average / (1 - SMOOTHING ** (index + 1))
            result.rates.append(rate)
            result.losses.append(value)
            result.smoothed.append(smoothed)
            best = min(best, smoothed)
            if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
                break
    finally:
        net.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        streams.load_state_dict(random_state)
    return result


def write_results(test: RangeTest, run_dir: str, plots: bool) -> str:
    path = os.path.join(run_dir, "lr_find.csv")
    with atomic_write(path) as handle:
        handle.write("lr,loss,smoothed_loss\n")
        handle.writelines(f"{rate:.6g},{loss:.6g},{smoothed:.6g}\n" for rate, loss, smoothed
                          in zip(test.rates, test.losses, test.smoothed, strict=True))
    if plots:
        draw_or_warn(plot_range_test, test, os.path.join(run_dir, "lr_find.png"))
    return path


def plot_range_test(test: RangeTest, path: str) -> None:
    from finetune.show.plots import new_figure, save

    figure = new_figure(6, 4)
    axes = figure.subplots()
    axes.plot(test.rates, test.losses, alpha=0.3, label="loss")
    axes.plot(test.rates, test.smoothed, label="smoothed loss")
    axes.axvline(test.suggestion(), color="black", linestyle="--",
                 label=f"suggested optimizer.lr={test.suggestion():.2g}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (optimizer.lr)")
    axes.set_ylabel("training loss")
    top = min(max(test.smoothed), 2 * test.smoothed[0]) if test.smoothed else 1
    axes.set_ylim(bottom=min(test.losses, default=0) * 0.9, top=top * 1.05)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    save(figure, path)


def find_lr(cfg: DictConfig, setup, training, run_dir: str, plots: bool,
            overrides: Sequence[str]) -> float:
    """mode=lr_find on a built run (run.build, run.training_inputs): writes lr_find.csv (and
    lr_find.png) into run_dir and says the suggested optimizer.lr and how to use it."""
    settings = cfg.lr_find
    test = range_test(setup.net, training.step, setup.optimizer, training.loaders[0],
                      cfg.optimizer.lr, settings.start, settings.end, settings.steps)
    os.makedirs(run_dir, exist_ok=True)
    path = write_results(test, run_dir, plots)
    suggested = test.suggestion()
    # the training command: the range test's own settings (lr_find.*) mean nothing there
    command = [arg for arg in overrides
               if not arg.lstrip("+~").startswith(("mode=", "optimizer.lr=", "lr_find."))]
    ended = (f"the loss diverged at lr {test.rates[-1]:.2g}" if len(test.rates) < settings.steps
             else f"to lr {settings.end:.2g}")
    log.info("lr_find: %d steps from lr %.2g (%s); lowest smoothed loss %.4f at lr %.2g\n"
             "suggested optimizer.lr=%.2g (a tenth of that); results: %s%s\n"
             "  train with it:  python train.py %s", len(test.rates), settings.start, ended,
             min(test.smoothed), suggested * 10, suggested, path,
             " and lr_find.png" if plots else "",
             shlex.join([*command, f"optimizer.lr={suggested:.2g}"]))
    return suggested
