"""Wires the stages in order: config -> model -> data -> freeze -> optim -> trainer."""

import logging
import os
import random
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from finetune import distributed
from finetune.config import validate
from finetune.data import Data, build_data, fingerprint, make_loader
from finetune.digest import tensors_digest
from finetune.errors import TrainingFailed
from finetune.features import CacheDecision, cached_features, decide
from finetune.freeze import apply_freeze
from finetune.loggers import RunLog, build_loggers, check_loggers, config_hparams
from finetune.model import (
    InputSpec,
    Net,
    Weights,
    build_backbone,
    build_net,
    input_spec,
    resolve_weights,
)
from finetune.optim import build_optimizer, build_scheduler, group_rules
from finetune.outputs import check_fresh_run_dir, write_json
from finetune.plots import draw_or_warn, plot_confusion, plots_enabled
from finetune.report import (
    ParamRow,
    format_report,
    parameter_rows,
    total_count,
    trainable_count,
    write_params_tsv,
)
from finetune.resume import load_last, restore
from finetune.stages import Aliases, resolve_aliases
from finetune.trainer import EpochMetrics, Monitor, Progress, Step, fit, resolve_device
from finetune.unfreeze import UnfreezeSchedule, plan_phases

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def summarize(status: str, history: list[EpochMetrics], best_epoch: int, weights: str,
              rows: list[ParamRow], seconds: float, overrides: Sequence[str] = (),
              error: str | None = None) -> dict:
    """summary.json: the status, the best and last metrics so far, the run's size and the
    command-line overrides it ran with."""
    summary: dict[str, Any] = {"status": status, "overrides": list(overrides)}
    if error is not None:
        summary["error"] = error
    if history:
        summary.update({
            "best_val_acc": max(epoch.val_acc for epoch in history),
            "best_val_loss": min(epoch.val_loss for epoch in history),
            "best_epoch": best_epoch,
            "last_val_acc": history[-1].val_acc,
            "last_val_loss": history[-1].val_loss})
    summary.update({"epochs_completed": len(history), "weights": weights,
                    "trainable_params": trainable_count(rows), "total_params": total_count(rows),
                    "seconds": round(seconds, 2)})
    return summary


@dataclass
class Setup:
    """Everything a run trains with, built from the config and nothing else."""

    device: torch.device
    weights: Weights
    spec: InputSpec
    data: Data
    net: Net
    aliases: Aliases
    optimizer: torch.optim.Optimizer
    scheduler: Any
    unfreeze: UnfreezeSchedule
    cache: CacheDecision

    def rows(self) -> list[ParamRow]:
        return parameter_rows(self.net, self.optimizer)


