"""Does a change of code alone (a refactor) leave results alone? Trains the same setups with
an earlier commit and with the working tree, through `python train.py`, one after the
other, and compares what they wrote: every tensor of every checkpoint (weights,
optimizer state, random states) bit-identical, and metrics.csv equal apart from its `seconds` column.

    python benchmarks/same_results.py --against 61bfb10     # prints a table; exit 1 if any differ
    python benchmarks/same_results.py --against 61bfb10 --startup 5   # also `--help` and a dry
                                                # run's wall time with each side, alternating

The earlier commit is checked out into a temporary git worktree. Each side runs from its
own checkout (`python train.py` imports the finetune/ beside it), with the same seed,
threads and data; the multi-label setup reads a small CSV data set drawn here first.
"""

import argparse
import csv
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {  # name -> overrides (the run directory, and data.file for csv, are added)
    "default": [],
    "gradual_unfreeze": ["experiment=gradual_unfreeze"],
    "linear_probe_feature_cache": ["experiment=linear_probe", "trainer.cache_features=true"],
    "csv_multi_label": ["data=csv", "data.label_column=labels", "data.label_delimiter=' '",
                        "data.image_size=32", "trainer.max_epochs=3"],
    "lora_timm_vit": ["backbone.name=timm/test_vit", "+backbone.kwargs.img_size=32",
                      "adapter=lora", "trainer.max_epochs=3"],
}


def shapes_csv(folder: Path) -> Path:
    """72 PNGs of noise with a coloured square per label (each label on about half the
    images) and labels.csv listing them, space-separated, with a train/val split column."""
    from PIL import Image

    colours = {"red": ((220, 30, 30), (0, 0)), "green": ((30, 200, 30), (16, 0)),
               "blue": ((40, 60, 230), (8, 16))}
    rng, rows = random.Random(0), []
    (folder / "images").mkdir(parents=True)
    for number in range(72):
        labels = [name for name in colours if rng.random() < 0.5]
        image = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(60) for _ in range(32 * 32 * 3)))
        for name in labels:
            colour, (left, top) = colours[name]
            image.paste(colour, (left, top, left + 14, top + 14))
        path = f"images/{number:03d}.png"
        image.save(folder / path)
        rows.append({"image": path, "labels": " ".join(labels),
                     "split": "val" if number % 3 == 0 else "train"})
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def train(checkout: Path, overrides: list[str], run_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(checkout)}  # this checkout's finetune, not the installed one
    result = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=checkout, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{checkout}: python train.py {' '.join(overrides)} failed:\n{result.stderr}")


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return [{key: value for key, value in row.items() if key != "seconds"}
                for row in csv.DictReader(handle)]


def tensors(value, prefix: str = "") -> dict:
    """Every tensor in a loaded checkpoint, by its path of keys (weights, optimizer moments,
    random states, frozen.pt's tensors); the rest (config, ids) is not compared."""
    import torch

    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list | tuple) else ())
    return {path: tensor for key, item in items for path, tensor in tensors(item, f"{prefix}/{key}").items()}


def weights_differences(old: Path, new: Path) -> tuple[int, list[str]]:
    """How many tensors were compared, and what differs, over every checkpoint file."""
    import torch

    names = sorted(path.name for path in (old / "checkpoints").glob("*.pt"))
    if names != sorted(path.name for path in (new / "checkpoints").glob("*.pt")):
        return 0, [f"different checkpoint files: {names}"]
    compared, differences = 0, []
    for name in names:
        before, after = (tensors(torch.load(side / "checkpoints" / name, weights_only=True))
                         for side in (old, new))
        if before.keys() != after.keys():
            differences.append(f"{name}: different tensors ({sorted(before.keys() ^ after.keys())[:3]})")
            continue
        compared += len(before)
        differences += [f"{name}{key}" for key in before if not torch.equal(before[key], after[key])]
    return compared, differences


def startup_seconds(checkouts: dict[str, Path], work: Path, repeats: int) -> None:
    """Median wall time of `train.py --help` and of a dry run with each checkout, the two
    sides taking turns so that a machine warming or cooling favours neither."""
    commands = {"--help": ["--help"], "dry_run=true": ["dry_run=true", "backbone.allow_download=false"]}
    for label, arguments in commands.items():
        seconds = {side: [] for side in checkouts}
        for repeat in range(repeats):
            for side, checkout in checkouts.items():
                env = {**os.environ, "PYTHONPATH": str(checkout)}
                started = time.perf_counter()
                subprocess.run([sys.executable, "train.py", *arguments,
                                f"hydra.run.dir={work}/startup/{side}-{repeat}"],
                               cwd=checkout, env=env, capture_output=True, check=True)
                seconds[side].append(time.perf_counter() - started)
        print(f"`python train.py {label}`: " + ", ".join(
            f"{side} {statistics.median(times):.2f} s" for side, times in seconds.items())
            + f" (median of {repeats})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the earlier commit (a git revision)")
    parser.add_argument("--only", nargs="*", choices=list(SETUPS), help="some setups only")
    parser.add_argument("--startup", type=int, default=0, metavar="REPEATS",
                        help="also time --help and a dry run, REPEATS times each side")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="same-results-"))
    earlier = work / "earlier"
    subprocess.run(["git", "worktree", "add", "--detach", str(earlier), args.against],
                   cwd=ROOT, check=True, capture_output=True)
    labels = shapes_csv(work / "shapes")
    failed = False
    try:
        if args.startup:
            startup_seconds({"earlier": earlier, "now": ROOT}, work, args.startup)
        print(f"\n{args.against} against the working tree:\n")
        print("| setup | tensors compared | checkpoints | metrics.csv rows |")
        print("| --- | --- | --- | --- |")
        for name in args.only or SETUPS:
            overrides = [*SETUPS[name], *([f"data.file={labels}"] if "data=csv" in SETUPS[name] else [])]
            runs = {side: work / side / name for side in ("earlier", "now")}
            for side, checkout in (("earlier", earlier), ("now", ROOT)):
                # a cache each: the later side must compute its features, not read the other's
                train(checkout, [*overrides, f"trainer.cache_dir={work}/cache-{side}"], runs[side])
            compared, differences = weights_differences(runs["earlier"], runs["now"])
            rows = metrics_rows(runs["earlier"])
            same_metrics = rows == metrics_rows(runs["now"])
            failed |= bool(differences) or not same_metrics or not compared
            weights = "bit-identical" if compared and not differences else differences[:3]
            print(f"| {name} | {compared} | {weights} | {len(rows)} "
                  f"{'equal' if same_metrics else 'DIFFER'} |", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=ROOT)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
