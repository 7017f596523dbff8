"""Config schemas: the types and defaults of every key, registered in Hydra's ConfigStore.

`Config` types the whole tree; where a group's options differ in their keys (data, optimizer,
scheduler) each option file starts from its own schema (`/schema_<group>_<option>` in its
defaults list: top-level names, so `--help` does not list them as groups). Either way a
misspelled key or a value of the wrong type stops the run at start-up with the full key
named. Checks that need more than a type (allowed values,
ranges) live in `validate`, which reports every problem at once.

This module imports no torch, so `python train.py --help` stays quick.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from finetune.errors import ConfigError


@dataclass
class BackboneConfig:
    name: str = MISSING  # any name in torchvision.models.list_models(module=torchvision.models)
    weights: str | None = "auto"  # auto | DEFAULT | IMAGENET1K_V1 | ... | null (random init)
    checkpoint: str | None = None  # local state-dict file loaded over the weights
    keep_classifier: bool = False  # keep the backbone's own classifier (the seed's alexnet)
    allow_download: bool = True  # False: only the local torch / Hugging Face caches, never the network
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra torchvision builder args


@dataclass
class HeadConfig:
    # `_target_` entries built in order into Net.add_layers; in_features / num_features of the
    # first layers and out_features of the last one are filled in when left out.
    layers: list[Any] = field(default_factory=list)


@dataclass
class DataConfig:
    name: str = MISSING  # digits | imagefolder | fake
    image_size: int = 32
    batch_size: int = 64
    num_workers: Any = 0  # loader processes: a number, or auto (one per core but one)
    # training batches mixed in pairs (torchvision.transforms.v2): 0 is off; with both on,
    # each batch takes one of the two at random
    folds: int | None = None  # K: cross-validation on the training data in K stratified folds
    fold: int = 0  # which fold validates (0..K-1); a sweep: -m data.fold=0,1,2,3,4
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha) for the mixing weight, e.g. 0.2
    cutmix_alpha: float = 0.0  # CutMix's, e.g. 1.0
    # PIL.Image.MAX_IMAGE_PIXELS for the run: an image file over twice it is refused before
    # any decoder runs (a decompression bomb); null: PIL's own (89,478,485)
    max_image_pixels: int | None = None
    # the split mode=evaluate reads: val, or test (imagefolder's test/ folder, or a CSV's
    # split=test rows: images training never sees); training validates on val
    split: str = "val"


@dataclass
class DigitsDataConfig(DataConfig):
    name: str = "digits"
    val_fraction: float = 0.2  # fixed stratified split, independent of `seed`
    classes: list[int] | None = None  # keep only these digits (the seed experiment uses [0, 1])


@dataclass
class ImageFolderDataConfig(DataConfig):
    name: str = "imagefolder"
    root: str | None = None  # holds train/<class>/* and val/<class>/* (test/<class>/*), or <class>/*
    val_fraction: float = 0.2  # <class>/* directly under root: this share of each class validates
    # training images only: none | flip | light (random resized crop + flip) | randaugment |
    # trivialaugment | autoaugment (the last three: light, then that torchvision policy)
    augment: str = "none"
    bad_images: str = "skip"  # skip (one warning naming each file) | fail (an error naming them)
    use_weights_transform: bool = True  # with pretrained weights, use their preprocessing
    # decode and resize each file once, then read the result back (under trainer.cache_dir):
    # auto (when it fits in cache_max_gb) | true | false
    cache_images: str = "auto"
    cache_max_gb: float = 20.0  # the image cache folder's bound; older entries go first


@dataclass
class CsvDataConfig(DataConfig):
    name: str = "csv"
    file: str | None = None  # a CSV (or .tsv) file, one row per image
    root: str | None = None  # the image paths are relative to it; null: the file's folder
    image_column: str = "image"
    label_column: str = "label"
    split_column: str | None = "split"  # train / val per row; without it: val_fraction
    val_fraction: float = 0.2  # a stratified split, fixed (seed 0) whatever the run's seed
    # multi-label data, either way: several labels in label_column separated by this (e.g.
    # " " or ";") ...
    label_delimiter: str | None = None
    label_columns: list[str] | None = None  # ... or one 0/1 column per class, in this order
    augment: str = "none"  # as data=imagefolder's
    bad_images: str = "skip"  # as data=imagefolder's
    use_weights_transform: bool = True
    cache_images: str = "auto"  # as data=imagefolder's
    cache_max_gb: float = 20.0


@dataclass
class FakeDataConfig(DataConfig):
    name: str = "fake"
    num_classes: int = 10
    train_size: int = 256
    val_size: int = 64


@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    lr: float = 0.01
    weight_decay: float = 0.0
    decay_bias_and_norm: bool = False  # False: 1-d parameters (biases, norm weights) get none


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "torch.optim.AdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    _target_: str | None = None  # null: constant learning rate


@dataclass
class CosineSchedulerConfig(SchedulerConfig):
    _target_: str | None = "torch.optim.lr_scheduler.CosineAnnealingLR"
    T_max: int = MISSING  # epochs; the shipped file sets it to trainer.max_epochs
    eta_min: float = 0.0


@dataclass
class StepSchedulerConfig(SchedulerConfig):
    _target_: str | None = "torch.optim.lr_scheduler.StepLR"
    step_size: int = 5  # epochs
    gamma: float = 0.1


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # epochs without improvement before stopping; null: off
    monitor: str = "val_loss"  # val_loss | val_acc
    min_delta: float = 0.0  # a change smaller than this is not an improvement


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
    cache_features: str = "auto"  # auto | true | false: compute a frozen backbone once
    cache_dir: str = "~/.cache/finetune/features"
    precision: str = "32"  # 32 | bf16 | 16-mixed
    channels_last: bool = False
    compile: bool = False  # wrap the trained module with torch.compile
    grad_clip: float | None = None  # clip the gradients' total norm to this; null: no clipping
    accumulate_grad_batches: int = 1  # batches whose gradients add up to one optimizer step
    ema_decay: float | None = None  # e.g. 0.999: validate and save an EMA of the weights
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # what a finished run keeps in checkpoints/: all (last.pt to resume, best.pt) | last |
    # best (best.pt's weights alone) | none; auto: all, and best for a sweep's jobs
    checkpoints: str = "auto"


@dataclass
class LrFindConfig:
    start: float = 1e-7  # the range test's first learning rate (optimizer.lr)
    end: float = 10.0  # its last, unless the loss diverges first
    steps: int = 100  # batches (the training data again if it has fewer)


@dataclass
class ExportConfig:
    format: str = "onnx"  # onnx | torchscript | exported_program
    tolerance: float = 1e-3  # the largest logit difference from the checkpoint allowed
    parity_images: int = 32  # validation images the exported model is checked on
    merge_adapters: bool = True  # fold LoRA adapters into the base weights (plain layers)


@dataclass
class AdapterConfig:
    """adapter=lora: LoRA layers (peft) on the backbone's Linear layers (docs/freezing.md)."""

    name: str = "none"  # none | lora
    r: int = 8  # the rank of each adapter's update
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on each adapter's input
    targets: list[str] | None = None  # patterns over Linear/Conv2d layers; null: the family's


