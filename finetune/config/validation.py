"""What a type cannot say about a config: allowed values, ranges, keys that only make sense
together. One short check per section (the run, the trainer, export and predict, the
model, the data, the optimization, single- or multi-label scores), each next to the
others; `validate` runs them all and reports every problem at once, in one ConfigError.

No torch here: the command line validates before a run imports it."""

from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

from finetune.config.schemas import (
    AUGMENT_POLICIES,
    AUTO_FREEZE,
    AUTO_GRANULARITIES,
    BAD_IMAGE_POLICIES,
    CACHE_SETTINGS,
    CHECKPOINT_POLICIES,
    DATA_SPLITS,
    EARLY_STOPPING_MONITORS,
    EXPORT_FORMATS,
    FROZEN_MODULE_MODES,
    MODES,
    MULTI_LABEL_SCORES,
    OPTIMIZED_METRICS,
    PLOT_SETTINGS,
    PRECISIONS,
    TIMM_BUILDER_KWARGS,
    TTA_SETTINGS,
    augment_policy,
    auto_freeze,
    is_multi_label,
)
from finetune.errors import ConfigError


def valid_class_weights(value: Any) -> bool:
    if isinstance(value, str):
        return value in ("none", "balanced")
    return (isinstance(value, Sequence) and len(value) > 0
            and all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0
                    for w in value))


def multi_label_problems(cfg: DictConfig) -> list[str]:
    """What multi-label data cannot be combined with, one sentence each."""
    data, problems = cfg.data, []
    why = next(f"data.{key} is set" for key in ("label_delimiter", "label_columns", "multi_label")
               if data.get(key))
    if data.get("label_delimiter") and data.get("label_columns"):
        problems.append("data.label_delimiter and data.label_columns are both set: multi-label "
                        "labels come either from one column split by the delimiter or from "
                        "one 0/1 column per class; set one of them.")
    metric = cfg.optimized_metric.split("_", 1)[-1]
    if metric not in MULTI_LABEL_SCORES:
        problems.append(f"optimized_metric={cfg.optimized_metric!r} is not valid for multi-label "
                        f"data ({why}): accuracy would mislead there; use best_val_map (mean "
                        "average precision), best_val_macro_f1, best_val_micro_f1 or best_val_loss.")
    if cfg.trainer.early_stopping.monitor == "val_acc":
        problems.append(f"trainer.early_stopping.monitor='val_acc' is not valid for multi-label "
                        f"data ({why}): use val_map or val_loss.")
    for key, setting in (("loss.label_smoothing", cfg.loss.label_smoothing),
                         ("data.mixup_alpha", data.mixup_alpha),
                         ("data.cutmix_alpha", data.cutmix_alpha)):
        if setting:
            problems.append(f"{key}={setting!r} is not valid for multi-label data ({why}): it "
                            "is made for one label per image; set it to 0.")
    return problems


Check = Callable[[bool, str, Any, str], None]  # (ok, key, value, what would be valid)


def check_run(cfg: DictConfig, check: Check) -> None:
    """The run's mode and what it needs, its outputs and its metric."""
    check(cfg.frozen_modules in FROZEN_MODULE_MODES, "frozen_modules", cfg.frozen_modules,
          "use eval (fully frozen modules keep eval mode while training) or train")
    check(cfg.optimized_metric in OPTIMIZED_METRICS, "optimized_metric", cfg.optimized_metric,
          "use one of " + ", ".join(OPTIMIZED_METRICS))
    check(cfg.mode in MODES, "mode", cfg.mode,
          "use train, evaluate, predict, export, calibrate or lr_find")
    check(cfg.mode not in ("evaluate", "predict", "export", "calibrate") or cfg.checkpoint is not None,
          "checkpoint", cfg.checkpoint,
          f"mode={cfg.mode} needs checkpoint=PATH, a last.pt or best.pt written by a run")
    check(cfg.mode != "predict" or cfg.predict_input is not None, "predict_input",
          cfg.predict_input, "mode=predict needs predict_input=FOLDER, a folder of images")
    check(cfg.mode not in ("export", "calibrate") or str(cfg.checkpoint).endswith(".pt"),
          "checkpoint", cfg.checkpoint,
          f"mode={cfg.mode} takes a run's checkpoint: give its best.pt or last.pt")
    check(not (cfg.calibrate and is_multi_label(cfg.data)), "calibrate", cfg.calibrate,
          "temperature scaling calibrates a softmax over the classes; multi-label data has a "
          "sigmoid per class: set calibrate=false")
    check(cfg.tta in TTA_SETTINGS, "tta", cfg.tta,
          "use none, or hflip (average each image's logits with its mirror image's)")
    check(str(cfg.plots).lower() in PLOT_SETTINGS, "plots", cfg.plots,
          "use auto (plots when matplotlib is installed), true or false")
    for name, entry in cfg.logger.items():
        check(isinstance(entry, DictConfig) and "_target_" in entry, f"logger.{name}", entry,
              "each logger needs a _target_ class, e.g. finetune.loggers.TensorBoardLogger")
    check(cfg.mode != "lr_find" or not cfg.resume, "resume", cfg.resume,
          "mode=lr_find tests a new run's settings; drop resume")


