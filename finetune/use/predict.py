"""mode=predict: a CSV of predictions for a folder of images (the best class and its
probability, or the top k, or every label over the threshold for multi-label models)."""

import csv
import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from finetune.data.images import read_image
from finetune.data.loaders import worker_count
from finetune.errors import ConfigError
from finetune.state.files import atomic_write, spreadsheet_cell
from finetune.train.trainer import Step
from finetune.use.loaded_model import LoadedModel, class_probabilities

log = logging.getLogger(__name__)


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
    from finetune.data.folders import collate_readable

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
