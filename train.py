"""Hydra entry point: `python train.py key=value ...` (or `-m` for sweeps)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.config import register_schemas
from finetune.errors import ConfigError

register_schemas()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from finetune.run import run  # torch loads here, not for --help

    try:
        return run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
