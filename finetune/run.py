"""Wires the stages in order: config -> model -> data -> freeze -> optim -> trainer."""

import functools
import json
import logging
import math
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
from PIL import Image
from torch.utils.data import DataLoader

from finetune.config.schemas import EPOCH_SCORES, augment_policy, auto_freeze, freeze_patterns
from finetune.config.validation import validate
from finetune.data.digest import tensors_digest
from finetune.data.features import CacheDecision, CacheEntry, cache_report, cached_features, decide
from finetune.data.folders import collate_readable
from finetune.data.loaders import (
    Data,
    build_data,
    check_data_source,
    fingerprint,
    has_test_split,
    make_loader,
    worker_count,
)
from finetune.errors import Interrupted, TrainingFailed
from finetune.hooks import Hook
from finetune.model.adapters import AdapterSummary, adapted, check_called, enabled, resolve_targets
from finetune.model.freeze import apply_freeze, unchanging_state_names, update_eval_modules
from finetune.model.net import (
    InputSpec,
    Net,
    Weights,
    build_backbone,
    build_net,
    check_backbone_name,
    input_spec,
    resolve_weights,
)
from finetune.model.stages import Aliases, resolve_aliases
from finetune.search.pruning import PRUNED, trial_report
from finetune.show.loggers import RunLog, build_loggers, check_loggers, config_hparams
from finetune.show.plots import draw_or_warn, plot_confusion, plots_enabled
from finetune.show.report import (
    ParamRow,
    ParamsTsv,
    format_report,
    parameter_rows,
    total_count,
    trainable_count,
    write_params_tsv,
)
from finetune.state.checkpoint import CheckpointHook, RunRecord, Stateful, keep_checkpoints, restore
from finetune.state.files import write_json
from finetune.state.resume import load_last
from finetune.state.run_dirs import check_fresh_run_dir
from finetune.sweep import FINISHED, read_summary
from finetune.threads import machine_cores
from finetune.train import distributed
from finetune.train.distributed import Rewrap
from finetune.train.ema import WeightAverage
from finetune.train.loss import build_criterion
from finetune.train.optim import (
    build_optimizer,
    build_scheduler,
    extend_schedule,
    group_rules,
    how_schedule_extends,
)
from finetune.train.rgn import RelativeGradientScale, StageChoice, choose_stages, measuring_batches, step_loss
from finetune.train.rgn import describe as describe_auto
from finetune.train.stopping import early_stopping
from finetune.train.trainer import (
    EpochMetrics,
    MetricsCsv,
    Monitor,
    Progress,
    RandomStreams,
    Step,
    fit,
    resolve_device,
)
from finetune.train.unfreeze import UnfreezeSchedule, plan_phases

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def summarize(status: str, history: list[EpochMetrics], best_epoch: int, weights: str,
              rows: list[ParamRow], seconds: float, overrides: Sequence[str] = (),
              error: str | None = None, stop_reason: str | None = None) -> dict:
    """summary.json: the status, the best and last metrics so far, the run's size and the
    command-line overrides it ran with."""
    if status == "ok" and (stop_reason or "").startswith(PRUNED):
        status = PRUNED  # a search's pruner ended it: finished, but not a result to compare
    summary: dict[str, Any] = {"status": status, "overrides": list(overrides)}
    if error is not None:
        summary["error"] = error
    if stop_reason is not None:  # ended before max_epochs (early stopping)
        summary["stop_reason"] = stop_reason
    if history:
        for score in EPOCH_SCORES:  # the best of each (the lowest loss), and the last; null
            values = [getattr(epoch, score) for epoch in history]  # where not recorded
            finite = [value for value in values if not math.isnan(value)]
            best = min if score.endswith("loss") else max
            summary[f"best_{score}"] = best(finite) if finite else None
            summary[f"last_{score}"] = None if math.isnan(values[-1]) else values[-1]
        summary["best_epoch"] = best_epoch
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
    criterion: torch.nn.Module  # the training loss (cfg.loss)
    adapters: AdapterSummary | None = None  # adapter=lora
    choice: StageChoice | None = None  # freeze=auto:select

    def rows(self) -> list[ParamRow]:
        return parameter_rows(self.net, self.optimizer)


