"""Command line: `python train.py ...` and the `finetune` console script run this.

torch is imported only once a run starts, so `--help` stays quick.
"""

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.config import register_schemas
from finetune.errors import ConfigError
from finetune.outputs import check_fresh_run_dir

register_schemas()

# conf/ sits next to the package in the checkout (an editable install points here too).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def exit_with(error: ConfigError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


class RefuseUsedRunDir(Callback):
    """Runs before Hydra writes .hydra/ into the run directory, so a refused run changes nothing."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_fresh_run_dir(config.hydra.run.dir)
        except ConfigError as error:
            exit_with(error)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from finetune.run import run

    try:
        return run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:
        exit_with(error)
