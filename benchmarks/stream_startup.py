"""What data.streaming=true's start-up costs on a large split: the memory and the time to
read the label column and check every label, against a bare pyarrow read of the same
column into one numpy array (the least any reader can do). docs/own-images.md quotes it.

    python benchmarks/stream_startup.py --rows 2000000

The Parquet files (4 for training, rows of an 8x8 PNG and a ClassLabel of 1,000 classes,
row groups of 100,000 rows) are written to a temporary folder; each side is measured in a
fresh process, after the imports both need: resident memory kept after start-up, its peak
above that baseline, and the seconds.
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


def resident_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20


def measure(side: str, folder: str) -> dict:
    """One side's start-up in this (fresh) process."""
    sys.path.insert(0, str(ROOT))
    import datasets  # noqa: F401  (both sides need it: the baseline is taken after)
    import pyarrow.compute  # noqa: F401
    import pyarrow.parquet as pq
    from hydra import compose, initialize_config_dir
    from torchvision.transforms.v2 import InterpolationMode

    from finetune.config.store import register_schemas
    from finetune.data.hf_data import hf_images
    from finetune.model.net import InputSpec

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "data=hf", f"data.path={folder}", "data.streaming=true", "data.num_workers=0"]).data

    before, start = resident_mb(), time.perf_counter()
    if side == "bare":
        files = sorted(Path(folder, "data").glob("train-*"))
        kept = [pq.read_table(file, columns=["label"]).column("label").to_numpy() for file in files]
        rows = sum(len(part) for part in kept)
    else:
        spec = InputSpec(32, 36, [0.5] * 3, [0.5] * 3, InterpolationMode.BILINEAR)
        kept = hf_images(cfg, spec)
        rows = len(kept[0].split)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "seconds": seconds, "kept_mb": resident_mb() - before,
            "peak_mb": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--measure", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as folder:
        write_parquet(Path(folder), args.rows)
        found = {side: json.loads(subprocess.run(
            [sys.executable, __file__, "--measure", side, folder], check=True,
            capture_output=True, text=True).stdout) for side in ("bare", "finetune")}
    for side, result in found.items():
        print(f"{side:9} {result['rows']:,} rows: {result['seconds']:.2f} s, "
              f"{result['kept_mb']:.0f} MB kept, peak {result['peak_mb']:.0f} MB above the start")
    bare, ours = found["bare"], found["finetune"]
    print(f"finetune - bare: {ours['kept_mb'] - bare['kept_mb']:+.0f} MB kept, "
          f"{ours['peak_mb'] - bare['peak_mb']:+.0f} MB peak")  # bare's seconds are too few for a ratio


if __name__ == "__main__":
    main()
