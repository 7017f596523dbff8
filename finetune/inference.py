"""Inference: a checkpoint -> the Net (`load_model`), its metrics on a data set
(`mode=evaluate`), or a CSV of predictions for a folder of images (`mode=predict`).

A checkpoint carries its resolved config, class names, input spec (size, normalization)
and the full model state, so nothing else is needed: no Hydra, no config files, no
download (the backbone is built from random init and the saved weights loaded over it).

A model trained on multi-label data gives a probability per class (a sigmoid each, not a
softmax over them) and predicts every label at `predict.threshold` or above.
"""

import csv
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune import distributed
from finetune.adapters import adapted, fold_adapters
from finetune.calibration import calibration_scores, stored_temperature, validation_logits
from finetune.checkpoint import inference_weights, read_run_checkpoint
from finetune.config import TTA_SETTINGS, is_multi_label
from finetune.data import image_transforms, read_image, validation_data, worker_count
from finetune.errors import ConfigError
from finetune.files import atomic_write, spreadsheet_cell, write_json
from finetune.model import InputSpec, Net, Weights, build_backbone, build_net
from finetune.multilabel import MultiLabelScores
from finetune.plots import draw_or_warn, plot_confusion
from finetune.stages import resolve_aliases
from finetune.trainer import Step, evaluate, resolve_device
from finetune.trust import config_from_file

log = logging.getLogger(__name__)

NO_DOWNLOAD = Weights(enum=None, description="the checkpoint's weights")