def file_trust(cfg: DictConfig) -> list[str] | None:
    """Whose classes the config names: a resumed run's config is its checkpoint's (the
    command line's trust list rules what it may build); any other is the user's own."""
    return list(cfg.trust) if cfg.resume else None


def build(cfg: DictConfig, auto_frozen: Any = None) -> Setup:
    """Validate the config and build every stage in order; train nothing, write nothing.
    `auto_frozen`: a resumed freeze=auto:select run's first choice, from its checkpoint."""
    validate(cfg)
    check_data_source(cfg.data)  # the cheap checks first: a stat, then a model of shapes only
    check_patterns(cfg)
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
    with distributed.node_first():  # the node's image cache is decoded once
        data = build_data(cfg.data, spec, cfg.seed, pin_memory=device.type == "cuda",
                          shard=distributed.shard(), cache_dir=cfg.trainer.cache_dir)
    net = build_net(backbone, cfg.head, data.num_classes, spec.image_size, file_trust(cfg))
    aliases = resolve_aliases(net.pretrained)
    apply_freeze(net, freeze_patterns(cfg.freeze), cfg.frozen_modules, aliases)
    adapters = adapted(net, cfg.adapter, aliases, spec.image_size)
    if adapters is not None:  # modules holding adapters train: no longer fully frozen
        update_eval_modules(net, cfg.frozen_modules)
    plan = plan_phases(net, cfg.unfreeze, aliases, cfg.trainer.max_epochs)
    net.to(device, memory_format=torch.channels_last if cfg.trainer.channels_last
           else torch.preserve_format)
    criterion = build_criterion(cfg.loss, data.train_loader.dataset, data.class_names, device,
                                data.multi_label)
    choice = None
    if auto_freeze(cfg.freeze) == "select":  # before the optimizer: it holds what trains
        choice = auto_select(cfg, net, aliases, data, criterion, device, auto_frozen)
    optimizer = build_optimizer(net, cfg.optimizer, group_rules(cfg, net, aliases), file_trust(cfg))
    scheduler = build_scheduler(optimizer, cfg.scheduler, bool(plan), file_trust(cfg))
    unfreeze = UnfreezeSchedule(plan, net, optimizer, scheduler, cfg.optimizer, cfg.frozen_modules)
    cache = decide(str(cfg.trainer.cache_features).lower(), net, data.random_augmentation,
                   bool(plan), data.streamed)
    return Setup(device, weights, spec, data, net, aliases, optimizer, scheduler, unfreeze,
                 cache, criterion, adapters, choice)


def auto_select(cfg: DictConfig, net: Net, aliases: Aliases, data: Data,
                criterion: torch.nn.Module, device: torch.device,
                first_choice: Any = None) -> StageChoice:
    """freeze=auto:select: freeze the stages its measurement (or, resumed, its first run's
    choice) names; the modules left fully frozen keep eval mode."""
    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return criterion(net(images.to(device)).float(), labels.to(device))

    batches = measuring_batches(data.train_loader.dataset, cfg.data.batch_size, cfg.auto.batches,
                                cfg.seed * 100_003, collate_readable)
    choice = choose_stages(net, aliases, batches, loss, cfg.auto.keep, first_choice)
    apply_freeze(net, choice.frozen, cfg.frozen_modules, aliases)
    return choice


def check_patterns(cfg: DictConfig) -> None:
    """Every freeze, unfreeze and param-group pattern checked against the model's names, on
    a model built on the meta device (shapes only: milliseconds, where building it with its
    weights and reading the data take seconds)."""
    check_backbone_name(cfg.backbone.name)
    try:
        with torch.device("meta"):
            backbone = build_backbone(cfg.backbone, Weights(None, "shapes only"))
            size = getattr(backbone, "image_size", None)  # ViT takes one size; any other, 224
            size = size if isinstance(size, int) else 224
            net = build_net(backbone, cfg.head, None, size, file_trust(cfg))
    except Exception as error:  # what the meta device cannot build (regnet computes its
        # widths from tensors), the real build reports on its own, before the patterns
        log.debug("patterns are checked after the build: %s", error)
        return
    aliases = resolve_aliases(net.pretrained)
    apply_freeze(net, freeze_patterns(cfg.freeze), cfg.frozen_modules, aliases)
    if enabled(cfg.adapter):  # the targets only: peft is not loaded for a check
        check_called(net.pretrained, resolve_targets(net.pretrained, cfg.adapter, aliases),
                     size)
    plan_phases(net, cfg.unfreeze, aliases, cfg.trainer.max_epochs)
    group_rules(cfg, net, aliases)


