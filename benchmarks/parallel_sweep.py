"""Parallel sweep jobs on one machine: the same 2-job sweep run one job after another, with
`hydra/launcher=joblib` (both jobs at once) as the tool runs it (the cores split between
the jobs), and with every job using every core (OMP_NUM_THREADS = the cores: how joblib
jobs ran before the split).

    python benchmarks/parallel_sweep.py [--epochs 3]

Each sweep is the default run (resnet18, digits at 32x32, random init) at two learning
rates. Printed: the sweep's wall time (Python start-up and imports included) and the mean
epoch time of the jobs (epochs 2 on), beside the bare PyTorch loop's epoch in this
invocation (benchmarks/speed.py's, alone on the machine). Measure with nothing else
running: two torch processes on 2 cores slow each other down, which is the point here.
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import speed  # noqa: E402  (the bare loop, beside this script)

from finetune.threads import machine_cores  # noqa: E402


def sweep(folder: Path, epochs: int, launcher: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds of the sweep and the jobs' mean epoch seconds (epochs 2 on)."""
    command = [sys.executable, str(ROOT / "train.py"), "-m", "optimizer.lr=0.05,0.02",
               f"trainer.max_epochs={epochs}", "plots=false", "backbone.weights=null",
               "backbone.allow_download=false", f"hydra.sweep.dir={folder}", *launcher]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, **env})
    seconds = time.perf_counter() - started
    epochs_seconds = [float(row["seconds"]) for job in ("0", "1")
                      for row in csv.DictReader(open(folder / job / "metrics.csv"))
                      if int(row["epoch"]) >= 2]
    return seconds, statistics.mean(epochs_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    cores = machine_cores()
    bare = statistics.median(speed.bare_loop(3, False, speed.digits_tensors(32))[1:])
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    os.environ.clear()
    os.environ.update(environment)
    variants = [("one job after another", [], {}),
                ("joblib, cores split between the jobs", ["hydra/launcher=joblib"], {}),
                ("joblib, every job on every core (before)", ["hydra/launcher=joblib"],
                 {"OMP_NUM_THREADS": str(cores)})]
    print(f"{cores} cores; the bare PyTorch loop's epoch (resnet18, digits 32x32, batch 64): "
          f"{bare:.2f} s\n")
    print("| 2-job sweep | wall time | epoch time per job |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, launcher, env) in enumerate(variants):
            seconds, epoch = sweep(Path(scratch) / str(index), args.epochs, launcher, env)
            print(f"| {name} | {seconds:.1f} s | {epoch:.2f} s ({epoch / bare:.2f}x the bare loop's) |")


if __name__ == "__main__":
    main()
