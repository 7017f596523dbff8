"""A transfer benchmark, offline: pretrain on procedural glyphs, fine-tune on digits.

    python benchmarks/transfer.py [--epochs 15] [--recipes linear_probe full_finetune ...]

No ImageNet weights can be downloaded here, so every figure that compares strategies needs
a backbone that has learned something else first. This script makes one, then runs each
strategy and recipe on a target task with other labels, from those weights and from random
init, as a user runs them (`python train.py ...`, one process each):

1. Data (benchmarks/transfer_data.py, cached as image folders): the source task is 50
   classes of procedurally drawn glyphs, the target task scikit-learn's handwritten digits
   (500 training images, 797 validation images by other writers). Both are 32x32 cluttered
   scenes made the same way; random convolutional features do poorly on them.
2. Source task (cached): resnet18 from random init, every layer trained by this tool on the
   glyphs, its backbone saved as a plain torchvision state dict (no classifier); and alexnet
   with its 1000-way classifier, for the seed preset. Delete ~/.cache/finetune/transfer/ to
   make them again.
3. Target task: each recipe twice, `backbone.checkpoint=FILE` (as one loads ImageNet
   weights) and random init, at 28x28 (the 32x32 scenes resized to 32 and center-cropped,
   as `data=imagefolder` prepares any image without pretrained weights). The seed preset
   runs on its own data instead: the bundled digits 0 and 1 at 64x64.
4. One Markdown table: recipe x start -> best val acc, best epoch, epochs run, wall time.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = Path.home() / ".cache" / "finetune" / "transfer"
DATA_VERSION = "glyphs50-digits-v1"  # change when transfer_data.py changes what it draws
IMAGES = ["data=imagefolder", "data.num_workers=0", "data.batch_size=32"]
COMMON = ["backbone.weights=null", "backbone.allow_download=false", "plots=false"]
RECIPES = {  # name -> overrides on the target task
    "linear_probe": ["experiment=linear_probe"],
    "linear_probe, frozen_modules=train": ["experiment=linear_probe", "frozen_modules=train"],
    "default (stem and stage1 frozen)": [],
    "full_finetune": ["experiment=full_finetune"],
    "gradual_unfreeze": ["experiment=gradual_unfreeze"],
    "full_finetune + augment=light": ["experiment=full_finetune", "data.augment=light"],
    "full_finetune + augment=trivialaugment": ["experiment=full_finetune",
                                              "data.augment=trivialaugment"],
    "full_finetune + mixup 0.2": ["experiment=full_finetune", "data.mixup_alpha=0.2"],
    "full_finetune + cutmix 1.0": ["experiment=full_finetune", "data.cutmix_alpha=1.0"],
    "full_finetune + label smoothing 0.1": ["experiment=full_finetune", "loss.label_smoothing=0.1"],
    "full_finetune + EMA 0.99": ["experiment=full_finetune", "trainer.ema_decay=0.99"],
    "full_finetune + early stopping (patience 3)": ["experiment=full_finetune",
                                                    "trainer.early_stopping.patience=3"],
}
# The seed preset as a user runs it: alexnet with its classifier, all frozen, the bundled digits
# 0 and 1 at 64x64 (its own data and backbone, not the target task above).
SEED_PRESET = "experiment=seed (alexnet, bundled digits 0 vs 1)"
RECIPES[SEED_PRESET] = ["experiment=seed"]


def train(overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    """`python train.py OVERRIDES` into run_dir: its summary.json and wall seconds."""
    command = [sys.executable, str(ROOT / "train.py"), *COMMON, *overrides,
               f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text()), seconds


def image_folders() -> tuple[Path, Path]:
    """The source and target image folders, drawn once and cached."""
    import transfer_data

    folder = CACHE / DATA_VERSION
    source, target, done = folder / "source", folder / "target", folder / "complete"
    if done.is_file():
        return source, target
    started = time.perf_counter()
    images, labels, names = transfer_data.source_images()
    held_out = set(range(0, len(images), 10))  # every 10th glyph: the source's own val split
    for split, keep in (("train", lambda i: i not in held_out), ("val", held_out.__contains__)):
        chosen = [i for i in range(len(images)) if keep(i)]
        transfer_data.write_split(str(source), split, [images[i] for i in chosen],
                                  [labels[i] for i in chosen], names)
    train_images, train_labels, val_images, val_labels, names = transfer_data.target_images()
    transfer_data.write_split(str(target), "train", train_images, train_labels, names)
    transfer_data.write_split(str(target), "val", val_images, val_labels, names)
    done.write_text("ok\n")
    print(f"data: {len(images)} glyphs (50 classes) and {len(train_images)} + "
          f"{len(val_images)} digits drawn in {time.perf_counter() - started:.0f} s; {folder}")
    return source, target


# Pretraining on the glyphs, per backbone: the overrides and the epochs (about 3 minutes each).
# alexnet keeps its 1000-way classifier, as the seed preset does, and trains slowly from scratch
# (no BatchNorm): AdamW at a small learning rate moves it within the budget, where SGD did not.
PRETRAINING = {
    "resnet18": (["data.image_size=28"], 8),
    "alexnet": (["backbone=alexnet", "backbone.keep_classifier=true", "head=linear",
                 "data.image_size=64", "optimizer=adamw", "optimizer.lr=2e-4",
                 "optimizer.weight_decay=0"], 5),
}


def pretrained_backbone(arch: str, source: Path, scratch: Path) -> Path:
    """The source task's backbone as a torchvision state dict, trained once and cached."""
    overrides, epochs = PRETRAINING[arch]
    path = CACHE / DATA_VERSION / f"{arch}_glyphs_{epochs}epochs.pt"
    if path.is_file():
        print(f"source task: reusing {path}")
        return path
    import torch

    import finetune

    summary, seconds = train([*IMAGES, f"data.root={source}", "data.batch_size=64", "freeze=[]",
                              *overrides, f"trainer.max_epochs={epochs}"], scratch / arch)
    model = finetune.load_model(str(scratch / arch / "checkpoints" / "best.pt"))
    torch.save(model.net.pretrained.state_dict(), path)  # torchvision keys, the head left out
    print(f"source task: {arch} on 50 glyph classes, best val acc {summary['best_val_acc']:.3f} "
          f"after {epochs} epochs in {seconds:.0f} s; saved {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="on the target task")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--starts", nargs="+", default=["pretrained", "random init"],
                        choices=["pretrained", "random init"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="a run per seed; the table shows their mean and spread")
    args = parser.parse_args()
    source, target = image_folders()
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        rows, runs = [], 0
        for recipe in args.recipes:
            arch, data = "resnet18", [*IMAGES, "data.image_size=28", f"data.root={target}"]
            if recipe == SEED_PRESET:
                arch, data = "alexnet", []
            weights = pretrained_backbone(arch, source, scratch)
            starts = {"pretrained": [f"backbone.checkpoint={weights}"], "random init": []}
            for start in args.starts:
                results = []
                for seed in args.seeds:
                    results.append(train([*data, f"seed={seed}", f"trainer.max_epochs={args.epochs}",
                                          *RECIPES[recipe], *starts[start]], scratch / f"{runs}"))
                    runs += 1
                rows.append((recipe, start, results))
                scores = " ".join(f"{summary['best_val_acc']:.3f}" for summary, _ in results)
                print(f"  {recipe} ({start}): {scores}", flush=True)
    print(f"\ntarget: cluttered digits, 10 classes, 500 training images, {args.epochs} epochs, "
          f"resnet18 at 28x28, seeds {args.seeds} ({time.strftime('%Y-%m-%d')})\n")
    print("| recipe | start | best val acc | best epoch | epochs run | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for recipe, start, results in rows:
        print(f"| {recipe} | {start} | {spread([s['best_val_acc'] for s, _ in results], 3)} "
              f"| {spread([s['best_epoch'] for s, _ in results], 0)} "
              f"| {spread([s['epochs_completed'] for s, _ in results], 0)} "
              f"| {spread([seconds for _, seconds in results], 1)} s |")


def spread(values: list[float], digits: int) -> str:
    """One value as it is; several as mean +- standard deviation."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


if __name__ == "__main__":
    main()
