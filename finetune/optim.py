"""Optimizer stage: the trainable parameters + cfg.optimizer / cfg.scheduler."""

from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from finetune.errors import ConfigError

OWN_KEYS = ("_target_", "decay_bias_and_norm")  # read here, not passed to the optimizer


def parameter_groups(net: nn.Module, weight_decay: float,
                     decay_bias_and_norm: bool) -> list[dict[str, Any]]:
    """The trainable parameters (the same tensors), 1-d ones (biases, norms) without decay."""
    trainable = [param for _, param in net.named_parameters() if param.requires_grad]
    if decay_bias_and_norm:
        return [{"params": trainable, "weight_decay": weight_decay}]
    decayed = [param for param in trainable if param.ndim > 1]
    undecayed = [param for param in trainable if param.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": weight_decay},
              {"params": undecayed, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def target_class(cfg: DictConfig, key: str) -> type:
    try:
        return get_class(cfg._target_)
    except Exception as error:
        raise ConfigError(f"{key}._target_={cfg._target_!r} is not an importable class: "
                          f"{error}") from error


def build_optimizer(net: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    arguments = {key: value for key, value in OmegaConf.to_container(cfg).items()
                 if key not in OWN_KEYS}
    groups = parameter_groups(net, cfg.weight_decay, cfg.decay_bias_and_norm)
    try:
        return target_class(cfg, "optimizer")(groups, **arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer={arguments} is not valid for {cfg._target_}: {error}") from error


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig):
    """The epoch-wise learning-rate scheduler, or None for a constant rate."""
    if cfg._target_ is None:
        return None
    arguments = {key: value for key, value in OmegaConf.to_container(cfg, resolve=True).items()
                 if key != "_target_"}
    try:
        return target_class(cfg, "scheduler")(optimizer, **arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"scheduler={arguments} is not valid for {cfg._target_}: {error}") from error