def build(cfg: DictConfig) -> Setup:
    """Validate the config and build every stage in order; train nothing, write nothing."""
    validate(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    weights = resolve_weights(cfg.backbone)
    if weights.pretrained:
        log.info("backbone %s starts from %s", cfg.backbone.name, weights)
    else:
        log.warning("NOTE: backbone %s starts from %s", cfg.backbone.name, weights)
    backbone = build_backbone(cfg.backbone, weights)
    spec = input_spec(backbone, weights, cfg.backbone.name, cfg.data.image_size,
                      cfg.data.get("use_weights_transform", False))
    data = build_data(cfg.data, spec, cfg.seed, pin_memory=device.type == "cuda",
                      shard=distributed.shard())
    net = build_net(backbone, cfg.head, data.num_classes, spec.image_size)
    aliases = resolve_aliases(net.pretrained)
    apply_freeze(net, cfg.freeze, cfg.frozen_modules, aliases)
    plan = plan_phases(net, cfg.unfreeze, aliases, cfg.trainer.max_epochs)
    net.to(device, memory_format=torch.channels_last if cfg.trainer.channels_last
           else torch.preserve_format)
    optimizer = build_optimizer(net, cfg.optimizer, group_rules(cfg, net, aliases))
    scheduler = build_scheduler(optimizer, cfg.scheduler, adds_groups=bool(plan))
    unfreeze = UnfreezeSchedule(plan, net, optimizer, scheduler, cfg.optimizer, cfg.frozen_modules)
    cache = decide(str(cfg.trainer.cache_features).lower(), net, data.random_augmentation,
                   bool(plan), distributed.active())
    return Setup(device, weights, spec, data, net, aliases, optimizer, scheduler, unfreeze,
                 cache)


def check_same_weights(net: Net) -> None:
    """Under torchrun every rank must end with the same weights; say so, or fail."""
    digest = tensors_digest(net.state_dict().values())
    if not distributed.same_on_every_rank(digest):
        raise TrainingFailed("the ranks ended with different weights; the run is not usable.")
    log.info("the final weights are identical on all %d ranks (digest %s)",
             distributed.world(), digest[:16])


def training_step(cfg: DictConfig, setup: Setup) -> tuple[Step, DataLoader, DataLoader]:
    """What each batch runs through and the loaders feeding it: the whole Net on images, or
    the head alone on the backbone's cached outputs."""
    step = Step(setup.net, setup.device, cfg.trainer.precision, cfg.trainer.channels_last,
                cfg.trainer.grad_clip)
    train_loader, val_loader = setup.data.train_loader, setup.data.val_loader
    if setup.cache.enabled:
        train, val, setup.cache.key = cached_features(
            setup.net.pretrained, train_loader.dataset, val_loader.dataset,
            (fingerprint(train_loader.dataset), fingerprint(val_loader.dataset)),
            cfg.trainer.cache_dir, cfg.data.batch_size, cfg.data.num_workers, setup.device,
            cfg.trainer.precision, step.autocast)
        pin = setup.device.type == "cuda"
        train_loader = make_loader(train, cfg.data, True, cfg.seed, pin)
        val_loader = make_loader(val, cfg.data, False, cfg.seed, pin)
    step.forward = trained_forward(cfg, setup)
    return step, train_loader, val_loader


def trained_forward(cfg: DictConfig, setup: Setup):
    """The head alone on cached features, else the Net; under torchrun wrapped in DDP, which
    must be done again whenever the trainable set changes; compiled if asked."""
    if setup.cache.enabled:
        forward = setup.net.add_layers
    elif distributed.active():  # after freezing: DDP syncs the gradients of what trains
        forward = distributed.wrap(setup.net, setup.device)
    else:
        forward = setup.net
    return torch.compile(forward) if cfg.trainer.compile else forward


def report(cfg: DictConfig, setup: Setup, rows: list[ParamRow]) -> str:
    lines = [f"parameters (freeze={list(cfg.freeze)}):"]
    lines += format_report(rows, setup.optimizer, setup.net.frozen_eval_modules)
    if setup.unfreeze.plan:
        lines += ["unfreeze phases:"] + ["  " + line for line in setup.unfreeze.describe()]
    lines.append(f"feature cache: {setup.cache.reason}")
    if cfg.dry_run:
        lines += ["aliases:"] + ["  " + line for line in setup.aliases.describe()]
    return "\n".join(lines)


def run(cfg: DictConfig, run_dir: str, overrides: Sequence[str] = (),
        checkpoint: dict | None = None) -> float | None:
    """Train (or, for mode=evaluate|predict, use a checkpoint); return cfg.optimized_metric
    (None for a dry run). `overrides` are the command line's, kept for resuming; a resumed
    run's `checkpoint` is read from cfg.resume unless the caller has read it already."""
    validate(cfg)
    check_loggers(cfg.logger)
    plots = plots_enabled(cfg.plots)
    if not plots and str(cfg.plots).lower() == "auto":
        log.info("plots: off (matplotlib is not installed: pip install -e '.[plots]')")
    if cfg.mode != "train":
        from finetune.inference import run_inference

        return run_inference(cfg, run_dir, plots)
    started = time.perf_counter()
    if cfg.resume and checkpoint is None:
        checkpoint = load_last(cfg.resume)
    writes = distributed.is_main()  # under torchrun, rank 0 alone writes
    if checkpoint is None and writes:
        check_fresh_run_dir(run_dir)
    setup = build(cfg)
    rows = setup.rows()
    log.info("%s", report(cfg, setup, rows))
    if checkpoint is None and writes:
        os.makedirs(run_dir, exist_ok=True)
        write_params_tsv(rows, os.path.join(run_dir, "params.tsv"))
    if cfg.dry_run:
        log.info("dry run: built %s on %s for %d classes; nothing trained or saved.",
                 cfg.backbone.name, setup.device, setup.data.num_classes)
        return None
    step, train_loader, val_loader = training_step(cfg, setup)
    progress, checkpoints = Progress(), None
    if checkpoint is not None:
        progress, checkpoints = restore(checkpoint, setup, step, [train_loader, val_loader], run_dir)
        step.forward = trained_forward(cfg, setup)  # the phases re-applied: DDP sees them
        log.info("resumed %s after epoch %d of %d", run_dir, progress.epoch, cfg.trainer.max_epochs)

    def before_epoch(epoch: int) -> None:
        for phase in setup.unfreeze.start_epoch(epoch):
            log.info("epoch %d: unfreeze phase %d: %s (%d tensors) join the optimizer as group %s",
                     epoch, phase.number, ", ".join(phase.patterns), len(phase.names), phase.group)
            if writes:
                write_params_tsv(setup.rows(), os.path.join(run_dir, f"params_epoch{epoch}.tsv"))
            if distributed.active():  # DDP must see the new trainable set
                step.forward = trained_forward(cfg, setup)

    saved = {"config": OmegaConf.to_container(cfg, resolve=True), "overrides": list(overrides),
             "class_names": setup.data.class_names, "input_spec": setup.spec.to_dict()}

    def checkpoint_extras() -> dict:
        return {**saved, "unfreeze_phase": setup.unfreeze.active,
                "feature_cache_key": setup.cache.key,
                "trainable": [name for name, param in setup.net.named_parameters()
                              if param.requires_grad]}

    def finish(status: str, error: str | None = None) -> dict:
        summary = summarize(status, progress.history, progress.best_epoch, str(setup.weights),
                            setup.rows(), time.perf_counter() - started, overrides, error)
        if writes:
            write_json(summary, os.path.join(run_dir, "summary.json"))
        return summary

    monitor = Monitor("val_loss", False) if cfg.optimized_metric.endswith("loss") else Monitor()
    run_log = (start_run_log(cfg, setup, run_dir, plots, progress.epoch * len(train_loader))
               if writes else None)
    try:
        fit(setup.net, train_loader, val_loader, setup.optimizer, setup.scheduler,
            cfg.trainer.max_epochs, step, run_dir, monitor, checkpoint_extras, before_epoch,
            progress, checkpoints, run_log)
        if distributed.active():
            check_same_weights(setup.net)
        summary = finish("ok")
        if run_log is not None:
            run_log.finish(config_hparams(cfg), summary, progress.epoch * len(train_loader))
    except KeyboardInterrupt:
        finish("interrupted")
        log.warning("interrupted after epoch %d; continue with: python train.py resume=%s",
                    progress.epoch, run_dir)
        raise
    except TrainingFailed as error:
        finish("failed", str(error))
        raise
    finally:
        if run_log is not None:
            run_log.close()
    best = progress.history[progress.best_epoch - 1]
    if plots and writes and progress.best_confusion:
        draw_or_warn(plot_confusion, progress.best_confusion, setup.data.class_names,
                     f"validation, best epoch {best.epoch} (acc {best.val_acc:.4f})",
                     os.path.join(run_dir, "confusion.png"))
    log.info("%s", closing_lines(cfg, best, summary, run_dir, overrides))
    return summary[cfg.optimized_metric]


def start_run_log(cfg: DictConfig, setup: Setup, run_dir: str, plots: bool,
                  start_step: int) -> RunLog:
    """Rank 0's loggers and, with plots on, curves.png (marking the unfreeze phases)."""
    return RunLog(build_loggers(cfg.logger, run_dir, start_step),
                  os.path.join(run_dir, "curves.png") if plots else None,
                  [phase.epoch for phase in setup.unfreeze.plan])


def closing_lines(cfg: DictConfig, best: EpochMetrics, summary: dict, run_dir: str,
                  overrides: Sequence[str]) -> str:
    """The best epoch, where everything is, and what to run next (evaluating on the run's
    own data: its data overrides come along)."""
    here = os.path.relpath(run_dir)  # as typed from here, when the run is below here
    run_dir = here if not here.startswith(os.pardir) else run_dir
    best_pt = os.path.join(run_dir, "checkpoints", "best.pt")
    data = [shlex.quote(item) for item in overrides
            if item.lstrip("+~").split("=", 1)[0].split(".")[0] == "data"]
    lines = [f"best epoch {best.epoch}: val acc {best.val_acc:.4f}, val loss {best.val_loss:.4f} "
             f"({cfg.optimized_metric} = {summary[cfg.optimized_metric]:.4f})",
             f"run directory: {run_dir}",
             "  evaluate:    " + " ".join(["python train.py mode=evaluate",
                                           f"checkpoint={best_pt}", *data]),
             f"  train more:  python train.py resume={run_dir} "
             f"trainer.max_epochs={cfg.trainer.max_epochs * 2}"]
    if "tensorboard" in cfg.logger:
        lines.append(f"  curves:      tensorboard --logdir {run_dir}")
    return "\n".join(lines)
