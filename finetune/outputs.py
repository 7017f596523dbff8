"""The run directory: refuse to reuse one that holds results, write files atomically."""

import json
import os

from finetune.errors import ConfigError

PREVIOUS_RUN_FILES = ("metrics.csv", "summary.json", "checkpoints")


def check_fresh_run_dir(run_dir: str) -> None:
    """Never train over another run's results."""
    found = [name for name in PREVIOUS_RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    if found:
        raise ConfigError(f"hydra.run.dir={run_dir!r} already holds a run ({', '.join(found)}); "
                          "refusing to overwrite it. Choose another hydra.run.dir.")


def write_json(data: dict, path: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)