def check_same_weights(net: Net) -> None:
    """Under torchrun every rank must end with the same weights; say so, or fail."""
    digest = tensors_digest(net.state_dict().values())
    if not distributed.same_on_every_rank(digest):
        raise TrainingFailed("the ranks ended with different weights; the run is not usable.")
    log.info("the final weights are identical on all %d ranks (digest %s)",
             distributed.world(), digest[:16])


@dataclass
class Training:
    """What each batch runs through and the loaders feeding it: the whole Net on images, or
    the head alone on the backbone's cached outputs (`cache` names the entry). Under
    torchrun, `rewrap` builds the step's DDP wrapper again when the trainable set changes."""

    step: Step
    loaders: tuple[DataLoader, DataLoader]
    cache: CacheEntry
    rewrap: Rewrap | None = None
    average: WeightAverage | None = None  # trainer.ema_decay
    auto: RelativeGradientScale | None = None  # freeze=auto


def training_inputs(cfg: DictConfig, setup: Setup) -> Training:
    loaders, module, cache = (setup.data.train_loader, setup.data.val_loader), setup.net, CacheEntry()
    if setup.cache.enabled:
        with distributed.node_first():  # under torchrun, computed once per node
            train, val, cache = cached_features(
                setup.net.pretrained, *(loader.dataset for loader in loaders),
                tuple(fingerprint(loader.dataset) for loader in loaders), cfg.trainer.cache_dir,
                cfg.data.batch_size, worker_count(cfg.data.num_workers), setup.device,
                cfg.trainer.precision)
        pin, shard = setup.device.type == "cuda", distributed.shard()
        loaders = (make_loader(train, cfg.data, True, cfg.seed, pin, shard),
                   make_loader(val, cfg.data, False, cfg.seed, pin, shard))
        module = setup.net.add_layers
    step = Step(module, setup.device, cfg.trainer.precision, cfg.trainer.channels_last,
                cfg.trainer.grad_clip, wrap=functools.partial(wrapped, cfg, setup),
                criterion=setup.criterion, accumulate=cfg.trainer.accumulate_grad_batches,
                mix=setup.data.mix, multi_label=setup.data.multi_label,
                threshold=cfg.predict.threshold)
    # it knows the set the step was wrapped for, so a resume's re-applied phases rewrap too
    rewrap = Rewrap(setup.net, step) if distributed.active() else None
    average = (WeightAverage(setup.net, cfg.trainer.ema_decay, unchanging_state_names)
               if cfg.trainer.ema_decay is not None else None)
    return Training(step, loaders, cache, rewrap, average, auto_scale(cfg, setup, step, loaders[0]))


def auto_scale(cfg: DictConfig, setup: Setup, step: Step,
               train_loader: DataLoader) -> RelativeGradientScale | None:
    """freeze=auto: the hook, measuring on batches of what the step trains on."""
    if auto_freeze(cfg.freeze) != "scale":
        return None
    dataset = train_loader.dataset

    def batches(epoch: int) -> list:
        return measuring_batches(dataset, cfg.data.batch_size, cfg.auto.batches,
                                 cfg.seed * 100_003 + epoch, collate_readable)

    return RelativeGradientScale(step.module, setup.optimizer, batches, step_loss(step))


def wrapped(cfg: DictConfig, setup: Setup, module: torch.nn.Module):
    """Under torchrun the module (the Net, or the head on cached features) in DDP; compiled
    if asked."""
    forward = distributed.wrap(module, setup.device) if distributed.active() else module
    return torch.compile(forward) if cfg.trainer.compile else forward