@dataclass
class PredictConfig:
    # multi-label data: a label is predicted when its probability is at least this (also the
    # F1 scores' threshold in validation and mode=evaluate)
    threshold: float = 0.5
    top_k: int = 1  # mode=predict, single-label data: the k most probable classes per image


@dataclass
class LossConfig:
    """The training loss (cross-entropy; binary cross-entropy per class for multi-label
    data); the validation loss stays plain, so runs with different settings compare."""

    label_smoothing: float = 0.0  # in [0, 1): the share of each target spread over all classes
    # none | balanced (inverse class frequency; multi-label: negatives / positives per
    # class, BCE's pos_weight) | [w0, w1, ...]
    class_weights: Any = "none"


@dataclass
class ParamGroupConfig:
    patterns: list[str] = MISSING  # parameters of this group (first matching entry wins)
    lr_mult: float = 1.0  # learning rate = lr_mult x optimizer.lr
    weight_decay: float | None = None  # null: optimizer.weight_decay (1-d params exempt)
    name: str | None = None  # shown in the report; default group<index>


@dataclass
class UnfreezePhaseConfig:
    epoch: int = MISSING  # 1-based epoch at whose start the parameters become trainable
    patterns: list[str] = MISSING
    lr_mult: float = 1.0  # learning rate of the new parameters = lr_mult x optimizer.lr
    weight_decay: float | None = None  # null: optimizer.weight_decay (1-d params exempt)


