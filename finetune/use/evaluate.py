"""mode=evaluate: a checkpoint's metrics on a data set (evaluation.json, per_class.csv,
confusion.png), on the data it was trained on unless the command line names other data;
`run_inference` is the entry for mode=evaluate and mode=predict."""

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from finetune.data.loaders import validation_data
from finetune.errors import ConfigError
from finetune.show.plots import draw_or_warn, plot_confusion
from finetune.state.files import write_json
from finetune.train import distributed
from finetune.train.multilabel import MultiLabelScores
from finetune.train.trainer import Step, evaluate, resolve_device
from finetune.use.calibration import calibration_scores, validation_logits
from finetune.use.load import load_model
from finetune.use.loaded_model import LoadedModel
from finetune.use.predict import predict_folder, write_rows

log = logging.getLogger(__name__)


def run_inference(cfg: DictConfig, run_dir: str, plots: bool = False,
                  overrides: Sequence[str] = ()) -> float:
    """mode=evaluate -> evaluation.json + per_class.csv (+ confusion.png with `plots`);
    mode=predict -> predictions.csv. `overrides` (the command line's) decide which data
    settings are the user's rather than the checkpoint's."""
    device = resolve_device(cfg.trainer.device)
    model = load_model(os.path.expanduser(cfg.checkpoint), device, trust=cfg.trust)
    log.info("mode=%s: checkpoint %s (backbone %s, %d classes, trained on data=%s)", cfg.mode,
             cfg.checkpoint, model.config["backbone"]["name"], len(model.class_names),
             model.config["data"]["name"])
    os.makedirs(run_dir, exist_ok=True)
    if cfg.mode == "evaluate":
        return evaluate_checkpoint(cfg, overrides, model, device, run_dir, plots)
    return predict_folder(cfg, model, device, run_dir)


LOADER_KEYS = ("batch_size", "num_workers")  # this machine's, never the checkpoint's
WRITE_KEYS = ("cache_dir",)  # data=hf: where datasets writes its Arrow copy; a file never chooses


def evaluation_data(cfg: DictConfig, trained_on: dict[str, Any],
                    overrides: Sequence[str]) -> DictConfig:
    """The data a checkpoint is evaluated on: what it was trained on (its root, classes,
    split), with the command line's data.KEY=VALUE on top; a data=OPTION on the command line
    chooses other data altogether. Loader settings, and where data=hf writes its Arrow copy,
    are always this command's."""
    keys = [item.lstrip("+~").split("=", 1)[0] for item in overrides]
    if "data" in keys:
        return cfg.data
    data = OmegaConf.create({"split": "val", **trained_on})  # an exported model's, perhaps older
    chosen = {key.split(".", 1)[1] for key in keys if key.startswith("data.")}
    for key in chosen.union(LOADER_KEYS):
        if key not in cfg.data:
            continue
        if key not in data and key not in LOADER_KEYS:
            raise ConfigError(f"data.{key}: the checkpoint was trained on data={data.name}, "
                              f"which has no key {key!r}; add the data option it belongs to "
                              "(e.g. data=imagefolder) to evaluate on other data.")
        data[key] = cfg.data[key]
    for key in WRITE_KEYS:
        if key in data:  # this command's (its default where its data option has none)
            data[key] = cfg.data.get(key)
    return data


def checkpoint_data(cfg: DictConfig, model: "LoadedModel", overrides: Sequence[str],
                    split: str | None = None, **options: Any) -> tuple[DataLoader, list[str], DictConfig]:
    """The loader of data.split (or `split`), class names and data config of what `model`
    is evaluated on (evaluation_data; `options`: data.validation_data's). Where the paths
    came from the checkpoint, an error reading them says so and quotes nothing of what was
    read: the user named none of those files."""
    data_cfg = evaluation_data(cfg, model.config["data"], overrides)
    if split is not None:
        data_cfg.split = split
    trained_on = model.config["data"]
    from_file = [f"data.{key}={data_cfg[key]!r}" for key in ("root", "file", "path", "val_shards",
                                                              "test_shards", "classes_file")
                 if data_cfg.get(key) is not None and data_cfg.get(key) == trained_on.get(key)]
    try:
        loader, classes = validation_data(data_cfg, model.input_spec, cfg.seed,
                                          cache_dir=cfg.trainer.cache_dir, **options)
    except ConfigError as error:
        if not from_file:
            raise
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}: the data it was trained on could not "
                          f"be read as data={data_cfg.name} ({type(error).__name__}); "
                          f"{' and '.join(from_file)} came from the checkpoint's saved config, not "
                          "from your command line. Name the data to use: data.root=... (or "
                          "data.file=...), or data=OPTION with its keys.") from None
    return loader, classes, data_cfg