def stateful_parts(setup: Setup, training: Training, progress: Progress) -> dict[str, Stateful]:
    """Everything besides the weights that a checkpoint holds, in the order it is restored:
    the phases first (they add the optimizer groups the optimizer's state has)."""
    parts = {"unfreeze": setup.unfreeze, "optimizer": setup.optimizer,
             "scheduler": setup.scheduler, "scaler": training.step.scaler,
             "rng": RandomStreams(training.loaders), "progress": progress,
             "feature_cache": training.cache, "ema": training.average, "auto": training.auto}
    return {name: part for name, part in parts.items() if part is not None}


def training_hooks(cfg: DictConfig, setup: Setup, training: Training, run_dir: str,
                   parts: dict[str, Stateful], record: RunRecord, checkpoint: dict | None,
                   run_log: RunLog | None) -> list[Hook]:
    """What happens around the loop, in order: phases, then what sees their result (early
    stopping before the checkpoint, so the checkpoint holds its decision)."""
    hooks: list[Hook] = [setup.unfreeze]
    if training.rewrap is not None:  # DDP must see the trainable set a phase changed
        hooks.append(training.rewrap)
    if training.auto is not None:  # after the phases, which add groups
        if distributed.is_main():
            training.auto.write_to(os.path.join(run_dir, "rgn.csv"),
                                   os.path.join(run_dir, "rgn.png") if plots_enabled(cfg.plots)
                                   else None)
        hooks.append(training.auto)
    if training.average is not None:  # validation sees the average
        hooks.append(training.average)
    stopping = early_stopping(cfg.trainer.early_stopping)
    if stopping is not None:
        hooks.append(stopping)
    report = trial_report(cfg.optimized_metric)  # a search's trial: the pruner decides too
    if report is not None:
        hooks.append(report)
    if distributed.is_main():  # under torchrun rank 0 alone writes
        hooks += [ParamsTsv(run_dir, setup.net, setup.optimizer),
                  CheckpointHook(run_dir, setup.net, parts, record, unchanging_state_names,
                                 checkpoint),
                  MetricsCsv(os.path.join(run_dir, "metrics.csv"),
                             training.auto.units() if training.auto is not None else ()),
                  run_log]
    return hooks


def report(cfg: DictConfig, setup: Setup, rows: list[ParamRow]) -> str:
    lines = [f"parameters (freeze={freeze_label(cfg.freeze, setup.choice)}):"]
    lines += format_report(rows, setup.optimizer, setup.net.frozen_eval_modules)
    if setup.unfreeze.plan:
        lines += ["unfreeze phases:"] + ["  " + line for line in setup.unfreeze.describe()]
    if setup.adapters is not None:
        lines.append(setup.adapters.describe())
    if auto_freeze(cfg.freeze) == "scale":
        lines.append(describe_auto(cfg.auto.batches, cfg.auto.granularity))
    if setup.choice is not None:
        lines.append(setup.choice.describe())
    lines.append(f"data: {setup.data.reading}")
    lines.append(f"feature cache: {setup.cache.reason}")
    if setup.data.image_cache is not None:
        lines.append(f"image cache: {setup.data.image_cache}")
    if str(cfg.data.num_workers).lower() == "auto":
        lines.append(f"data.num_workers=auto: {worker_count('auto')} loader processes "
                     f"({machine_cores()} cores available to this process)")
    lines.append(f"recipe: {recipe(cfg)}")
    if cfg.dry_run:
        lines += ["aliases:"] + ["  " + line for line in setup.aliases.describe()]
    return "\n".join(lines)


def freeze_label(freeze: Any, choice: StageChoice | None) -> str:
    """The freeze setting as the report shows it: auto:select with what it chose."""
    if isinstance(freeze, str):
        return f"{freeze} -> {choice.frozen}" if choice is not None else freeze
    return str(list(freeze))