def check_export_and_predict(cfg: DictConfig, check: Check) -> None:
    check(cfg.export.format in EXPORT_FORMATS, "export.format", cfg.export.format,
          "use onnx, torchscript or exported_program")
    check(cfg.export.tolerance >= 0, "export.tolerance", cfg.export.tolerance, "use 0 or more")
    check(cfg.export.parity_images >= 1, "export.parity_images", cfg.export.parity_images,
          "use 1 or more")
    check(0 < cfg.predict.threshold < 1, "predict.threshold", cfg.predict.threshold,
          "use a probability between 0 and 1, e.g. 0.5")
    check(cfg.predict.top_k >= 1, "predict.top_k", cfg.predict.top_k,
          "use 1 (the most probable class) or more")
    check(cfg.predict.top_k == 1 or not is_multi_label(cfg.data), "predict.top_k",
          cfg.predict.top_k, "multi-label data predicts every label at predict.threshold; use 1")


def check_model(cfg: DictConfig, check: Check) -> None:
    """The backbone's arguments, the head's layers and the adapters."""
    if str(cfg.backbone.name).startswith("timm/"):
        refused = sorted(set(cfg.backbone.kwargs) & set(TIMM_BUILDER_KWARGS))
        check(not refused, "backbone.kwargs", ", ".join(refused),
              f"those are timm's builder's own arguments for {cfg.backbone.name} (which files and "
              "weights to load), not the model's; backbone.kwargs may only shape the model "
              "(img_size, drop_path_rate, ...). Load a local file with backbone.checkpoint=PATH")
    for index, layer in enumerate(cfg.head.layers):
        check(isinstance(layer, DictConfig) and "_target_" in layer, f"head.layers[{index}]",
              layer, "each head layer needs a _target_, e.g. {_target_: torch.nn.Linear}")
    check(cfg.adapter.name in ("none", "lora"), "adapter.name", cfg.adapter.name,
          "use none, or lora (adapter=lora)")
    check(cfg.adapter.r >= 1, "adapter.r", cfg.adapter.r, "use a rank of 1 or more, e.g. 8")
    check(cfg.adapter.alpha > 0, "adapter.alpha", cfg.adapter.alpha, "use a positive number, e.g. 16")
    check(0 <= cfg.adapter.dropout < 1, "adapter.dropout", cfg.adapter.dropout, "use a number in [0, 1)")


def check_data(cfg: DictConfig, check: Check) -> None:
    data = cfg.data
    if data.name in ("imagefolder", "csv", "hf", "webdataset"):
        check(augment_policy(data.augment) in AUGMENT_POLICIES, "data.augment", data.augment,
              "use " + ", ".join(AUGMENT_POLICIES))
        check(data.bad_images in BAD_IMAGE_POLICIES, "data.bad_images", data.bad_images,
              "use skip (leave them out, with one warning naming each) or fail")
        check(str(data.cache_images).lower() in CACHE_SETTINGS, "data.cache_images",
              data.cache_images, "use auto, true or false")
        check(data.cache_max_gb > 0, "data.cache_max_gb", data.cache_max_gb,
              "use a positive number of GiB")
    if data.get("streaming"):
        check_stream(cfg, check)
    if data.folds is not None:
        check(data.folds >= 2, "data.folds", data.folds, "use 2 or more, or null (off)")
        check(0 <= data.fold < max(data.folds, 1), "data.fold", data.fold,
              f"use 0 to {data.folds - 1} (data.folds={data.folds})")
    for key in ("mixup_alpha", "cutmix_alpha"):
        check(data[key] >= 0, f"data.{key}", data[key], "use 0 (off) or more, e.g. 0.2")
    check(data.batch_size >= 1, "data.batch_size", data.batch_size, "use 1 or more")
    check(str(data.num_workers).lower() == "auto"
          or (isinstance(data.num_workers, int) and data.num_workers >= 0),
          "data.num_workers", data.num_workers, "use 0 or more loader processes, or auto (one "
          "per core this process may use but one)")
    check(data.image_size >= 1, "data.image_size", data.image_size, "use 1 or more")
    check(data.max_image_pixels is None or data.max_image_pixels >= 1, "data.max_image_pixels",
          data.max_image_pixels, "use a number of pixels, or null (PIL's own limit)")
    if data.name in ("digits", "csv", "imagefolder") or data.get("val_fraction") is not None:
        check(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction,
              "use a number between 0 and 1")
    check(data.split in DATA_SPLITS, "data.split", data.split,
          "use val (the validation split) or test (a test/ folder, or a CSV's split=test rows)")
    check(data.split == "val" or cfg.mode == "evaluate", "data.split", data.split,
          f"it chooses what mode=evaluate reads; mode={cfg.mode} always uses val (a run scores "
          "its best checkpoint on the test split by itself when there is one)")


