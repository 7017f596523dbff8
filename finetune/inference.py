"""Inference: a checkpoint -> the Net (`load_model`), its metrics on a data set
(`mode=evaluate`), or a CSV of predictions for a folder of images (`mode=predict`).

A checkpoint carries its resolved config, class names, input spec (size, normalization)
and the full model state, so nothing else is needed: no Hydra, no config files, no
download (the backbone is built from random init and the saved weights loaded over it).
"""

import csv
import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from finetune import distributed
from finetune.checkpoint import read_checkpoint
from finetune.data import build_data, image_transforms
from finetune.errors import ConfigError
from finetune.model import InputSpec, Net, Weights, build_backbone, build_net
from finetune.outputs import write_json
from finetune.plots import draw_or_warn, plot_confusion
from finetune.trainer import Step, evaluate, resolve_device

log = logging.getLogger(__name__)

NO_DOWNLOAD = Weights(enum=None, description="the checkpoint's weights")


def load_model(path: str, device: str | torch.device = "cpu",
               key: str = "checkpoint") -> Net:
    """The Net a run saved in `path` (last.pt or best.pt), in eval mode, on `device`.

    It also carries `class_names` (index -> name) and `input_spec` (the image size and
    normalization its inputs need).
    """
    checkpoint = read_checkpoint(path, key)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise ConfigError(f"{key}={path!r} is not a checkpoint written by a run of this tool "
                          "(it has no saved config); give a run's checkpoints/last.pt or best.pt.")
    cfg = OmegaConf.create(checkpoint["config"])
    spec = InputSpec.from_dict(checkpoint["input_spec"])
    net = build_net(build_backbone(cfg.backbone, NO_DOWNLOAD), cfg.head,
                    len(checkpoint["class_names"]), spec.image_size)
    net.load_state_dict(checkpoint["model"])
    net.class_names, net.input_spec = list(checkpoint["class_names"]), spec
    return net.to(device).eval()


def run_inference(cfg: DictConfig, run_dir: str, plots: bool = False) -> float:
    """mode=evaluate -> evaluation.json + per_class.csv (+ confusion.png with `plots`);
    mode=predict -> predictions.csv."""
    device = resolve_device(cfg.trainer.device)
    net = load_model(os.path.expanduser(cfg.checkpoint), device)
    os.makedirs(run_dir, exist_ok=True)
    if cfg.mode == "evaluate":
        return evaluate_checkpoint(cfg, net, device, run_dir, plots)
    return predict_folder(cfg, net, device, run_dir)


def evaluate_checkpoint(cfg: DictConfig, net: Net, device: torch.device, run_dir: str,
                        plots: bool = False) -> float:
    """Loss, accuracy, per-class accuracy and the confusion matrix on the data's validation
    split."""
    data = build_data(cfg.data, net.input_spec, cfg.seed, pin_memory=device.type == "cuda",
                      shard=distributed.shard())  # under torchrun each rank a part, summed
    if data.class_names != net.class_names:
        raise ConfigError(
            f"checkpoint={cfg.checkpoint!r} was trained on {len(net.class_names)} classes "
            f"{net.class_names[:10]}, but data={cfg.data.name} has {data.num_classes} classes "
            f"{data.class_names[:10]}; evaluate it on data with the same classes.")
    val = evaluate(net, data.val_loader, Step(net, device, cfg.trainer.precision))
    seen = sum(map(sum, val.confusion))
    if seen == 0:
        raise ConfigError(f"data={cfg.data.name}: no readable validation image to evaluate on.")
    per_class = [{"class": name, "images": sum(row), "accuracy": row[index] / max(sum(row), 1)}
                 for index, (name, row) in enumerate(zip(net.class_names, val.confusion,
                                                         strict=True))]
    result = {"checkpoint": os.path.abspath(os.path.expanduser(cfg.checkpoint)),
              "data": cfg.data.name, "images": seen, "loss": val.loss,
              "accuracy": val.accuracy, "per_class": per_class, "confusion": val.confusion}
    if distributed.is_main():
        write_json(result, os.path.join(run_dir, "evaluation.json"))
        write_rows(per_class, os.path.join(run_dir, "per_class.csv"))
        if plots:
            draw_or_warn(plot_confusion, val.confusion, net.class_names,
                         f"{cfg.data.name} validation split", os.path.join(run_dir, "confusion.png"))
    lines = [f"{row['class']:>12}  {row['images']:6d}  {row['accuracy']:.4f}" for row in per_class]
    log.info("evaluated %s on %d images of data=%s: loss %.4f, accuracy %.4f\n%12s  %6s  %s\n%s",
             cfg.checkpoint, seen, cfg.data.name, result["loss"], result["accuracy"], "class",
             "images", "accuracy", "\n".join(lines))
    return result["accuracy"]


class ImageFiles(Dataset):
    """Every image under a folder (recursively), in sorted order, with its path."""

    def __init__(self, folder: str, transform):
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

        self.paths = sorted(os.path.join(parent, name) for parent, _, names in os.walk(folder)
                            for name in names if name.lower().endswith(IMG_EXTENSIONS))
        self.transform, self.loader = transform, default_loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            return self.transform(self.loader(path)), path
        except Exception as error:  # one broken file does not stop the others
            log.warning("predict: leaving out unreadable image %s: %s", path, error)
            return None


def predict_folder(cfg: DictConfig, net: Net, device: torch.device, run_dir: str) -> float:
    """predictions.csv: path, predicted class and its probability for every image."""
    from finetune.data import collate_readable

    folder = os.path.expanduser(cfg.predict_input)
    if not os.path.isdir(folder):
        raise ConfigError(f"predict_input={cfg.predict_input!r} is not a folder: give a folder "
                          "of images (searched recursively).")
    files = ImageFiles(folder, image_transforms(net.input_spec, augment=False)[1])
    if len(files) == 0:
        raise ConfigError(f"predict_input={cfg.predict_input!r} holds no image files "
                          "(.jpg, .png, ...).")
    loader = DataLoader(files, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                        collate_fn=collate_readable)
    step, rows = Step(net, device, cfg.trainer.precision), []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:  # every image of this batch was unreadable
                continue
            images, paths = batch
            probabilities = step.logits(images.to(device)).softmax(dim=1).cpu()
            best, index = probabilities.max(dim=1)
            rows += [{"path": path, "class": net.class_names[i], "probability": float(p)}
                     for path, i, p in zip(paths, index.tolist(), best, strict=True)]
    if not rows:
        raise ConfigError(f"predict_input={cfg.predict_input!r}: none of its {len(files)} image "
                          "files could be read.")
    write_rows(rows, os.path.join(run_dir, "predictions.csv"))
    log.info("predicted %d of %d images in %s: %s", len(rows), len(files), folder,
             os.path.join(run_dir, "predictions.csv"))
    return float(len(rows))


def write_rows(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
