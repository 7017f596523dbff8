"""Wires the stages in order: config -> model -> data -> freeze -> optim -> trainer."""

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from finetune.config import validate
from finetune.data import Data, build_data
from finetune.errors import ConfigError
from finetune.freeze import FreezeReport, apply_freeze, format_report, write_params_tsv
from finetune.model import Net, Weights, build_backbone, build_net, input_spec, resolve_weights
from finetune.optim import build_optimizer, build_scheduler
from finetune.trainer import FitResult, Monitor, fit, resolve_device

log = logging.getLogger(__name__)

PREVIOUS_RUN_FILES = ("metrics.csv", "summary.json", "checkpoints")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_fresh_run_dir(run_dir: str) -> None:
    """Never train over another run's results."""
    found = [name for name in PREVIOUS_RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    if found:
        raise ConfigError(f"hydra.run.dir={run_dir!r} already holds a run ({', '.join(found)}); "
                          "refusing to overwrite it. Choose another hydra.run.dir.")


def write_json(data: dict, path: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)


def summarize(result: FitResult, weights: str, trainable: int, total: int,
              seconds: float) -> dict:
    history = result.history
    return {
        "status": "ok",
        "best_val_acc": max(epoch.val_acc for epoch in history),
        "best_val_loss": min(epoch.val_loss for epoch in history),
        "best_epoch": result.best_epoch,
        "last_val_acc": history[-1].val_acc,
        "last_val_loss": history[-1].val_loss,
        "epochs_completed": len(history),
        "weights": weights,
        "trainable_params": trainable,
        "total_params": total,
        "seconds": round(seconds, 2),
    }


@dataclass
class Setup:
    """Everything a run trains with, built from the config and nothing else."""

    device: torch.device
    weights: Weights
    data: Data
    net: Net
    report: FreezeReport
    optimizer: torch.optim.Optimizer
    scheduler: Any


def build(cfg: DictConfig) -> Setup:
    """Validate the config and build every stage in order; train nothing, write nothing."""
    validate(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    weights = resolve_weights(cfg.backbone)
    if weights.enum is None:
        log.warning("NOTE: backbone %s starts from %s", cfg.backbone.name, weights.description)
    else:
        log.info("backbone %s starts from %s", cfg.backbone.name, weights.description)
    backbone = build_backbone(cfg.backbone, weights)
    spec = input_spec(backbone, weights, cfg.backbone.name, cfg.data.image_size,
                      cfg.data.get("use_weights_transform", False))
    data = build_data(cfg.data, spec, cfg.seed, pin_memory=device.type == "cuda")
    net = build_net(backbone, cfg.head, data.num_classes, spec.image_size)
    report = apply_freeze(net, cfg.freeze, cfg.frozen_modules)
    net.to(device)
    optimizer = build_optimizer(net, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler)
    return Setup(device, weights, data, net, report, optimizer, scheduler)


def run(cfg: DictConfig, run_dir: str) -> float | None:
    """Build, train and return cfg.optimized_metric (None for a dry run)."""
    started = time.perf_counter()
    check_fresh_run_dir(run_dir)
    setup = build(cfg)
    log.info("parameters (freeze=%s):\n%s", list(cfg.freeze), format_report(setup.report))
    os.makedirs(run_dir, exist_ok=True)
    write_params_tsv(setup.report, os.path.join(run_dir, "params.tsv"))
    if cfg.dry_run:
        log.info("dry run: built %s on %s for %d classes; nothing trained or saved.",
                 cfg.backbone.name, setup.device, setup.data.num_classes)
        return None

    def checkpoint_extras() -> dict:
        return {"config": OmegaConf.to_container(cfg, resolve=True),
                "class_names": setup.data.class_names,
                "trainable": [row.name for row in setup.report.rows if row.trainable]}

    monitor = Monitor("val_loss", False) if cfg.optimized_metric.endswith("loss") else Monitor()
    result = fit(setup.net, setup.data.train_loader, setup.data.val_loader, setup.optimizer,
                 setup.scheduler, cfg.trainer.max_epochs, setup.device, run_dir, monitor,
                 checkpoint_extras)
    summary = summarize(result, setup.weights.description, setup.report.trainable_params,
                        setup.report.total_params, time.perf_counter() - started)
    write_json(summary, os.path.join(run_dir, "summary.json"))
    best = result.history[result.best_epoch - 1]
    log.info("best epoch %d: val acc %.4f, val loss %.4f. Run directory: %s",
             best.epoch, best.val_acc, best.val_loss, run_dir)
    return summary[cfg.optimized_metric]