def check_stream(cfg: DictConfig, check: Check) -> None:
    """data.streaming=true reads rows as they come: what needs rows kept or picked is refused."""
    data = cfg.data
    check(data.shuffle_buffer >= 1, "data.shuffle_buffer", data.shuffle_buffer,
          "use 1 (rows in the order read) or more")
    check(data.folds is None, "data.folds", data.folds, "a stream (data.streaming=true) has "
          "no fixed rows to fold; set data.streaming=false for cross-validation")
    check(data.val_fraction is None, "data.val_fraction", data.val_fraction, "a stream "
          "(data.streaming=true) validates on a split of the data set: set data.val_split to "
          "one it has (e.g. test), or data.streaming=false to set rows of the training split aside")
    check(str(data.cache_images).lower() != "true", "data.cache_images", data.cache_images,
          "a stream (data.streaming=true) keeps no image; use auto or false")


def check_trainer(cfg: DictConfig, check: Check) -> None:
    trainer, stopping = cfg.trainer, cfg.trainer.early_stopping
    check(trainer.max_epochs >= 1, "trainer.max_epochs", trainer.max_epochs, "use 1 or more")
    check(str(trainer.cache_features).lower() in CACHE_SETTINGS, "trainer.cache_features",
          trainer.cache_features, "use auto, true or false")
    check(trainer.precision in PRECISIONS, "trainer.precision", trainer.precision,
          "use 32, bf16 or 16-mixed")
    check(trainer.grad_clip is None or trainer.grad_clip > 0, "trainer.grad_clip",
          trainer.grad_clip, "use a positive number, or null for no clipping")
    check(trainer.checkpoints in CHECKPOINT_POLICIES, "trainer.checkpoints", trainer.checkpoints,
          "use auto (all; best in a sweep), all, last, best or none")
    check(not (cfg.calibrate and trainer.checkpoints in ("last", "none")), "calibrate",
          cfg.calibrate, f"calibration is stored in best.pt, which trainer.checkpoints="
          f"{trainer.checkpoints} does not keep; use trainer.checkpoints=best or all")
    check(trainer.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
          trainer.accumulate_grad_batches, "use 1 (a step every batch) or more")
    check(trainer.ema_decay is None or 0 < trainer.ema_decay < 1, "trainer.ema_decay",
          trainer.ema_decay, "use a number in (0, 1), e.g. 0.999, or null (off)")
    check(stopping.patience is None or stopping.patience >= 1, "trainer.early_stopping.patience",
          stopping.patience, "use 1 or more epochs, or null (off)")
    check(stopping.monitor in EARLY_STOPPING_MONITORS, "trainer.early_stopping.monitor",
          stopping.monitor, "use val_loss, val_acc or val_map (multi-label data)")
    check(stopping.min_delta >= 0, "trainer.early_stopping.min_delta", stopping.min_delta,
          "use 0 or more")
    check(0 < cfg.lr_find.start < cfg.lr_find.end, "lr_find.start",
          cfg.lr_find.start, f"use a positive rate below lr_find.end={cfg.lr_find.end}")
    check(cfg.lr_find.steps >= 2, "lr_find.steps", cfg.lr_find.steps, "use 2 or more")


