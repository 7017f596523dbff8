"""Measure each experiment preset on the bundled digits data: accuracy and wall time.

    python benchmarks/presets.py [--presets default linear_probe ...] [key=value ...]

Each preset runs as `python train.py experiment=<preset>` in a subprocess (offline:
backbone.allow_download=false), one after the other, and a Markdown table is printed
with the best validation accuracy, its epoch, the number of trainable parameters at the
start and the wall time of the whole command. Extra key=value overrides go to every run.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["default", "linear_probe", "full_finetune", "gradual_unfreeze", "seed"]


def run_preset(preset: str, overrides: list[str], out: Path) -> dict:
    command = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out / preset}",
               "backbone.allow_download=false", *overrides]
    if preset != "default":
        command.append(f"experiment={preset}")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{preset} failed:\n{result.stderr}")
    summary = json.loads((out / preset / "summary.json").read_text())
    return {"preset": preset, "seconds": seconds, **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [run_preset(preset, args.overrides, Path(folder)) for preset in args.presets]
    print("| preset | best val acc | best epoch | epochs | trainable params (end) | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| `{row['preset']}` | {row['best_val_acc']:.3f} | {row['best_epoch']} | "
              f"{row['epochs_completed']} | {row['trainable_params']:,d} | {row['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
