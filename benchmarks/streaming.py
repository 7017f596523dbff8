"""How far data.streaming=true's metrics lie from map-style's on the same data (docs/own-images.md
states the tolerance from this): scikit-learn's digits as PNG bytes in Parquet files (1,400
training rows in 4 files, 397 validation rows in 2), resnet18 from random init at 32x32,
trained by `python train.py data=hf` both ways, seed by seed.

    python benchmarks/streaming.py --seeds 0 1 2 --epochs 6

Streaming reads other batches in another order (and leaves out under one batch of rows per
epoch), so the runs differ as two seeds do; validation itself reads the same images alike
(tests/test_streaming.py checks that exactly).
"""

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN_FILES, VAL_FILES, TRAIN_ROWS = 4, 2, 1400


def write_parquet(folder: Path) -> None:
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bundle = load_digits()
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})

    def png(pixels) -> bytes:
        import io

        stream = io.BytesIO()
        Image.fromarray((pixels * 15).astype(np.uint8)).resize((32, 32)).save(stream, format="PNG")
        return stream.getvalue()

    for split, rows, files in (("train", range(TRAIN_ROWS), TRAIN_FILES),
                               ("validation", range(TRAIN_ROWS, len(bundle.target)), VAL_FILES)):
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": png(bundle.images[i]), "path": None} for i in rows],
             "label": [int(bundle.target[i]) for i in rows]}, features=features)
        for number in range(files):
            table.shard(files, number, contiguous=True).to_parquet(
                str(folder / "data" / f"{split}-{number:05d}-of-{files:05d}.parquet"))


def trained(folder: Path, streaming: bool, seed: int, epochs: int) -> list[float]:
    """Validation accuracy per epoch of one run."""
    from hydra import compose, initialize_config_dir

    from finetune.config.store import register_schemas
    from finetune.run import run

    register_schemas()
    run_dir = folder / f"{'stream' if streaming else 'map'}-{seed}"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "backbone.name=resnet18", "backbone.weights=null", "freeze=[]", "trainer.device=cpu",
            "plots=false", "data=hf", f"data.path={folder}/parquet", f"data.cache_dir={folder}/hf",
            f"trainer.cache_dir={folder}/cache", "data.image_size=32", "data.batch_size=32",
            "data.num_workers=1", f"trainer.max_epochs={epochs}", f"seed={seed}",
            f"data.streaming={str(streaming).lower()}"])
    run(cfg, str(run_dir))
    return [float(row["val_acc"]) for row in csv.DictReader(open(run_dir / "metrics.csv"))]


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        write_parquet(folder / "parquet")
        results = {(mode, seed): trained(folder, mode == "streaming", seed, args.epochs)
                   for seed in args.seeds for mode in ("map-style", "streaming")}
    print(f"\n{len(args.seeds)} seeds, {args.epochs} epochs, {time.perf_counter() - started:.0f} s")
    print("| seed | map-style final / best val acc | streaming final / best | difference final / best |")
    print("| --- | --- | --- | --- |")
    for seed in args.seeds:
        mapped, streamed = results["map-style", seed], results["streaming", seed]
        print(f"| {seed} | {mapped[-1]:.3f} / {max(mapped):.3f} | {streamed[-1]:.3f} / "
              f"{max(streamed):.3f} | {streamed[-1] - mapped[-1]:+.3f} / "
              f"{max(streamed) - max(mapped):+.3f} |")
    for label, pick in (("final", lambda accs: accs[-1]), ("best", max)):
        mapped = [pick(results["map-style", seed]) for seed in args.seeds]
        streamed = [pick(results["streaming", seed]) for seed in args.seeds]
        print(f"| mean {label} | {spread(mapped)} | {spread(streamed)} | "
              f"{statistics.mean(streamed) - statistics.mean(mapped):+.3f} |")


if __name__ == "__main__":
    main()
