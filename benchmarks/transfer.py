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

    python benchmarks/transfer.py --shifts --seeds 0 1 [--strategies "linear probe" freeze=auto ...]

instead asks which part of the pretrained resnet18 to train, on three kinds of shift
(after Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR
2023): the source's own glyph classes with corrupted pixels (input level), the digits
(feature level), and the glyphs under new labels, 50 classes merged into 10 (output level);
each with every strategy of STRATEGIES, one table of best val acc (shift x strategy).
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
SHIFT_VERSION = "shifts-v1"  # the same, for its input_shift and output_shift
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


# Which part trains, on the pretrained resnet18 (stem, 4 stages, head): the first, a middle
# and the last of three pieces, as the paper's three blocks of a ResNet.
ONLY = 'freeze=[@backbone,{}]'
STRATEGIES = {
    "linear probe": ["experiment=linear_probe"],
    "first (stem, stage1)": [ONLY.format('"!@stem","!@stage1"')],
    "middle (stage2, stage3)": [ONLY.format('"!@stage2","!@stage3"')],
    "last (stage4)": [ONLY.format('"!@stage4"')],
    "full fine-tuning": ["experiment=full_finetune"],
    "every stage at one rate (freeze=[])": ["freeze=[]"],
    "gradual_unfreeze": ["experiment=gradual_unfreeze"],
    "freeze=auto": ["freeze=auto"],
    "freeze=auto:select": ["freeze=auto:select"],
    "freeze=auto:select, auto.keep=0.7": ["freeze=auto:select", "auto.keep=0.7"],
}
FIXED = ["linear probe", "first (stem, stage1)", "middle (stage2, stage3)", "last (stage4)",
         "full fine-tuning", "every stage at one rate (freeze=[])",
         "gradual_unfreeze"]  # what freeze=auto is measured against
SHIFTS = {"input (corrupted glyphs)": "input", "feature (digits)": "target",
          "output (glyphs, merged labels)": "output"}


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


def shift_folders() -> dict[str, Path]:
    """Each shift's image folder (the feature-level one is the digits target), drawn once."""
    import transfer_data

    folder = CACHE / DATA_VERSION / SHIFT_VERSION
    _, target = image_folders()
    folders = {"target": target, "input": folder / "input", "output": folder / "output"}
    if not (folder / "complete").is_file():
        started = time.perf_counter()
        for name, draw in (("input", transfer_data.input_shift),
                           ("output", transfer_data.output_shift)):
            train_images, train_labels, val_images, val_labels, names = draw()
            transfer_data.write_split(str(folders[name]), "train", train_images, train_labels, names)
            transfer_data.write_split(str(folders[name]), "val", val_images, val_labels, names)
        (folder / "complete").write_text("ok\n")
        print(f"data: the glyph shifts drawn in {time.perf_counter() - started:.0f} s; {folder}")
    return folders


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


def run_shifts(args: argparse.Namespace) -> None:
    """--shifts: every strategy on every shift from the glyph-pretrained resnet18."""
    folders = shift_folders()
    source, _ = image_folders()
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        weights = pretrained_backbone("resnet18", source, scratch)
        for shift in args.shift_names:
            data = [*IMAGES, "data.image_size=28", f"data.root={folders[SHIFTS[shift]]}",
                    f"backbone.checkpoint={weights}", f"trainer.max_epochs={args.epochs}"]
            for strategy in args.strategies:
                for seed in args.seeds:
                    run_dir = scratch / f"{len(results)}-{seed}"
                    summary, seconds = train([*data, f"seed={seed}", *STRATEGIES[strategy]], run_dir)
                    results.setdefault((shift, strategy), []).append(summary["best_val_acc"])
                    print(f"  {shift} | {strategy} | seed {seed}: {summary['best_val_acc']:.3f} "
                          f"({seconds:.0f} s){chosen(run_dir)}", flush=True)
    print(f"\nbest val acc, resnet18 pretrained on 50 glyph classes, 28x28, {args.epochs} epochs, "
          f"seeds {args.seeds}, mean +- sd ({time.strftime('%Y-%m-%d')})\n")
    print_shift_table(results, args.shift_names, args.strategies)


def chosen(run_dir: Path) -> str:
    """What freeze=auto:select froze, or freeze=auto's first scales, from the run's log."""
    for line in (run_dir / "train.log").read_text().splitlines():
        if "freeze=auto:select: relative" in line or "auto: epoch 1 learning-rate" in line:
            return "; " + line.split(" - ", 1)[-1]
    return ""


def print_shift_table(results: dict[tuple[str, str], list[float]], shifts: list[str],
                      strategies: list[str]) -> None:
    """Shift x strategy; then, for freeze=auto, the gap to the best fixed choice and to full
    fine-tuning, and the mean over the shifts."""
    print("| strategy | " + " | ".join(shifts) + " | mean |")
    print("| --- |" + " --- |" * (len(shifts) + 1))
    for strategy in strategies:
        means = [statistics.mean(results[shift, strategy]) for shift in shifts]
        cells = [spread(results[shift, strategy], 3) for shift in shifts]
        print(f"| {strategy} | " + " | ".join(cells) + f" | {statistics.mean(means):.3f} |")
    fixed = [name for name in FIXED if name in strategies]
    for auto in [name for name in strategies if name.startswith("freeze=auto")]:
        if not fixed:
            break
        gaps = [statistics.mean(results[shift, auto]) - max(statistics.mean(results[shift, name])
                                                            for name in fixed) for shift in shifts]
        print(f"| {auto} - best fixed | " + " | ".join(f"{gap:+.3f}" for gap in gaps)
              + f" | {statistics.mean(gaps):+.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="on the target task")
    parser.add_argument("--shifts", action="store_true",
                        help="the strategy x shift table instead of the recipes")
    parser.add_argument("--shift-names", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=list(STRATEGIES))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--starts", nargs="+", default=["pretrained", "random init"],
                        choices=["pretrained", "random init"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="a run per seed; the table shows their mean and spread")
    args = parser.parse_args()
    if args.shifts:
        run_shifts(args)
        return
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