@dataclass
class Config:
    backbone: BackboneConfig = MISSING
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)  # mode=lr_find
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)  # mode=export
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # adapter=lora
    freeze: list[str] = field(default_factory=list)  # patterns over Net.named_parameters()
    unfreeze: list[UnfreezePhaseConfig] = field(default_factory=list)  # gradual unfreezing
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    lr_decay: float | None = None  # layer-wise decay: x lr_decay per stage from the head down
    frozen_modules: str = "eval"  # eval: fully frozen modules stay in eval mode | train
    seed: int = 0
    dry_run: bool = False  # build everything and print the report; train and save nothing
    # what train.py returns to sweepers; conf/config.yaml: best_val_acc, or best_val_map for
    # multi-label data (the finetune_default_metric resolver)
    optimized_metric: str = "best_val_acc"
    mode: str = "train"  # train | evaluate | predict | export (these need `checkpoint`) | lr_find
    resume: str | None = None  # a run directory, or latest: continue it from its last.pt
    checkpoint: str | None = None  # evaluate / predict: a last.pt or best.pt this tool wrote
    predict_input: str | None = None  # predict: a folder of images (searched recursively)
    tta: str = "none"  # evaluate / predict: none | hflip (average with the mirror image's logits)
    calibrate: bool = False  # after training: fit a temperature on val, store it in best.pt
    fail_fast: bool = False  # -m: the first failed job stops the sweep (else it is recorded)
    plots: str = "auto"  # auto (when matplotlib is installed) | true | false
    logger: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ..., keys}
    # classes a checkpoint's saved config may name besides torch.nn/torch.optim ones
    # (finetune/trust.py): [mypkg.MyLayer], [mypkg.*], or ['*'] for files you made yourself
    trust: list[str] = field(default_factory=list)


CONFIG_GROUPS = ("backbone", "head", "data", "optimizer", "scheduler", "logger", "adapter",
                 "experiment", "hparams_search")  # conf/'s groups, in the order of conf/config.yaml
CACHE_SETTINGS = ("auto", "true", "false")
PRECISIONS = {"32": None, "bf16": "bfloat16", "16-mixed": "float16"}  # -> the autocast dtype
# single-label data: accuracy, balanced accuracy, macro F1, top-5 accuracy (over 5 classes);
# multi-label: mean average precision, micro and macro F1 at predict.threshold (the others
# are NaN there)
EPOCH_SCORES = ("val_acc", "val_loss", "val_balanced_acc", "val_macro_f1", "val_map",
                "val_micro_f1", "val_top5_acc")
MULTI_LABEL_SCORES = ("val_loss", "val_macro_f1", "val_map", "val_micro_f1")
OPTIMIZED_METRICS = tuple(f"{which}_{score}" for score in EPOCH_SCORES for which in ("best", "last"))
FROZEN_MODULE_MODES = ("eval", "train")
MODES = ("train", "evaluate", "predict", "lr_find", "export", "calibrate")
EXPORT_FORMATS = ("onnx", "torchscript", "exported_program")
BAD_IMAGE_POLICIES = ("skip", "fail")
PLOT_SETTINGS = ("auto", "true", "false")
AUGMENT_POLICIES = ("none", "flip", "light", "randaugment", "trivialaugment", "autoaugment")
EARLY_STOPPING_MONITORS = ("val_loss", "val_acc", "val_map")
TTA_SETTINGS = ("none", "hflip")
DATA_SPLITS = ("val", "test")
CHECKPOINT_POLICIES = ("auto", "all", "last", "best", "none")
# timm.create_model's and its builder's own arguments (which files and weights to load: a
# checkpoint_path, a pretrained_cfg_overlay naming a file or url, a cache_dir), not the
# model's: backbone.kwargs may not pass them (a checkpoint's saved config neither);
# tests/test_timm.py checks this list against timm's signatures
TIMM_BUILDER_KWARGS = ("cache_dir", "checkpoint_path", "feature_cfg", "kwargs", "kwargs_filter",
                       "model_cfg", "model_cls", "model_name", "pretrained", "pretrained_cfg",
                       "pretrained_cfg_overlay", "pretrained_filter_fn", "pretrained_model_args",
                       "pretrained_strict", "variant")

