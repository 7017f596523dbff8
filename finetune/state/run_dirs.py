"""The run directory: never one that holds results, and one that can be written (a fresh
one per run comes from the config's `finetune_new_dir` resolver, config/store.py)."""

import os

from finetune.errors import ConfigError

RESULT_FILES = ("metrics.csv", "summary.json", "checkpoints")  # a run's results: never overwritten
# what a run writes at its top (a failed attempt's are moved aside)
RUN_FILES = (*RESULT_FILES, "params.tsv", "rgn.csv", "rgn.png")


def check_fresh_run_dir(run_dir: str) -> None:
    """Never train over another run's results."""
    found = [name for name in RESULT_FILES if os.path.exists(os.path.join(run_dir, name))]
    if found:
        raise ConfigError(f"hydra.run.dir={run_dir!r} already holds a run ({', '.join(found)}); "
                          "refusing to overwrite it. Choose another hydra.run.dir.")


def check_writable(run_dir: str, key: str = "hydra.run.dir") -> None:
    """The run directory can be created and written, before Hydra tries and fails."""
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ConfigError(f"{key}={run_dir!r} cannot be written: {problem}. Choose another {key}.")