@dataclass
class LoadedModel:
    """A trained model with what using it needs: the class of each output index, and the
    input it expects (image size and normalization)."""

    net: Net  # in eval mode
    class_names: list[str]  # output index -> class name
    input_spec: InputSpec
    config: dict[str, Any]  # the run's resolved config
    temperature: float = 1.0  # mode=calibrate's: logits are divided by it

    def wrap(self, tta: str = "none") -> Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
        """What a Step runs the model through: test-time augmentation, then the temperature."""
        augment = augmented(tta)
        if self.temperature == 1.0:
            return augment

        def scaled(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            forward = augment(module)
            return lambda images: forward(images) / self.temperature

        return scaled

    @property
    def multi_label(self) -> bool:
        return is_multi_label(self.config["data"])

    def transform(self):
        """The preprocessing for a PIL image, as validation used it: a callable (PIL image or
        uint8 tensor -> normalized tensor) holding two torchvision v2.Compose pipelines,
        `.fixed` (resize, center crop) and `.varying` (scaling, normalization)."""
        return image_transforms(self.input_spec)[1]

    def predict(self, images: Any, batch_size: int = 64, tta: str = "none",
                threshold: float = 0.5) -> tuple[list, torch.Tensor]:
        """The predicted class names and the probabilities (a row per image, a column per
        class, in `class_names` order) for one image or a list of them: file paths, PIL
        images, or a tensor batch already preprocessed with `transform()`. `tta="hflip"`
        averages the logits of each image and its mirror image. A multi-label model
        predicts a list of names per image: those at `threshold` or above. One image (a path
        or a PIL image) gives its label and its row of probabilities alone."""
        single = isinstance(images, str | os.PathLike | Image.Image)
        if not isinstance(images, torch.Tensor):
            transform = self.transform()
            images = torch.stack([transform(as_rgb(item)) for item in
                                  ([images] if single else images)])
        device = next(self.net.parameters(), torch.zeros(0)).device  # an ONNX model: the CPU
        step = Step(self.net, device, wrap=self.wrap(tta),
                    multi_label=self.multi_label)
        with torch.inference_mode():
            probabilities = torch.cat([class_probabilities(step, chunk)
                                       for chunk in images.split(batch_size)])
        if self.multi_label:
            labels = [[self.class_names[i] for i in row.nonzero().flatten().tolist()]
                      for row in probabilities >= threshold]
        else:
            labels = [self.class_names[index] for index in probabilities.argmax(dim=1).tolist()]
        return (labels[0], probabilities[0]) if single else (labels, probabilities)


def augmented(tta: str) -> Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
    """Test-time augmentation as a Step's `wrap`: `hflip` averages the logits of a batch
    and of its mirror image (one more forward pass); `none` is the model itself."""
    if tta not in TTA_SETTINGS:
        raise ConfigError(f"tta={tta!r} is not valid: use {' or '.join(TTA_SETTINGS)}.")
    if tta == "none":
        return lambda module: module
    return lambda module: lambda images: (module(images) + module(images.flip(-1))) / 2


def as_rgb(image: Any) -> Image.Image | torch.Tensor:
    """A PIL image as RGB; a path read as training read its images."""
    return image.convert("RGB") if isinstance(image, Image.Image) else read_image(str(image))


def class_probabilities(step: Step, images: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes (a sigmoid per class for multi-label data), on the CPU, for
    a preprocessed batch."""
    logits = step.logits(images.to(step.device))
    return (logits.sigmoid() if step.multi_label else logits.softmax(dim=1)).cpu()


def load_model(path: str, device: str | torch.device = "cpu", key: str = "checkpoint",
               trust: Sequence[str] = (), merge_adapters: bool = True) -> LoadedModel:
    """The model a run saved in `path` (last.pt or best.pt, or an exported model.onnx with
    its model.json), in eval mode, on `device`; a run's LoRA adapters folded into the base
    weights unless `merge_adapters` is false.

    The file is untrusted: its saved head may name torch.nn layers only, unless `trust`
    allows more (finetune/trust.py); nothing is downloaded (the backbone is built from
    random init and the saved weights loaded over it).
    """
    if str(path).endswith(".onnx"):  # mode=export's file, with its model.json
        from finetune.export import load_exported

        model = load_exported(path)
        model.net.to(device)
        return model
    checkpoint = read_run_checkpoint(path, key)
    record, source = checkpoint["run"], f"{key}={path!r}"
    cfg = config_from_file(record["config"], source, trust)
    spec = InputSpec.from_dict(record["input_spec"], source)
    temperature = stored_temperature(checkpoint, source)
    net = build_net(build_backbone(cfg.backbone, NO_DOWNLOAD), cfg.head,
                    len(record["class_names"]), spec.image_size, list(trust))
    # the run's adapter layers first, so its state dict's names fit
    adapters = adapted(net, cfg.get("adapter"), resolve_aliases(net.pretrained), spec.image_size)
    try:
        net.load_state_dict(inference_weights(checkpoint, source))
    except RuntimeError as error:
        raise ConfigError(f"{source}: its weights do not fit the model its config describes: "
                          f"{error}") from error
    if adapters is not None and merge_adapters:
        fold_adapters(net)
    return LoadedModel(net.to(device).eval(), list(record["class_names"]), spec, OmegaConf.to_container(cfg),
                       temperature)


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


def evaluation_data(cfg: DictConfig, trained_on: dict[str, Any],
                    overrides: Sequence[str]) -> DictConfig:
    """The data a checkpoint is evaluated on: what it was trained on (its root, classes,
    split), with the command line's data.KEY=VALUE on top; a data=OPTION on the command line
    chooses other data altogether. Loader settings are always this command's."""
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
    from_file = [f"data.{key}={data_cfg[key]!r}" for key in ("root", "file")
                 if data_cfg.get(key) is not None and data_cfg.get(key) == trained_on.get(key)]
    try:
        loader, classes = validation_data(data_cfg, model.input_spec, cfg.seed, **options)
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


class ImageFiles(Dataset):
    """Every image under a folder (recursively), in sorted order, with its path."""

    def __init__(self, folder: str, transform):
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.paths = sorted(os.path.join(parent, name) for parent, _, names in os.walk(folder)
                            for name in names if name.lower().endswith(IMG_EXTENSIONS))
        self.transform, self.loader = transform, read_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            return self.transform(self.loader(path)), path
        except Exception as error:  # one broken file does not stop the others
            log.warning("predict: leaving out unreadable image %s: %s", path, error)
            return None


def predict_folder(cfg: DictConfig, model: LoadedModel, device: torch.device, run_dir: str) -> float:
    """predictions.csv: path, predicted class and its probability for every image (for
    multi-label data: every label at predict.threshold or above, and their probabilities)."""
    from finetune.data import collate_readable

    folder = os.path.expanduser(cfg.predict_input)
    if not os.path.isdir(folder):
        raise ConfigError(f"predict_input={cfg.predict_input!r} is not a folder: give a folder "
                          "of images (searched recursively).")
    files = ImageFiles(folder, model.transform())
    if len(files) == 0:
        raise ConfigError(f"predict_input={cfg.predict_input!r} holds no image files "
                          "(.jpg, .png, ...).")
    loader = DataLoader(files, batch_size=cfg.data.batch_size, num_workers=worker_count(cfg.data.num_workers),
                        collate_fn=collate_readable)
    step = Step(model.net, device, cfg.trainer.precision, wrap=model.wrap(cfg.tta),
                multi_label=model.multi_label)
    rows = []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:  # every image of this batch was unreadable
                continue
            images, paths = batch
            probabilities = class_probabilities(step, images)
            if model.multi_label:
                rows += [labels_over(path, row, model.class_names, cfg.predict.threshold)
                         for path, row in zip(paths, probabilities, strict=True)]
                continue
            rows += [best_classes(path, row, model.class_names, cfg.predict.top_k)
                     for path, row in zip(paths, probabilities, strict=True)]
    if not rows:
        raise ConfigError(f"predict_input={cfg.predict_input!r}: none of its {len(files)} image "
                          "files could be read.")
    write_rows(rows, os.path.join(run_dir, "predictions.csv"))
    log.info("predicted %d of %d images in %s: %s", len(rows), len(files), folder,
             os.path.join(run_dir, "predictions.csv"))
    return float(len(rows))


def best_classes(path: str, probabilities: torch.Tensor, class_names: list[str],
                 top_k: int) -> dict[str, Any]:
    """A prediction row: the most probable class and its probability; with top_k > 1 also
    the k most probable, most probable first (both `;`-separated)."""
    best, index = probabilities.topk(min(top_k, len(class_names)))
    row = {"path": path, "class": class_names[int(index[0])], "probability": float(best[0])}
    if top_k > 1:
        row.update(top_classes=";".join(class_names[i] for i in index.tolist()),
                   top_probabilities=";".join(f"{float(p):.4f}" for p in best))
    return row


def labels_over(path: str, probabilities: torch.Tensor, class_names: list[str],
                threshold: float) -> dict[str, str]:
    """A multi-label prediction row: every label at the threshold or above, most probable
    first, with its probability (both `;`-separated; empty when no label reaches it)."""
    chosen = sorted(((float(p), name) for p, name in zip(probabilities, class_names, strict=True)
                     if p >= threshold), reverse=True)
    return {"path": path, "classes": ";".join(name for _, name in chosen),
            "probabilities": ";".join(f"{p:.4f}" for p, _ in chosen)}


def write_rows(rows: list[dict[str, Any]], path: str) -> None:
    """Class names and paths come from folders, CSV files and checkpoints: a formula among
    them is kept text (files.spreadsheet_cell)."""
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows({key: spreadsheet_cell(value) for key, value in row.items()}
                         for row in rows)
