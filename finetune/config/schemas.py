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
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


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
class ImageDataConfig(DataConfig):
    """What every source of image files shares: imagefolder, csv, hf, webdataset."""

    # training images only: none | flip | light (random resized crop + flip) | randaugment |
    # trivialaugment | autoaugment (the last three: light, then that torchvision policy)
    augment: str = "none"
    bad_images: str = "skip"  # skip (one warning naming each file) | fail (an error naming them)
    use_weights_transform: bool = True  # with pretrained weights, use their preprocessing
    # decode and resize each image once, then read the result back (under trainer.cache_dir):
    # auto (when it fits in cache_max_gb) | true | false
    cache_images: str = "auto"
    cache_max_gb: float = 20.0  # the image cache folder's bound; older entries go first


@dataclass
class ImageFolderDataConfig(ImageDataConfig):
    name: str = "imagefolder"
    root: str | None = None  # holds train/<class>/* and val/<class>/* (test/<class>/*), or <class>/*
    val_fraction: float = 0.2  # <class>/* directly under root: this share of each class validates


@dataclass
class CsvDataConfig(ImageDataConfig):
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


@dataclass
class HfDataConfig(ImageDataConfig):
    name: str = "hf"
    # a folder of Parquet (or other) data files, a folder written by save_to_disk, or the
    # name of a data set already in the local Hugging Face cache (read offline)
    path: str | None = None
    cache_dir: str | None = None  # where datasets keeps its Arrow copy of data files; null: its own
    image_column: str = "image"  # a datasets.Image column; its cells hold the image bytes
    label_column: str = "label"  # a ClassLabel, a list of them (multi-label), or plain values
    multi_label: bool = False  # true: the label column is a list of ClassLabel per image
    train_split: str = "train"
    val_split: str = "validation"
    val_fraction: float | None = None  # set when there is no validation split: a fixed share of train
    test_split: str = "test"  # what data.split=test reads (mode=evaluate, and a run's final test)
    streaming: bool = False  # a folder of Parquet files read as a stream (finetune/data/streaming.py)
    shuffle_buffer: int = 1000  # streaming: rows shuffled together in each loader worker


@dataclass
class WebDatasetDataConfig(ImageDataConfig):
    name: str = "webdataset"
    # local tar shards as brace patterns: /data/train-{0000..0127}.tar
    train_shards: str | None = None
    val_shards: str | None = None
    test_shards: str | None = None  # what data.split=test reads
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    label_key: str = "cls"  # the class number, as text (WebDataset writes an int so)
    class_names: list[str] | None = None  # the classes in label order; or classes_file
    classes_file: str | None = None  # one class name per line; neither: 0..the largest label


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
class AutoConfig:
    """freeze=auto and freeze=auto:select: the tool chooses from each part's relative
    gradient norm, ||g|| / ||theta|| (Auto-RGN; docs/strategies.md)."""

    batches: int = 4  # training batches measured (before each epoch for auto); no step is taken
    granularity: str = "stage"  # freeze=auto's unit: stage (@stem, @stage1, .., @head) | tensor
    keep: float = 0.9  # freeze=auto:select trains the stages whose RGN is >= keep x the largest stage's


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
class SearchConfig:
    """-m hparams_search=optuna: an Optuna study run by the project's own workers."""

    study_name: str = "finetune"
    # null: sqlite:///<sweep dir>/optuna.db; a database URL (postgresql+psycopg2://...) for several
    # machines; a file path (no "://") for a journal file on a shared filesystem
    storage: str | None = None
    n_trials: int = 20  # trials in the study, counting those already there
    n_jobs: int = 1  # worker processes on this machine, each taking the next trial
    sampler: str = "tpe"  # tpe | random | qmc (seeded with `seed`)
    pruner: str = "none"  # none | median | hyperband | successive_halving | threshold
    pruner_startup_trials: int = 5  # median: trials that finish before any is pruned
    pruner_warmup_epochs: int = 0  # median, threshold: epochs before a trial can be pruned
    prune_threshold: float | None = None  # threshold: prune below it (above it for a loss)
    heartbeat_seconds: int = 60  # database storage: a live worker's trial says so this often
    grace_seconds: int = 180  # a trial silent this long is failed and retried once, resumed
    params: dict[str, str] = field(default_factory=dict)  # key -> interval / tag(log, ...) / choice


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
    auto: AutoConfig = field(default_factory=AutoConfig)  # freeze=auto | auto:select (Auto-RGN)
    hparams_search: SearchConfig | None = None  # -m hparams_search=optuna
    # patterns over Net.named_parameters(), or auto | auto:select (the tool chooses)
    freeze: Any = field(default_factory=list)
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
    # (finetune/state/trust.py): [mypkg.MyLayer], [mypkg.*], or ['*'] for files you made yourself
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
AUTO_FREEZE = {"auto": "scale", "auto:select": "select"}  # freeze=<key> -> what auto does
AUTO_GRANULARITIES = ("stage", "tensor")  # auto.granularity


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
                "fake": FakeDataConfig, "csv": CsvDataConfig, "hf": HfDataConfig,
                "webdataset": WebDatasetDataConfig}


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
    (None, "schema_data_hf"): HfDataConfig,
    (None, "schema_data_webdataset"): WebDatasetDataConfig,
    (None, "schema_optimizer_sgd"): SGDConfig,
    (None, "schema_optimizer_adamw"): AdamWConfig,
    (None, "schema_scheduler_none"): SchedulerConfig,
    (None, "schema_scheduler_cosine"): CosineSchedulerConfig,
    (None, "schema_scheduler_step"): StepSchedulerConfig,
}


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


def is_multi_label(data: Any) -> bool:
    """Whether the data config describes multi-label data (data=csv with a label delimiter
    or 0/1 label columns, data=hf with data.multi_label)."""
    return bool(data.get("label_delimiter") or data.get("label_columns") or data.get("multi_label"))


def auto_freeze(freeze: Any) -> str | None:
    """freeze=auto: "scale" (every part trains, its rate scaled each epoch); freeze=auto:select:
    "select" (the parts below auto.keep are frozen once); a pattern list: None."""
    return AUTO_FREEZE.get(freeze) if isinstance(freeze, str) else None


def freeze_patterns(freeze: Any) -> list[str]:
    """The freeze patterns to apply first: none for auto (everything starts trainable)."""
    return [] if isinstance(freeze, str) else list(freeze)


def augment_policy(value: Any) -> str:
    """data.augment's policy; true and false are the settings of older runs (a boolean)."""
    return {"true": "light", "false": "none"}.get(str(value).lower(), str(value))