def check_freeze(cfg: DictConfig, check: Check) -> None:
    """freeze: a pattern list, or auto / auto:select with its auto.* settings."""
    freeze = cfg.freeze
    example = f"[{freeze}]" if isinstance(freeze, str) else "[@stem,@stage1]"
    check(auto_freeze(freeze) is not None or (not isinstance(freeze, str) and isinstance(
        freeze, Sequence) and all(isinstance(pattern, str) for pattern in freeze)), "freeze",
        freeze, f"use a list of patterns, e.g. 'freeze={example}' or [] (docs/freezing.md), or "
        f"{' or '.join(AUTO_FREEZE)} to let relative gradient norms choose (docs/strategies.md)")
    check(cfg.auto.batches >= 1, "auto.batches", cfg.auto.batches, "use 1 or more, e.g. 4")
    check(cfg.auto.granularity in AUTO_GRANULARITIES, "auto.granularity", cfg.auto.granularity,
          "use stage (a learning rate per stage alias) or tensor (one per parameter tensor)")
    check(0 < cfg.auto.keep <= 1, "auto.keep", cfg.auto.keep,
          "use a share of the largest relative gradient norm in (0, 1], e.g. 0.5")
    mode = auto_freeze(freeze)
    if mode is not None:
        check(not cfg.unfreeze, "unfreeze", list(cfg.unfreeze),
              f"freeze={freeze} chooses what trains itself; drop the unfreeze phases ([])")
        check(cfg.adapter.name == "none", "adapter.name", cfg.adapter.name,
              f"freeze={freeze} chooses among the backbone's own weights; use adapter=none, or "
              "adapter=lora with a freeze pattern list")
        check(mode == "scale" or cfg.auto.granularity == "stage", "auto.granularity",
              cfg.auto.granularity, "freeze=auto:select freezes whole stages; use stage")


def check_optimization(cfg: DictConfig, check: Check) -> None:
    """The optimizer, the schedule, the per-part rates and the loss."""
    check(cfg.optimizer.lr > 0, "optimizer.lr", cfg.optimizer.lr, "use a positive number")
    check(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", cfg.optimizer.weight_decay,
          "use 0 or more")
    for key in ("step_size", "T_max"):  # the shipped schedulers divide by these
        if key in cfg.scheduler:
            check(cfg.scheduler[key] >= 1, f"scheduler.{key}", cfg.scheduler[key], "use 1 or more")
    check(cfg.lr_decay is None or 0 < cfg.lr_decay <= 1, "lr_decay", cfg.lr_decay,
          "use a number in (0, 1], e.g. 0.7, or null")
    for index, entry in enumerate(cfg.param_groups):
        check(entry.lr_mult > 0, f"param_groups[{index}].lr_mult", entry.lr_mult, "use a positive number")
        check(entry.weight_decay is None or entry.weight_decay >= 0,
              f"param_groups[{index}].weight_decay", entry.weight_decay, "use 0 or more, or null")
    for index, phase in enumerate(cfg.unfreeze):
        check(phase.lr_mult > 0, f"unfreeze[{index}].lr_mult", phase.lr_mult, "use a positive number")
    check(0 <= cfg.loss.label_smoothing < 1, "loss.label_smoothing", cfg.loss.label_smoothing,
          "use a number in [0, 1), e.g. 0.1")
    check(valid_class_weights(cfg.loss.class_weights), "loss.class_weights",
          cfg.loss.class_weights, "use none, balanced, or a list of one weight >= 0 per class")


def check_single_label(cfg: DictConfig, check: Check) -> None:
    """Single-label data has no multi-label scores to optimize or monitor."""
    only_multi = ("val_map", "val_micro_f1")
    check(cfg.optimized_metric.split("_", 1)[-1] not in only_multi, "optimized_metric",
          cfg.optimized_metric, "val_map and val_micro_f1 are scores of multi-label data "
          "(data.label_delimiter or data.label_columns); use best_val_acc, best_val_loss, "
          "best_val_balanced_acc or best_val_macro_f1")
    monitor = cfg.trainer.early_stopping.monitor
    check(monitor not in only_multi, "trainer.early_stopping.monitor", monitor,
          "val_map is a score of multi-label data; use val_loss or val_acc")


SECTION_CHECKS = (check_run, check_trainer, check_export_and_predict, check_model, check_data,
                  check_freeze, check_optimization)


def validate(cfg: DictConfig) -> None:
    """Check what types cannot express, section by section; raise one ConfigError listing
    every problem."""
    problems = []

    def check(ok: bool, key: str, value: Any, valid: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r} is not valid: {valid}.")

    for section in SECTION_CHECKS:
        section(cfg, check)
    if is_multi_label(cfg.data):
        problems += multi_label_problems(cfg)
    else:
        check_single_label(cfg, check)
    if problems:
        raise ConfigError(" ".join(problems))