def recipe(cfg: DictConfig) -> str:
    """The training recipe's settings that are on (docs/recipes.md), in one line."""
    parts = []
    augment = cfg.data.get("augment", "none")
    if augment_policy(augment) != "none":
        parts.append(f"data.augment={augment_policy(augment)}")
    parts += [f"data.{key}={cfg.data[key]:g}" for key in ("mixup_alpha", "cutmix_alpha")
              if cfg.data[key] > 0]
    if cfg.loss.label_smoothing:
        parts.append(f"loss.label_smoothing={cfg.loss.label_smoothing:g}")
    if cfg.loss.class_weights != "none":
        parts.append(f"loss.class_weights={cfg.loss.class_weights}")
    trainer = cfg.trainer
    if trainer.accumulate_grad_batches > 1:
        parts.append(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} "
                     f"(a step every {trainer.accumulate_grad_batches * cfg.data.batch_size} images)")
    if trainer.ema_decay is not None:
        parts.append(f"trainer.ema_decay={trainer.ema_decay:g} (validated and saved: the average)")
    stopping = trainer.early_stopping
    if stopping.patience is not None:
        parts.append(f"early stopping on {stopping.monitor} after {stopping.patience} epochs "
                     f"without an improvement over {stopping.min_delta:g}")
    return ", ".join(parts) if parts else "plain (docs/recipes.md lists what can be added)"


CHECKPOINT_MODES = ("evaluate", "predict", "export", "calibrate")  # a saved model, used


def use_checkpoint(cfg: DictConfig, run_dir: str, plots: bool, overrides: list[str]) -> float:
    """mode=evaluate|predict|export|calibrate: the part of use/ that does it."""
    if cfg.mode == "export":
        from finetune.use.export import run_export

        return run_export(cfg, run_dir, overrides)
    if cfg.mode == "calibrate":
        from finetune.use.calibrate import run_calibration

        return run_calibration(cfg, run_dir, plots, overrides)
    from finetune.use.evaluate import run_inference

    return run_inference(cfg, run_dir, plots, overrides)


def run(cfg: DictConfig, run_dir: str, overrides: Sequence[str] = (),
        checkpoint: dict | None = None) -> float | None:
    """Train (or, for mode=evaluate|predict, use a checkpoint; for mode=lr_find, run the
    range test and return the suggested rate); return cfg.optimized_metric (None for a dry
    run). `overrides` are the command line's, kept for resuming; a resumed
    run's `checkpoint` is read from cfg.resume unless the caller has read it already."""
    validate(cfg)
    distributed.connect(resolve_device(cfg.trainer.device))  # under torchrun: the group
    check_loggers(cfg.logger, file_trust(cfg))
    if cfg.data.max_image_pixels is not None:  # before any image is opened; loader workers
        Image.MAX_IMAGE_PIXELS = cfg.data.max_image_pixels  # fork with it
    plots = plots_enabled(cfg.plots)
    if not plots and str(cfg.plots).lower() == "auto":
        log.info("plots: off (matplotlib is not installed: pip install -e '.[plots]')")
    if cfg.mode in CHECKPOINT_MODES:
        return use_checkpoint(cfg, run_dir, plots, list(overrides))
    summary = RunSummary(run_dir, overrides)  # its clock starts here
    if cfg.resume and checkpoint is None:
        checkpoint = load_last(cfg.resume)
    writes, fresh = distributed.is_main(), checkpoint is None
    if fresh and writes:
        check_fresh_run_dir(run_dir)
    setup = build(cfg, None if fresh else checkpoint["run"].get("auto_frozen"))
    log.info("%s", report(cfg, setup, setup.rows()))
    if fresh and writes:
        os.makedirs(run_dir, exist_ok=True)
        write_params_tsv(setup.rows(), os.path.join(run_dir, "params.tsv"))
    if cfg.dry_run:
        log.info("dry run: built %s on %s for %d classes; nothing trained or saved.",
                 cfg.backbone.name, setup.device, setup.data.num_classes)
        return None
    training = training_inputs(cfg, setup)
    if cfg.mode == "lr_find":
        from finetune.train.lr_find import find_lr

        return find_lr(cfg, setup, training, run_dir, plots and writes, overrides)
    progress = Progress(monitor=Monitor.for_metric(cfg.optimized_metric))
    parts = stateful_parts(setup, training, progress)
    if not fresh:
        go_on_from(checkpoint, cfg, setup, parts, progress, run_dir)
        if progress.epoch >= cfg.trainer.max_epochs or progress.stop_reason:
            return finished_before(cfg, setup, progress, run_dir, overrides)
    record = RunRecord(OmegaConf.to_container(cfg, resolve=True), list(overrides),
                       setup.data.class_names, setup.spec.to_dict(), torch.get_num_threads(),
                       distributed.world(), setup.choice.frozen if setup.choice else None)
    run_log = start_run_log(cfg, setup, training, run_dir, plots, progress) if writes else None
    try:  # the loggers close last, however the run ends: some keep the files it wrote
        hooks = training_hooks(cfg, setup, training, run_dir, parts, record, checkpoint, run_log)
        result = fit_and_summarize(cfg, setup, training, progress, hooks, summary, run_log)
        after_training(cfg, setup, progress, result, run_dir, plots, training.cache)
        return result[cfg.optimized_metric]
    finally:
        if run_log is not None:
            run_log.close()