def report_multi_label(cfg: DictConfig, result: dict[str, Any], scores: MultiLabelScores,
                       class_names: list[str], run_dir: str) -> float:
    """evaluation.json and per_class.csv for multi-label data; returns the mAP."""
    per_class = [{"class": name, "images": count, "average_precision": precision, "f1": f1}
                 for name, count, precision, f1 in zip(class_names, scores.positives,
                                                       scores.average_precision, scores.f1,
                                                       strict=True)]
    result.update({"threshold": cfg.predict.threshold, "map": scores.map,
                   "micro_f1": scores.micro_f1, "macro_f1": scores.macro_f1,
                   "per_class": per_class})
    path = os.path.join(run_dir, "evaluation.json")
    if distributed.is_main():
        write_json(result, path)
        write_rows(per_class, os.path.join(run_dir, "per_class.csv"))
    lines = [f"{row['class']:>12}  {row['images']:6d}  {row['average_precision']:.4f}  "
             f"{row['f1']:.4f}" for row in per_class]
    log.info("evaluated %s on %d images: loss %.4f, mAP %.4f, micro-F1 %.4f, macro-F1 %.4f "
             "(at threshold %g)\n%12s  %6s  %6s  %s\n%s\nresults: %s (and per_class.csv beside "
             "it)", cfg.checkpoint, result["images"], result["loss"], scores.map, scores.micro_f1,
             scores.macro_f1, cfg.predict.threshold, "class", "images", "AP", "F1",
             "\n".join(lines), path)
    return scores.map


def evaluate_checkpoint(cfg: DictConfig, overrides: Sequence[str], model: LoadedModel,
                        device: torch.device, run_dir: str, plots: bool = False) -> float:
    """Loss, accuracy, per-class accuracy and the confusion matrix on the data's validation
    split (its training images are not read); for multi-label data, mAP, F1 and per-class
    AP instead."""
    net, class_names = model.net, model.class_names
    loader, data_classes, data_cfg = checkpoint_data(cfg, model, overrides,
                                                     pin_memory=device.type == "cuda",
                                                     shard=distributed.shard())  # under torchrun: summed
    where = f" (data.root={data_cfg.root})" if data_cfg.get("root") else ""
    log.info("evaluating on the %s split of data=%s%s%s", data_cfg.split, data_cfg.name, where,
             "" if cfg.tta == "none" else f", test-time augmentation: {cfg.tta}")
    if data_classes != class_names:
        raise ConfigError(
            f"checkpoint={cfg.checkpoint!r} was trained on {len(class_names)} classes "
            f"{class_names[:10]}, but data={data_cfg.name}{where} has {len(data_classes)} "
            f"classes {data_classes[:10]}; evaluate it on data with the same classes.")
    val = evaluate(net, loader, Step(net, device, cfg.trainer.precision, wrap=model.wrap(cfg.tta),
                                     multi_label=model.multi_label,
                                     threshold=cfg.predict.threshold))
    seen = val.images
    if seen == 0:
        raise ConfigError(f"data={data_cfg.name}{where}: no readable validation image to "
                          "evaluate on.")
    result = {"checkpoint": os.path.abspath(os.path.expanduser(cfg.checkpoint)),
              "data": OmegaConf.to_container(data_cfg), "tta": cfg.tta, "images": seen,
              "loss": val.loss}
    if model.multi_label:
        return report_multi_label(cfg, result, val.multi_label, class_names, run_dir)
    per_class = [{"class": name, "images": sum(row), "accuracy": row[index] / max(sum(row), 1)}
                 for index, (name, row) in enumerate(zip(class_names, val.confusion,
                                                         strict=True))]
    top_k = val.scores["val_top5_acc"]  # NaN with 5 classes or fewer: left out
    result.update({"accuracy": val.accuracy, "balanced_accuracy": val.scores["val_balanced_acc"],
                   "macro_f1": val.scores["val_macro_f1"], "per_class": per_class,
                   **({} if math.isnan(top_k) else {"top5_accuracy": top_k}),
                   "confusion": val.confusion})
    if model.temperature != 1.0:  # the loss above is the calibrated one; both, with ECE
        logits, labels = validation_logits(net, loader, device)
        result["calibration"] = calibration_scores(logits, labels, model.temperature)
    path = os.path.join(run_dir, "evaluation.json")
    if distributed.is_main():
        write_json(result, path)
        write_rows(per_class, os.path.join(run_dir, "per_class.csv"))
        if plots:
            draw_or_warn(plot_confusion, val.confusion, class_names,
                         f"{data_cfg.name} {data_cfg.split} split", os.path.join(run_dir, "confusion.png"))
    lines = [f"{row['class']:>12}  {row['images']:6d}  {row['accuracy']:.4f}" for row in per_class]
    log.info("evaluated %s on %d images: loss %.4f, accuracy %.4f\n%12s  %6s  %s\n%s\n"
             "results: %s (and per_class.csv beside it)", cfg.checkpoint, seen, result["loss"],
             result["accuracy"], "class", "images", "accuracy", "\n".join(lines), path)
    return result["accuracy"]
