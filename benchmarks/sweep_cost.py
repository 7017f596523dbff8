"""What pruning and several workers save in a search, on the transfer task.

    python benchmarks/sweep_cost.py [--trials 24] [--epochs 12] [--pruners none median hyperband]
                                    [--worker-trials 8]

The target task of benchmarks/transfer.py (cluttered digits, 500 training images) from its
glyph-pretrained resnet18 (both made and cached by that script's code). Each search is
`python train.py -m hparams_search=optuna` with the same search space (learning rate,
weight decay, freeze depth, head width) and sampler seed, `--trials` trials of up to
`--epochs` epochs, once per pruner: total epochs trained, wall time, best value found.
Then a search without pruning of `--worker-trials` trials that all cost the same (full
fine-tuning, one head width; only the learning rate and weight decay vary) with one local
worker and with two: trials per hour. Run it alone: two torch processes on 2 cores slow each
other down.
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SPACE = ('hparams_search.params={optimizer.lr: "tag(log, interval(1e-4, 1e-1))", '
         'optimizer.weight_decay: "tag(log, interval(1e-6, 1e-2))", '
         'head.layers.0.out_features: "choice(64, 128, 256)", '
         'freeze: "choice(\'[@backbone]\', \'[@stem,@stage1,@stage2]\', \'[@stem,@stage1]\', \'[]\')"}')

# the workers item: trials that differ only in learning rate and weight decay, so that one
# worker and two run the same amount of work whatever the samplers propose
SAME_COST = 'hparams_search.params={head.layers.0.out_features: "choice(128)", freeze: "choice(\'[]\')"}'


def search(overrides: list[str], sweep: Path) -> dict:
    """One search, its own process: wall seconds, epochs trained, best value, trial states."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna",
                             *overrides, f"hydra.sweep.dir={sweep}"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the search failed:\n{result.stderr[-3000:]}")
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    values = [float(row["value"]) for row in rows if row["state"] == "complete"]
    return {"seconds": seconds, "epochs": sum(int(row["epochs"] or 0) for row in rows),
            "best": max(values) if values else float("nan"), "trials": len(rows),
            "pruned": sum(row["state"] == "pruned" for row in rows),
            "importances": json.loads((sweep / "search.json").read_text())["importances"]}


def main() -> None:
    from transfer import COMMON, IMAGES, image_folders, pretrained_backbone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--pruners", nargs="*", default=["none", "median", "hyperband"])
    parser.add_argument("--worker-trials", type=int, default=8, help="0: skip the workers item")
    args = parser.parse_args()
    source, target = image_folders()
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        weights = pretrained_backbone("resnet18", source, scratch)
        task = [*COMMON, *IMAGES, "data.image_size=28", f"data.root={target}",
                f"backbone.checkpoint={weights}", f"trainer.max_epochs={args.epochs}",
                f"trainer.cache_dir={scratch}/cache", "seed=0", SPACE]
        print(f"target: cluttered digits from the glyph-pretrained resnet18, {args.trials} trials "
              f"of up to {args.epochs} epochs, TPE seed 0 ({time.strftime('%Y-%m-%d')})\n")
        if args.pruners:
            print("| pruner | epochs trained | ratio to none | wall time | best val acc | pruned |")
            print("| --- | --- | --- | --- | --- | --- |")
        results = {}
        for pruner in args.pruners:
            results[pruner] = found = search([*task, f"hparams_search.n_trials={args.trials}",
                                              f"hparams_search.pruner={pruner}"], scratch / pruner)
            ratio = found["epochs"] / results["none"]["epochs"] if "none" in results else float("nan")
            print(f"| {pruner} | {found['epochs']} | {ratio:.2f} | {found['seconds']:.0f} s "
                  f"| {found['best']:.4f} | {found['pruned']} of {found['trials']} |", flush=True)
        for pruner, found in results.items():
            print(f"{pruner}: importances {found['importances']}")
        if not args.worker_trials:
            return
        print("\n| local workers | trials | epochs | wall time | trials per hour |")
        print("| --- | --- | --- | --- | --- |")
        for jobs in (1, 2):  # every trial the same work: full fine-tuning, one head width
            found = search([*task, SAME_COST, f"hparams_search.n_trials={args.worker_trials}",
                            f"hparams_search.n_jobs={jobs}"], scratch / f"workers-{jobs}")
            print(f"| {jobs} | {found['trials']} | {found['epochs']} | {found['seconds']:.0f} s "
                  f"| {3600 * found['trials'] / found['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