def after_training(cfg: DictConfig, setup: Setup, progress: Progress, result: dict, run_dir: str,
                   plots: bool, cache: CacheEntry) -> None:
    """The best epoch's confusion matrix, calibration, the test split's score, what
    checkpoints/ keeps, and the closing lines, in that order (each reads what the one before
    it left); `result` gains the test scores."""
    writes = distributed.is_main()
    best = progress.history[progress.best_epoch - 1]
    if plots and writes and progress.best_confusion:
        draw_or_warn(plot_confusion, progress.best_confusion, setup.data.class_names,
                     f"validation, best epoch {best.epoch} (acc {best.val_acc:.4f})",
                     os.path.join(run_dir, "confusion.png"))
    if cfg.calibrate and writes:
        calibrate_best(cfg, run_dir, plots)
    if has_test_split(cfg.data):
        result.update(test_best(cfg, run_dir, plots and writes))
    kept = keep_checkpoints(run_dir, checkpoint_policy(cfg)) if writes else None
    log.info("%s", closing_lines(cfg, best, result, run_dir, cache, kept))


def calibrate_best(cfg: DictConfig, run_dir: str, plots: bool) -> None:
    """calibrate=true: mode=calibrate on the run's best.pt, into the run directory."""
    from finetune.use.calibrate import run_calibration

    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.update(mode="calibrate", checkpoint=os.path.join(run_dir, "checkpoints", "best.pt"))
    run_calibration(OmegaConf.create(settings), run_dir, plots, [])


def test_best(cfg: DictConfig, run_dir: str, plots: bool) -> dict[str, float]:
    """A run whose data holds a test split scores its best checkpoint there once, at the
    end: mode=evaluate into <run_dir>/test/, and its scores as test_* in summary.json."""
    from finetune.use.evaluate import run_inference

    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.update(mode="evaluate", checkpoint=os.path.join(run_dir, "checkpoints", "best.pt"))
    settings["data"]["split"] = "test"
    folder = os.path.join(run_dir, "test")
    run_inference(OmegaConf.create(settings), folder, plots, ["data.split=test"])
    if not distributed.is_main():  # under torchrun every rank evaluates, rank 0 writes
        return {}
    with open(os.path.join(folder, "evaluation.json")) as handle:
        evaluation = json.load(handle)
    scores = {f"test_{key}": evaluation[key] for key in ("images", "loss", "accuracy", "map")
              if key in evaluation}
    write_json({**(read_summary(run_dir) or {}), **scores}, os.path.join(run_dir, "summary.json"))
    return scores


