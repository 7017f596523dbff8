"""Resume: continue a run in its own directory from checkpoints/last.pt, exactly.

`resume=<run directory>` or `resume=latest` (the newest run under outputs/ with a
checkpoint). The run goes on with its saved config; the command line may only raise
trainer.max_epochs, set data.num_workers (and say what it trusts). The checkpoint restores
every part of the run (finetune/state/checkpoint.py), so the resumed run ends as the
uninterrupted one would have.
"""

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.config.schemas import CONFIG_GROUPS, DATA_SCHEMAS, dotted_scalars
from finetune.errors import ConfigError
from finetune.state.trust import check_file_overrides, config_from_file

OUTPUTS_ROOT = "outputs"  # Hydra's default hydra.run.dir is outputs/<date>/<time>
LAST = os.path.join("checkpoints", "last.pt")
MAY_CHANGE = {"trainer.max_epochs",  # and only upwards
              "data.num_workers",  # this machine's loader processes (with random
              # augmentation, other draws: the docs say so)
              "trust", "trainer.cache_dir", "data.cache_dir"}  # where the tool writes (and
# what it trusts): taken from the command line, never from the file


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
        why = ("the run kept its best weights alone (trainer.checkpoints=best, a sweep job's "
               "default)" if os.path.isfile(os.path.join(run_dir, "checkpoints", "best.pt"))
               else "the run stopped before its first epoch ended, or kept no checkpoint")
        raise ConfigError(f"resume={value!r}: {os.path.join(run_dir, LAST)} does not exist, so "
                          f"there is nothing to resume ({why}). Start it again without resume.")
    return run_dir


def with_resume_dir(argv: list[str]) -> list[str]:
    """`resume=X` runs in X's directory: name it for Hydra before Hydra picks a new one.

    Hydra's own files for this invocation go to .hydra/resume-<time>/, so the run's saved
    .hydra/ files stay as they were.
    """
    found = [index for index, arg in enumerate(argv) if arg.lstrip("+").startswith("resume=")]
    value = argv[found[-1]].split("=", 1)[1] if found else "null"
    if value in ("null", ""):
        return argv
    if {"-m", "--multirun"} & set(argv):
        raise ConfigError(f"resume={value!r} continues one run; it cannot be part of a sweep "
                          "(-m). Drop -m, or drop resume.")
    run_dir = find_run_dir(value)
    if any(arg.startswith(("hydra.run.dir=", "hydra.output_subdir=")) for arg in argv):
        raise ConfigError(f"resume={value!r} runs in the resumed run's directory; drop "
                          "hydra.run.dir / hydra.output_subdir.")
    argv = [arg for index, arg in enumerate(argv) if index not in found]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [*argv, f"resume={run_dir}", f"hydra.run.dir={run_dir}",
            f"hydra.output_subdir=.hydra/resume-{stamp}"]


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
    from finetune.state.checkpoint import read_run_checkpoint

    return read_run_checkpoint(os.path.join(run_dir, LAST), key="resume")


def changed_keys(before: dict, after: dict) -> list[str]:
    old, new = dotted_scalars(before), dotted_scalars(after)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def resolved(config: dict) -> dict:
    """A config composed from conf/ and the user's command line (trusted), resolved."""
    return OmegaConf.to_container(OmegaConf.create(config), resolve=True)


def requested_changes(saved: dict, defaults: dict, with_new: dict, ours: dict,
                      new_overrides: Sequence[str]) -> list[str]:
    """The keys whose value the command line asks to differ from the saved run's: those
    its overrides change from the run's group defaults (compared unresolved, so a raised
    max_epochs is not also a new T_max), and those it names."""
    named = {item.lstrip("+~").partition("=")[0] for item in new_overrides}
    new, old = dotted_scalars(ours), dotted_scalars(saved)
    candidates = set(changed_keys(defaults, with_new))
    candidates |= {key for key in new if any(key == name or key.startswith(name + ".")
                                             for name in named)}
    return sorted(key for key in candidates if new.get(key) != old.get(key))


def resumed_config(run_dir: str, record: dict[str, Any], new_overrides: Sequence[str],
                   compose: Callable[[list[str]], dict[str, Any]]) -> DictConfig:
    """The saved config (checkpoint["run"]) with the command line's trainer.max_epochs
    (raised) and data.num_workers; any other change is an error naming the keys.

    The saved config is a file's, read through trust.config_from_file; keys it did not save
    (added by later versions) take the schema's defaults. Nothing of the file is composed:
    `compose(overrides)` composes the command line's overrides (with the run's data option,
    so its data keys exist) to see what they change. `trust`, `trainer.cache_dir` and
    data=hf's `data.cache_dir` (where datasets writes its Arrow copy) come from this command
    line only."""
    source = f"resume={run_dir!r}"
    saved = record["config"]
    new_overrides = [item for item in new_overrides if not item.lstrip("+~").startswith("resume=")]
    data = saved.get("data")
    name = data.get("name") if isinstance(data, dict) else None
    choices = [f"data={name}"] if name in DATA_SCHEMAS else []  # a plain name of conf/data/
    try:
        defaults, with_new = compose(choices), compose([*choices, *new_overrides])
    except Exception as error:
        raise ConfigError(f"resume={run_dir!r}: the command line's overrides {new_overrides} do "
                          f"not apply to the run's data={name} ({type(error).__name__}: "
                          f"{error}).") from error
    ours = resolved(with_new)
    changed = requested_changes(saved, defaults, with_new, ours, new_overrides)
    settings = {"trust": ours["trust"], "trainer.cache_dir": ours["trainer"]["cache_dir"],
                "resume": run_dir}
    if "cache_dir" in ours["data"]:
        settings["data.cache_dir"] = ours["data"]["cache_dir"]
    if "data.num_workers" in changed:
        settings["data.num_workers"] = ours["data"]["num_workers"]
    config = config_from_file(saved, source, ours["trust"], settings=settings)
    check_file_overrides(record["overrides"], source, CONFIG_GROUPS, saved)
    refused = [key for key in changed if key not in MAY_CHANGE]
    if refused:
        values = dotted_scalars(saved)
        shown = ", ".join(f"{key} (saved {values.get(key)!r})" for key in refused[:8])
        raise ConfigError(f"resume={run_dir!r} continues the run with its saved config; these "
                          f"overrides change it: {shown}. Only trainer.max_epochs may be "
                          "raised (and data.num_workers set). Drop the other overrides, or "
                          "start a new run.")
    if config.mode != "train":
        raise ConfigError(f"{source}: its checkpoint saved mode={config.mode!r}, not a "
                          "training run; refusing it.")
    saved_epochs = config.trainer.max_epochs
    epochs = ours["trainer"]["max_epochs"] if "trainer.max_epochs" in changed else saved_epochs
    if epochs < saved_epochs:
        raise ConfigError(f"resume={run_dir!r}: trainer.max_epochs={epochs} is below the run's "
                          f"{saved_epochs}; it may only be raised.")
    config.trainer.max_epochs = epochs
    return config
