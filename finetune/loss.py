"""Loss stage: cfg.loss and the training labels -> the criterion training minimizes.

Validation keeps plain cross-entropy (trainer.evaluate), so the val loss of runs with
different loss settings compares, and early stopping and the best checkpoint watch the same
quantity whatever the recipe.
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
    if hasattr(dataset, "targets"):  # ImageFolder and its kind
        return torch.as_tensor(dataset.targets)
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


def build_criterion(cfg: DictConfig, dataset: Dataset, class_names: list[str],
                    device: torch.device) -> nn.CrossEntropyLoss:
    setting = cfg.class_weights
    if not isinstance(setting, str):
        setting = OmegaConf.to_object(setting)
    labels = dataset_labels(dataset) if setting == "balanced" else torch.zeros(0, dtype=torch.long)
    weights = class_weights(setting, labels, class_names)
    if weights is not None or cfg.label_smoothing:
        described = "none" if weights is None else ", ".join(
            f"{name} {weight:.3g}" for name, weight in zip(class_names, weights.tolist(), strict=True))
        log.info("loss: cross-entropy, label smoothing %g, class weights: %s",
                 cfg.label_smoothing, described)
    return nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                               label_smoothing=cfg.label_smoothing)
