"""What a run's data start-up costs on large data, each side in a fresh process, alone.

    python benchmarks/startup.py --stream-rows 2000000 --images 20000

1. data.streaming=true on a large split: the memory and time to read the label column
   and check every label, against a bare pyarrow read of the same column into one numpy
   array (the least any reader can do). The Parquet files: 4 for training, rows of an 8x8
   PNG and a ClassLabel of 1,000 classes, row groups of 100,000 rows. Resident memory kept
   after start-up and its peak are measured above the process's memory after the imports
   both sides need.
2. data=imagefolder on many JPEGs (200x160, 10 classes, data.val_fraction=0.1,
   data.cache_images=false): building the data sets, the start-up check of every image
   included, the first time and again (the check's verdict kept under trainer.cache_dir),
   against a bare torchvision ImageFolder scan of the same folder (which checks nothing).
   Both sides import what they use before the clock starts. Then with the image cache on
   and data.augment=light (the training entry's size, when estimated, reads every image's
   header): the run that builds the entries, and the one after it.

docs/own-images.md quotes both.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES, CLASSES, GROUP_ROWS = 4, 1000, 100_000
FOLDER_CLASSES = 10


def write_parquet(folder: Path, rows: int) -> None:
    import io

    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    stream = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(stream, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=[f"class_{number}" for number in range(CLASSES)])})
    draw = np.random.default_rng(0)
    (folder / "data").mkdir(parents=True)
    for split, total in (("train", rows), ("validation", 1000)):
        for part in range(FILES):
            count = total // FILES
            images = pa.array([{"bytes": stream.getvalue(), "path": None}] * count,
                              type=features.arrow_schema.field("image").type)
            labels = pa.array(draw.integers(0, CLASSES, count), pa.int64())
            table = pa.table({"image": images, "label": labels}, schema=features.arrow_schema)
            pq.write_table(table, str(folder / "data" / f"{split}-{part:05d}-of-{FILES:05d}.parquet"),
                           row_group_size=GROUP_ROWS)


def write_jpegs(folder: Path, images: int) -> None:
    import numpy as np
    from PIL import Image

    draw = np.random.default_rng(0)
    for number in range(images):
        place = folder / f"class_{number % FOLDER_CLASSES}"
        place.mkdir(parents=True, exist_ok=True)
        pixels = draw.integers(0, 255, (160, 200, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(place / f"{number}.jpg", quality=85)


def resident_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20


def data_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from finetune.config.store import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def input_spec():
    from torchvision.transforms.v2 import InterpolationMode

    from finetune.model.net import InputSpec

    return InputSpec(32, 36, [0.5] * 3, [0.5] * 3, InterpolationMode.BILINEAR)


def measure_stream(side: str, folder: str) -> dict:
    import datasets  # noqa: F401  (both sides need it: the baseline is taken after)
    import pyarrow.compute  # noqa: F401
    import pyarrow.parquet as pq

    from finetune.data.hf_data import hf_images

    cfg = data_config(["data=hf", f"data.path={folder}", "data.streaming=true",
                       "data.num_workers=0"]).data
    before, start = resident_mb(), time.perf_counter()
    if side == "bare":
        files = sorted(Path(folder, "data").glob("train-*"))
        kept = [pq.read_table(file, columns=["label"]).column("label").to_numpy() for file in files]
        rows = sum(len(part) for part in kept)
    else:
        kept = hf_images(cfg, input_spec())
        rows = len(kept[0].split)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "seconds": seconds, "kept_mb": resident_mb() - before,
            "peak_mb": peak - before}


def measure_folder(side: str, folder: str) -> dict:
    from torchvision import datasets

    from finetune.data.loaders import build_data

    def config(images: str):
        cached = ["data.cache_images=auto", "data.augment=light"] if side == "cached" else []
        return data_config(["data=imagefolder", f"data.root={folder}/{images}", "data.val_fraction=0.1",
                            "data.cache_images=false", "data.num_workers=0",
                            f"trainer.cache_dir={folder}/cache", *cached])

    warm = config("warm-up")  # the modules build_data imports as it goes, imported first
    build_data(warm.data, input_spec(), 0, cache_dir=None)
    cfg = config("images")
    start = time.perf_counter()
    if side == "bare":
        images = len(datasets.ImageFolder(f"{folder}/images"))
    else:
        data = build_data(cfg.data, input_spec(), 0, cache_dir=cfg.trainer.cache_dir)
        images = len(data.train_loader.dataset) + len(data.val_loader.dataset)
    return {"images": images, "seconds": time.perf_counter() - start}


def fresh(item: str, side: str, folder: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", item, side, folder],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring {item} {side} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def stream_item(rows: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        write_parquet(Path(folder), rows)
        found = {side: fresh("stream", side, folder) for side in ("bare", "finetune")}
    for side, result in found.items():
        print(f"1. stream {side:9} {result['rows']:,} rows: {result['seconds']:.2f} s, "
              f"{result['kept_mb']:.0f} MB kept, peak {result['peak_mb']:.0f} MB above the start")
    bare, ours = found["bare"], found["finetune"]
    print(f"1. stream finetune - bare: {ours['kept_mb'] - bare['kept_mb']:+.0f} MB kept, "
          f"{ours['peak_mb'] - bare['peak_mb']:+.0f} MB peak")  # bare's seconds: too few for a ratio


def folder_item(images: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(Path(folder, "images"), images)
        write_jpegs(Path(folder, "warm-up"), 20 * FOLDER_CLASSES)
        fresh("folder", "bare", folder)  # the files' pages cached alike for every side
        bare = fresh("folder", "bare", folder)
        first, again = (fresh("folder", "finetune", folder) for _ in range(2))
        building, cached = (fresh("folder", "cached", folder) for _ in range(2))
    print(f"2. folder bare ImageFolder scan of {bare['images']:,} images: {bare['seconds']:.2f} s")
    for name, result in (("first start", first), ("again (verdict kept)", again),
                         ("image cache on, augment=light, building its entries", building),
                         ("image cache on, augment=light, the next run", cached)):
        print(f"2. folder finetune {name}: {result['seconds']:.2f} s, "
              f"{result['seconds'] / bare['seconds']:.1f}x the bare scan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream-rows", type=int, default=2_000_000, help="0: skip item 1")
    parser.add_argument("--images", type=int, default=20_000, help="0: skip item 2")
    parser.add_argument("--measure", nargs=3, metavar=("ITEM", "SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        item, side, folder = args.measure
        sys.path.insert(0, str(ROOT))
        measure = measure_stream if item == "stream" else measure_folder
        print(json.dumps(measure(side, folder)))
        return
    if args.stream_rows:
        stream_item(args.stream_rows)
    if args.images:
        folder_item(args.images)


if __name__ == "__main__":
    main()
