"""Resume: continue a run in its own directory from checkpoints/last.pt, exactly.

`resume=<run directory>` or `resume=latest` (the newest run under outputs/ with a
checkpoint). The run goes on with its saved config; the command line may only raise
trainer.max_epochs (and say what it trusts). The checkpoint restores every part of the run
(finetune/checkpoint.py), so the resumed run ends as the uninterrupted one would have.
"""

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.config import CONFIG_GROUPS, dotted_scalars
from finetune.errors import ConfigError
from finetune.trust import check_file_overrides, check_targets, refuse_interpolations

log = logging.getLogger(__name__)

OUTPUTS_ROOT = "outputs"  # Hydra's default hydra.run.dir is outputs/<date>/<time>
LAST = os.path.join("checkpoints", "last.pt")
MAY_CHANGE = {"trainer.max_epochs",  # and only upwards
              "trust", "trainer.cache_dir"}  # taken from the command line, never from the file


def find_run_dir(value: str, outputs_root: str = OUTPUTS_ROOT) -> str:
    """The run directory `resume=value` names: a path, or `latest`."""
    if value == "latest":
        runs = [os.path.dirname(folder) for folder, _, files in os.walk(outputs_root)
                if os.path.basename(folder) == "checkpoints" and "last.pt" in files]
        if not runs:
            raise ConfigError(f"resume=latest: no run under {os.path.abspath(outputs_root)} has "
                              f"a {LAST}; give the run directory instead: resume=PATH.")
        newest = max(runs, key=lambda run: os.path.getmtime(os.path.join(run, LAST)))
        refuse_links(os.path.normpath(os.path.abspath(newest)), value)
        return os.path.normpath(os.path.abspath(newest))
    run_dir = os.path.abspath(os.path.expanduser(value))
    refuse_links(run_dir, value)
    if not os.path.isdir(run_dir):
        raise ConfigError(f"resume={value!r} is not a directory: give a run directory (one "
                          "holding checkpoints/last.pt) or latest.")
    if not os.path.isfile(os.path.join(run_dir, LAST)):
        raise ConfigError(f"resume={value!r}: {os.path.join(run_dir, LAST)} does not exist, so "
                          "there is nothing to resume (the run stopped before its first epoch "
                          "ended?). Start it again without resume.")
    return run_dir


def refuse_links(run_dir: str, value: str) -> None:
    """A resumed run writes into its directory: no file there may point elsewhere (a
    train.log linked to a shell's start-up file, say), and neither may the directory."""
    folders = [run_dir, os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, ".hydra")]
    links = [path for path in folders if os.path.islink(path)]
    links += [os.path.join(folder, name) for folder in folders if os.path.isdir(folder)
              for name in os.listdir(folder) if os.path.islink(os.path.join(folder, name))]
    if links:
        raise ConfigError(f"resume={value!r}: {links[0]} is a symbolic link; a run directory "
                          "to continue must hold its own files. Refusing it.")


def load_last(run_dir: str) -> dict[str, Any]:
    """The run's checkpoints/last.pt, upgraded to this version's format."""
    from finetune.checkpoint import read_run_checkpoint

    return read_run_checkpoint(os.path.join(run_dir, LAST), key="resume")


def changed_keys(before: dict, after: dict) -> list[str]:
    old, new = dotted_scalars(before), dotted_scalars(after)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def resumed_config(run_dir: str, record: dict[str, Any], new_overrides: Sequence[str],
                   compose: Callable[[list[str]], dict[str, Any]]) -> DictConfig:
    """The saved config (checkpoint["run"]) with the command line's trainer.max_epochs; any
    other change is an error naming the keys. `compose(overrides)` gives a config for
    overrides: the saved run's overrides with and without the new ones show what the new
    ones change. The saved config and overrides are a file's, so they are checked first
    (finetune/trust.py); `trust` and `trainer.cache_dir` come from this command line only."""
    source = f"resume={run_dir!r}"
    saved, saved_overrides = record["config"], record["overrides"]
    new_overrides = [item for item in new_overrides if not item.lstrip("+~").startswith("resume=")]
    live = compose(new_overrides)  # the user's own: what may be trusted, and this machine's
    check_file_overrides(saved_overrides, source, CONFIG_GROUPS)
    refuse_interpolations(saved, source)
    check_targets(saved, source, live["trust"])
    try:  # a file's overrides: a failure is the file's, named as such
        with_new = compose([*saved_overrides, *new_overrides])
        changed = changed_keys(compose(list(saved_overrides)), with_new)
    except Exception as error:
        raise ConfigError(f"{source}: its saved overrides {saved_overrides} do not compose "
                          f"with this version's conf/ ({type(error).__name__}: {error}).") from error
    refused = [key for key in changed if key not in MAY_CHANGE]
    if refused:
        values = dotted_scalars(saved)
        shown = ", ".join(f"{key} (saved {values.get(key)!r})" for key in refused[:8])
        raise ConfigError(f"resume={run_dir!r} continues the run with its saved config; these "
                          f"overrides change it: {shown}. Only trainer.max_epochs may be "
                          "raised. Drop the other overrides, or start a new run.")
    if saved.get("mode", "train") != "train":
        raise ConfigError(f"{source}: its checkpoint saved mode={saved['mode']!r}, not a "
                          "training run; refusing it.")
    # keys this version added since the run was saved (plots, logger, ...) take today's values
    config = OmegaConf.merge(OmegaConf.create(with_new), OmegaConf.create(saved))
    config.trust, config.trainer.cache_dir = live["trust"], live["trainer"]["cache_dir"]
    check_targets(OmegaConf.to_container(config), source, live["trust"])  # + what overrides added
    epochs = (with_new["trainer"]["max_epochs"] if "trainer.max_epochs" in changed
              else saved["trainer"]["max_epochs"])
    if epochs < saved["trainer"]["max_epochs"]:
        raise ConfigError(f"resume={run_dir!r}: trainer.max_epochs={epochs} is below the run's "
                          f"{saved['trainer']['max_epochs']}; it may only be raised.")
    config.trainer.max_epochs = epochs
    config.resume = run_dir
    return config