DATA_SCHEMAS = {"digits": DigitsDataConfig, "imagefolder": ImageFolderDataConfig,
                "fake": FakeDataConfig, "csv": CsvDataConfig}


def data_schema(name: Any) -> type:
    """The schema of the data option `name` (data.name)."""
    if name not in DATA_SCHEMAS:
        raise ValueError(f"data.name={name!r} is not one of {', '.join(DATA_SCHEMAS)}")
    return DATA_SCHEMAS[name]


SCHEMAS = {
    (None, "config_schema"): Config,
    (None, "schema_data_digits"): DigitsDataConfig,
    (None, "schema_data_imagefolder"): ImageFolderDataConfig,
    (None, "schema_data_fake"): FakeDataConfig,
    (None, "schema_data_csv"): CsvDataConfig,
    (None, "schema_optimizer_sgd"): SGDConfig,
    (None, "schema_optimizer_adamw"): AdamWConfig,
    (None, "schema_scheduler_none"): SchedulerConfig,
    (None, "schema_scheduler_cosine"): CosineSchedulerConfig,
    (None, "schema_scheduler_step"): StepSchedulerConfig,
}


def register_schemas() -> None:
    """The schemas, and the resolvers: Optuna's direction for sweep presets, and a fresh
    directory for the default run and sweep directories (cached, so resolved once)."""
    from finetune.outputs import new_dir

    store = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        store.store(group=group, name=name, node=node)
    OmegaConf.register_new_resolver("finetune_direction", direction, replace=True)
    OmegaConf.register_new_resolver("finetune_default_metric", default_metric, replace=True)
    OmegaConf.register_new_resolver("finetune_new_dir", new_dir, use_cache=True, replace=True)


def dotted_scalars(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved config as dotted keys with scalar values (lists and null as JSON text)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(dotted_scalars(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def direction(metric: str) -> str:
    """How a sweeper should move `optimized_metric`: down for losses, up for accuracies."""
    return "minimize" if metric.endswith("loss") else "maximize"


def is_multi_label(data: Any) -> bool:
    """Whether the data config describes multi-label data (data=csv with a label delimiter
    or 0/1 label columns)."""
    return bool(data.get("label_delimiter") or data.get("label_columns"))


def default_metric(*, _root_: DictConfig) -> str:
    """optimized_metric's default: accuracy, or mean average precision for multi-label data,
    where accuracy would mislead."""
    return "best_val_map" if is_multi_label(_root_.data) else "best_val_acc"


def augment_policy(value: Any) -> str:
    """data.augment's policy; true and false are the settings of older runs (a boolean)."""
    return {"true": "light", "false": "none"}.get(str(value).lower(), str(value))


def valid_class_weights(value: Any) -> bool:
    if isinstance(value, str):
        return value in ("none", "balanced")
    return (isinstance(value, Sequence) and len(value) > 0
            and all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0
                    for w in value))


def multi_label_problems(cfg: DictConfig) -> list[str]:
    """What multi-label data cannot be combined with, one sentence each."""
    data, problems = cfg.data, []
    why = ("data.label_delimiter" if data.label_delimiter else "data.label_columns") + " is set"
    if data.label_delimiter and data.label_columns:
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
    if data.name in ("imagefolder", "csv"):
        check(augment_policy(data.augment) in AUGMENT_POLICIES, "data.augment", data.augment,
              "use " + ", ".join(AUGMENT_POLICIES))
        check(data.bad_images in BAD_IMAGE_POLICIES, "data.bad_images", data.bad_images,
              "use skip (leave them out, with one warning naming each) or fail")
        check(str(data.cache_images).lower() in CACHE_SETTINGS, "data.cache_images",
              data.cache_images, "use auto, true or false")
        check(data.cache_max_gb > 0, "data.cache_max_gb", data.cache_max_gb,
              "use a positive number of GiB")
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
    if data.name in ("digits", "csv", "imagefolder"):
        check(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction,
              "use a number between 0 and 1")
    check(data.split in DATA_SPLITS, "data.split", data.split,
          "use val (the validation split) or test (a test/ folder, or a CSV's split=test rows)")
    check(data.split == "val" or cfg.mode == "evaluate", "data.split", data.split,
          f"it chooses what mode=evaluate reads; mode={cfg.mode} always uses val (a run scores "
          "its best checkpoint on the test split by itself when there is one)")


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
                  check_optimization)


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
