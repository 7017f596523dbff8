"""What Hydra is handed before it composes: the schemas in its ConfigStore, and the
resolvers the config files name (`finetune_direction`, `finetune_default_metric`,
`finetune_new_dir`). No torch here either: the command line imports this first."""

import itertools
import os

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from finetune.config.schemas import SCHEMAS, is_multi_label


def register_schemas() -> None:
    """The schemas, and the resolvers: Optuna's direction for sweep presets, and a fresh
    directory for the default run and sweep directories (cached, so resolved once)."""
    store = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        store.store(group=group, name=name, node=node)
    OmegaConf.register_new_resolver("finetune_direction", direction, replace=True)
    OmegaConf.register_new_resolver("finetune_default_metric", default_metric, replace=True)
    OmegaConf.register_new_resolver("finetune_new_dir", new_dir, use_cache=True, replace=True)


def direction(metric: str) -> str:
    """How a sweeper should move `optimized_metric`: down for losses, up for accuracies."""
    return "minimize" if metric.endswith("loss") else "maximize"


def default_metric(*, _root_: DictConfig) -> str:
    """optimized_metric's default: accuracy, or mean average precision for multi-label data,
    where accuracy would mislead."""
    return "best_val_map" if is_multi_label(_root_.data) else "best_val_acc"


def new_dir(path: str) -> str:
    """`path`, or else `path-2`, `path-3`, ...: the first that did not exist, created here.

    mkdir either creates a folder or fails, so two runs started in the same second (or on
    two machines sharing the folder) never get the same one. The config's run and sweep
    directories resolve through this once (a cached resolver). A path that cannot be
    created is returned as it is, for check_writable to explain.
    """
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        for number in itertools.count(1):
            candidate = path if number == 1 else f"{path}-{number}"
            try:
                os.mkdir(candidate)
                return candidate
            except FileExistsError:
                continue
    except OSError:
        pass
    return path