def go_on_from(checkpoint: dict, cfg: DictConfig, setup: Setup, parts: dict[str, Stateful],
               progress: Progress, run_dir: str) -> None:
    """Put the run back where its checkpoint left it; a raised trainer.max_epochs stretches
    the schedule to the new length (optim.extend_schedule), said here and saved in the
    scheduler's state."""
    restore(checkpoint, setup.net, parts, f"resume={run_dir!r}")
    log.info("resumed %s after epoch %d of %d", run_dir, progress.epoch, cfg.trainer.max_epochs)
    threads = checkpoint["run"].get("torch_threads")
    if threads is not None and threads != torch.get_num_threads():
        log.warning("the run trained with %d torch threads and goes on with %d: on the CPU its "
                    "results may then differ from an unbroken run's in the last decimals",
                    threads, torch.get_num_threads())
    world = checkpoint["run"].get("world_size")
    if world is not None and world != distributed.world():
        log.warning("%s", world_size_change(world, distributed.world(), cfg.data.batch_size))
    saved_epochs = checkpoint["run"]["config"]["trainer"]["max_epochs"]
    if cfg.trainer.max_epochs > saved_epochs and progress.epoch < cfg.trainer.max_epochs:
        pending = [phase.epoch for phase in setup.unfreeze.plan if phase.epoch > progress.epoch]
        how = extend_schedule(setup.scheduler, setup.optimizer, cfg.scheduler._target_,
                              progress.epoch, cfg.trainer.max_epochs, pending)
        log.info("trainer.max_epochs raised from %d to %d: %s", saved_epochs,
                 cfg.trainer.max_epochs, how)


def world_size_change(before: int, now: int, batch_size: int) -> str:
    """What a resumed run with another number of processes changes (docs/multi-gpu.md)."""
    return (f"the run trained with {before} process{'es' * (before > 1)} and goes on with {now}: "
            f"the global batch is now {batch_size} x {now} = {batch_size * now} images (it was "
            f"{batch_size * before}; optimizer.lr is not rescaled) and each process reads another "
            "shard of the data, so the result is not the one an unbroken run would have given")


def finished_before(cfg: DictConfig, setup: Setup, progress: Progress, run_dir: str,
                    overrides: Sequence[str]) -> float:
    """A resumed run that had already trained all its epochs: say so and train nothing. A
    kill after its last checkpoint can have left metrics.csv a row short and no summary.json
    (or an interrupted one): those two are completed from the checkpoint."""
    result = summarize("ok", progress.history, progress.best_epoch, str(setup.weights),
                       setup.rows(), sum(epoch.seconds for epoch in progress.history), overrides,
                       stop_reason=progress.stop_reason)
    result["torch_threads"] = torch.get_num_threads()
    written = read_summary(run_dir)
    complete = not distributed.is_main() or (written is not None and written["status"] in FINISHED)
    if not complete:
        MetricsCsv(os.path.join(run_dir, "metrics.csv")).on_fit_start(progress)
        write_json(result, os.path.join(run_dir, "summary.json"))
    best = progress.history[progress.best_epoch - 1]
    how = (f"stopped after epoch {progress.epoch} ({progress.stop_reason})" if progress.stop_reason
           else f"finished all its {progress.epoch} epochs")
    done = ("nothing written" if complete
            else "metrics.csv and summary.json completed from its checkpoint")
    log.info("%s had already %s: nothing to train, %s.\n%s", run_dir, how, done,
             closing_lines(cfg, best, result, run_dir, CacheEntry()))
    return result[cfg.optimized_metric]


class RunSummary:
    """summary.json, written when training ends however it ends (rank 0 only)."""

    def __init__(self, run_dir: str, overrides: Sequence[str]):
        self.run_dir, self.overrides = run_dir, overrides
        self.path = os.path.join(run_dir, "summary.json")
        self.started = time.perf_counter()

    def write(self, status: str, progress: Progress, setup: Setup,
              error: str | None = None) -> dict:
        summary = summarize(status, progress.history, progress.best_epoch, str(setup.weights),
                            setup.rows(), time.perf_counter() - self.started, self.overrides,
                            error, progress.stop_reason)
        summary["torch_threads"] = torch.get_num_threads()  # CPU results depend on it
        if distributed.is_main():
            write_json(summary, self.path)
        return summary


