"""Resume: continue a run in its own directory from checkpoints/last.pt, exactly.

`resume=<run directory>` or `resume=latest` (the newest run under outputs/ with a
checkpoint). The run goes on with its saved config; the command line may only raise
trainer.max_epochs. The checkpoint restores the model, optimizer, scheduler, gradient
scaler, unfreeze phases, RNG streams and loader order, so the resumed run ends as the
uninterrupted one would have.
"""

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.config import dotted_scalars
from finetune.errors import ConfigError

log = logging.getLogger(__name__)

OUTPUTS_ROOT = "outputs"  # Hydra's default hydra.run.dir is outputs/<date>/<time>
LAST = os.path.join("checkpoints", "last.pt")
MAY_CHANGE = {"trainer.max_epochs"}  # and only upwards


def find_run_dir(value: str, outputs_root: str = OUTPUTS_ROOT) -> str:
    """The run directory `resume=value` names: a path, or `latest`."""
    if value == "latest":
        runs = [os.path.dirname(folder) for folder, _, files in os.walk(outputs_root)
                if os.path.basename(folder) == "checkpoints" and "last.pt" in files]
        if not runs:
            raise ConfigError(f"resume=latest: no run under {os.path.abspath(outputs_root)} has "
                              f"a {LAST}; give the run directory instead: resume=PATH.")
        newest = max(runs, key=lambda run: os.path.getmtime(os.path.join(run, LAST)))
        return os.path.normpath(os.path.abspath(newest))
    run_dir = os.path.abspath(os.path.expanduser(value))
    if not os.path.isdir(run_dir):
        raise ConfigError(f"resume={value!r} is not a directory: give a run directory (one "
                          "holding checkpoints/last.pt) or latest.")
    if not os.path.isfile(os.path.join(run_dir, LAST)):
        raise ConfigError(f"resume={value!r}: {os.path.join(run_dir, LAST)} does not exist, so "
                          "there is nothing to resume (the run stopped before its first epoch "
                          "ended?). Start it again without resume.")
    return run_dir


def load_last(run_dir: str) -> dict[str, Any]:
    from finetune.checkpoint import read_checkpoint
    from finetune.trainer import CHECKPOINT_FORMAT

    checkpoint = read_checkpoint(os.path.join(run_dir, LAST), key="resume")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"resume={run_dir!r}: its checkpoint has format "
                          f"{checkpoint.get('format')}, this version resumes format "
                          f"{CHECKPOINT_FORMAT} only. Start the run again.")
    return checkpoint


def changed_keys(before: dict, after: dict) -> list[str]:
    old, new = dotted_scalars(before), dotted_scalars(after)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def resumed_config(run_dir: str, saved: dict[str, Any], saved_overrides: Sequence[str],
                   new_overrides: Sequence[str],
                   compose: Callable[[list[str]], dict[str, Any]]) -> DictConfig:
    """The saved config with the command line's trainer.max_epochs; any other change is an
    error naming the keys. `compose(overrides)` gives a resolved config for overrides: the
    saved run's overrides with and without the new ones show what the new ones change."""
    new_overrides = [item for item in new_overrides if not item.lstrip("+~").startswith("resume=")]
    with_new = compose([*saved_overrides, *new_overrides])
    changed = changed_keys(compose(list(saved_overrides)), with_new)
    refused = [key for key in changed if key not in MAY_CHANGE]
    if refused:
        values = dotted_scalars(saved)
        shown = ", ".join(f"{key} (saved {values.get(key)!r})" for key in refused[:8])
        raise ConfigError(f"resume={run_dir!r} continues the run with its saved config; these "
                          f"overrides change it: {shown}. Only trainer.max_epochs may be "
                          "raised. Drop the other overrides, or start a new run.")
    # keys this version added since the run was saved (plots, logger, ...) take today's values
    config = OmegaConf.merge(OmegaConf.create(with_new), OmegaConf.create(saved))
    epochs = with_new["trainer"]["max_epochs"] if changed else saved["trainer"]["max_epochs"]
    if epochs < saved["trainer"]["max_epochs"]:
        raise ConfigError(f"resume={run_dir!r}: trainer.max_epochs={epochs} is below the run's "
                          f"{saved['trainer']['max_epochs']}; it may only be raised.")
    config.trainer.max_epochs = epochs
    config.resume = run_dir
    return config


def restore(checkpoint: dict[str, Any], setup: Any, step: Any, loaders: list, run_dir: str):
    """Put the built run back where `checkpoint` left it; returns (progress, checkpoints)."""
    from finetune import distributed
    from finetune.checkpoint import RunCheckpoints, link_atomic
    from finetune.trainer import Progress, restore_rng

    for epoch in range(2, checkpoint["epoch"] + 1):  # the phases that had started, in order
        setup.unfreeze.start_epoch(epoch)
    trainable = [name for name, param in setup.net.named_parameters() if param.requires_grad]
    if trainable != checkpoint["trainable"]:
        raise ConfigError(f"resume={run_dir!r}: the checkpoint trained other parameters than "
                          "this build does (the code or the backbone changed?); start a new run.")
    setup.net.load_state_dict(checkpoint["model"])
    setup.optimizer.load_state_dict(checkpoint["optimizer"])
    if setup.scheduler is not None:
        setup.scheduler.load_state_dict(checkpoint["scheduler"])
    step.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint["rng"], loaders)
    if checkpoint["feature_cache_key"] != setup.cache.key:
        log.warning("resume: the cached backbone outputs now have key %s, the checkpoint's had "
                    "%s (torch, the weights or the data changed?): the result may differ from "
                    "an uninterrupted run", setup.cache.key, checkpoint["feature_cache_key"])
    checkpoints = RunCheckpoints(os.path.join(run_dir, "checkpoints"))
    checkpoints.adopt(checkpoint["frozen_part"])
    if checkpoint["progress"]["best_epoch"] == checkpoint["epoch"] and distributed.is_main():
        # killed between writing last.pt and linking best.pt to it: link it now
        link_atomic(checkpoints.path("last.pt"), checkpoints.path("best.pt"))
    return Progress.from_state(checkpoint["progress"]), checkpoints
