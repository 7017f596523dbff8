"""Loss stage: cfg.loss and the training labels -> the criterion training minimizes:
cross-entropy, or for multi-label data binary cross-entropy per class (BCE-with-logits).

Validation keeps the plain loss (trainer.evaluate), so the val loss of runs with different
loss settings compares, and early stopping and the best checkpoint watch the same quantity
whatever the recipe.
"""

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from finetune.errors import ConfigError

log = logging.getLogger(__name__)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Every label of a dataset, without decoding images where the dataset lists them."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1]
    if isinstance(dataset, Subset):  # a cross-validation fold
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if hasattr(dataset, "targets"):  # ImageFolder and its kind (multi-label: 0/1 vectors)
        targets = dataset.targets
        if torch.is_tensor(targets):  # a stream's labels, kept as one array
            return targets
        return torch.stack(targets) if targets and torch.is_tensor(targets[0]) else torch.as_tensor(targets)
    return torch.tensor([int(dataset[index][1]) for index in range(len(dataset))])


def class_weights(setting: Any, labels: torch.Tensor, class_names: list[str]) -> torch.Tensor | None:
    """None for `none`; for `balanced`, total / (classes x count) per class, as scikit-learn's
    compute_class_weight (a class with half the average count weighs 2); else the list."""
    if isinstance(setting, str):
        if setting == "none":
            return None
        counts = torch.bincount(labels, minlength=len(class_names)).double()
        empty = [name for name, count in zip(class_names, counts.tolist(), strict=True) if count == 0]
        if empty:
            raise ConfigError(f"loss.class_weights=balanced: the training data has no image of "
                              f"class {', '.join(empty)}; give the weights as a list instead.")
        return (counts.sum() / (len(class_names) * counts)).float()
    weights = [float(weight) for weight in setting]
    if len(weights) != len(class_names):
        raise ConfigError(f"loss.class_weights has {len(weights)} weights for "
                          f"{len(class_names)} classes ({', '.join(class_names)}): give one per class.")
    return torch.tensor(weights)


def positive_weights(setting: Any, labels: torch.Tensor, class_names: list[str]) -> torch.Tensor | None:
    """Multi-label data: BCE's pos_weight per class. `balanced` is negatives / positives (a
    class on one image in ten weighs its positives 9), as BCEWithLogitsLoss documents."""
    if setting != "balanced":
        return class_weights(setting, labels, class_names)
    positives = labels.double().sum(dim=0)
    empty = [name for name, count in zip(class_names, positives.tolist(), strict=True) if count == 0]
    if empty:
        raise ConfigError(f"loss.class_weights=balanced: no training image has the label "
                          f"{', '.join(empty)}; give the weights as a list instead.")
    return ((len(labels) - positives) / positives).float()


def build_criterion(cfg: DictConfig, dataset: Dataset, class_names: list[str],
                    device: torch.device, multi_label: bool = False) -> nn.Module:
    setting = cfg.class_weights
    if not isinstance(setting, str):
        setting = OmegaConf.to_object(setting)
    labels = dataset_labels(dataset) if setting == "balanced" else torch.zeros(0, dtype=torch.long)
    if multi_label:
        weights = positive_weights(setting, labels, class_names)
        if weights is not None:
            log.info("loss: binary cross-entropy per class, positive weights: %s", ", ".join(
                f"{name} {weight:.3g}" for name, weight in zip(class_names, weights.tolist(), strict=True)))
        return nn.BCEWithLogitsLoss(pos_weight=None if weights is None else weights.to(device))
    weights = class_weights(setting, labels, class_names)
    if weights is not None or cfg.label_smoothing:
        described = "none" if weights is None else ", ".join(
            f"{name} {weight:.3g}" for name, weight in zip(class_names, weights.tolist(), strict=True))
        log.info("loss: cross-entropy, label smoothing %g, class weights: %s",
                 cfg.label_smoothing, described)
    return nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                               label_smoothing=cfg.label_smoothing)