def fit_and_summarize(cfg: DictConfig, setup: Setup, training: Training, progress: Progress,
                      hooks: list[Hook], summary: RunSummary, run_log: RunLog | None) -> dict:
    """Train; write summary.json however training ends (ok, interrupted, failed)."""
    try:
        fit(setup.net, training.step, setup.optimizer, setup.scheduler, training.loaders,
            cfg.trainer.max_epochs, progress, hooks)
        if distributed.active():
            check_same_weights(setup.net)
        result = summary.write("ok", progress, setup)
        if run_log is not None:
            run_log.finish(config_hparams(cfg), result,
                           progress.epoch * training.step.steps_per_epoch(len(training.loaders[0])))
        return result
    except KeyboardInterrupt:
        summary.write("interrupted", progress, setup)
        if progress.epoch:  # its checkpoint is written (the hooks waited for it)
            message = (f"interrupted after epoch {progress.epoch}; continue with: python "
                       f"train.py resume={shlex.quote(summary.run_dir)}")
        else:
            message = "interrupted before the first epoch ended: no checkpoint to resume"
        log.warning("%s", message)
        raise Interrupted(message) from None
    except TrainingFailed as error:
        summary.write("failed", progress, setup, str(error))
        raise


def start_run_log(cfg: DictConfig, setup: Setup, training: Training, run_dir: str, plots: bool,
                  progress: Progress) -> RunLog:
    """Rank 0's loggers (a resumed run's go on after its last step) and, with plots on,
    curves.png (marking the unfreeze phases)."""
    steps = training.step.steps_per_epoch(len(training.loaders[0]))
    return RunLog(build_loggers(cfg.logger, run_dir, progress.epoch * steps, file_trust(cfg)), steps,
                  os.path.join(run_dir, "curves.png") if plots else None,
                  [phase.epoch for phase in setup.unfreeze.plan])


def checkpoint_policy(cfg: DictConfig) -> str:
    """trainer.checkpoints, `auto` made `all` for a run and `best` for a sweep's job (a
    sweep of many short jobs keeps what reruns or uses the best one, not their states)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.trainer.checkpoints != "auto":
        return cfg.trainer.checkpoints
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return "best" if in_sweep else "all"


def closing_lines(cfg: DictConfig, best: EpochMetrics, summary: dict, run_dir: str,
                  cache: CacheEntry, kept: str | None = "best.pt") -> str:
    """The best epoch, where everything is, and what to run next (evaluate reads the data
    the checkpoint was trained on unless told otherwise); `kept`: the checkpoint file the
    run kept (trainer.checkpoints), None for none."""
    here = os.path.relpath(run_dir)  # as typed from here, when the run is below here
    run_dir = here if not here.startswith(os.pardir) else run_dir
    kept = kept and os.path.basename(kept)
    best_pt = shlex.quote(os.path.join(run_dir, "checkpoints", kept or "best.pt"))
    resumable = os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt"))
    run_dir = shlex.quote(run_dir)  # a folder name may hold anything: quoted for a shell
    score = (f"val acc {best.val_acc:.4f}" if math.isnan(best.val_map)
             else f"val mAP {best.val_map:.4f}")
    lines = [f"best epoch {best.epoch}: {score}, val loss {best.val_loss:.4f} "
             f"({cfg.optimized_metric} = {summary[cfg.optimized_metric]:.4f})"]
    if "test_images" in summary:  # scored once, at the end, on images training never saw
        test = (f"acc {summary['test_accuracy']:.4f}" if "test_accuracy" in summary
                else f"mAP {summary['test_map']:.4f}")
        lines.append(f"test split: {test}, loss {summary['test_loss']:.4f} on "
                     f"{summary['test_images']} images (the best epoch's checkpoint)")
    lines.append(f"run directory: {run_dir}")
    if kept:
        lines.append(f"  evaluate:    python train.py mode=evaluate checkpoint={best_pt}")
    if (resumable and how_schedule_extends(cfg.scheduler._target_) is not None
            and "stop_reason" not in summary):
        lines.append(f"  train more:  python train.py resume={run_dir} "
                     f"trainer.max_epochs={cfg.trainer.max_epochs * 2}")
    if "tensorboard" in cfg.logger:
        lines.append(f"  curves:      tensorboard --logdir {run_dir}")
    cached = cache_report(cache)
    return "\n".join([*lines, cached] if cached else lines)
