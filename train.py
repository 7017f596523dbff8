"""Hydra entry point: `python train.py key=value ...` (or `-m` for sweeps); see README.md and docs/."""

from finetune.cli import main

if __name__ == "__main__":
    main()
