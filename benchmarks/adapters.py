"""LoRA adapters against full fine-tuning and the linear probe: trainable parameters, peak
memory and time per epoch.

    python benchmarks/adapters.py [--epochs 2] [key=value ...]

Each strategy runs `python train.py` in a subprocess of its own, one after the other, on
the bundled digits data with a randomly initialized vit_b_16 built for 32x32 images
(4 patches and the class token; no download). Peak memory is the subprocess's maximum
resident set size (on a GPU it would be torch.cuda.max_memory_allocated; this measures the
CPU). Time per epoch is the last epoch's (metrics.csv), the first one's warm-up left out.
The linear probe runs with the feature cache off, so its epochs do the same forward
passes as the others; the tool would cache its features.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = ["backbone=vit_b_16", "backbone.weights=null", "+backbone.kwargs.image_size=32"]
STRATEGIES = {
    "full fine-tuning": ["freeze=[]"],
    "LoRA (adapter=lora, r=8)": ["adapter=lora"],
    "linear probe": ["experiment=linear_probe", "trainer.cache_features=false"],
}


def measure(name: str, overrides: list[str], out: Path) -> dict:
    """Run one strategy; its summary, last epoch's seconds and peak RSS in MiB."""
    run_dir = out / name.split()[0]
    command = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", "plots=false",
               *BACKBONE, *overrides]
    with open(out / f"{run_dir.name}.err", "w+") as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not all children's
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"{name} failed:\n{errors.read()}")
    peak_kib = usage.ru_maxrss
    epochs = list(csv.DictReader(open(run_dir / "metrics.csv")))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"name": name, "trainable": summary["trainable_params"], "total": summary["total_params"],
            "epoch_seconds": float(epochs[-1]["seconds"]), "peak_mib": peak_kib / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [f"trainer.max_epochs={args.epochs}", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, strategy in STRATEGIES.items():
            rows.append(measure(name, [*strategy, *overrides], Path(folder)))
    print(f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; "
          f"{' '.join(BACKBONE)}, digits 32x32, {args.epochs} epochs")
    print("| strategy | trainable parameters | peak memory (RSS) | time per epoch |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['name']} | {row['trainable']:,d} of {row['total']:,d} "
              f"({100 * row['trainable'] / row['total']:.2f}%) | {row['peak_mib']:,.0f} MiB | "
              f"{row['epoch_seconds']:.1f} s |")


if __name__ == "__main__":
    main()
