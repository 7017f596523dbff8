"""A folder of JPEGs for the image-pipeline benchmarks (benchmarks/speed.py items 7 and 8),
drawn offline once and cached: 3,000 images of 256x256 at quality 90, 10 classes (the
scikit-learn digits, enlarged, coloured and noised), 2,500 to train and 500 to validate,
as ROOT/{train,val}/<digit>/<n>.jpg.
"""

import time
from pathlib import Path

FOLDER = Path.home() / ".cache" / "finetune" / "bench" / "jpegs-3000-v1"
SIZE, QUALITY, TRAIN, VAL = 256, 90, 2500, 500


def jpeg_folder() -> Path:
    """The folder, drawn on first use (about half a minute on 2 cores)."""
    done = FOLDER / "complete"
    if done.is_file():
        return FOLDER
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    started = time.perf_counter()
    digits = load_digits()
    rng = np.random.default_rng(0)
    for number in range(TRAIN + VAL):
        source = number % len(digits.images)
        label = int(digits.target[source])
        glyph = Image.fromarray((digits.images[source] * 16).astype(np.uint8)).resize(
            (SIZE, SIZE), Image.BILINEAR)
        ink = np.asarray(glyph, dtype=np.float32)[..., None] / 255
        background = rng.uniform(0, 160, size=3) + rng.normal(0, 25, size=(SIZE, SIZE, 3))
        colour = rng.uniform(150, 255, size=3)
        pixels = np.clip(background * (1 - ink) + colour * ink, 0, 255).astype(np.uint8)
        split = "train" if number < TRAIN else "val"
        folder = FOLDER / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{number}.jpg", quality=QUALITY)
    done.write_text("ok\n")
    print(f"jpeg folder: {TRAIN + VAL} images drawn in {time.perf_counter() - started:.0f} s; "
          f"{FOLDER}")
    return FOLDER


def parquet_folder() -> Path:
    """The same 3,000 JPEGs as a Hugging Face data set: data/{train,validation}-*.parquet with
    an Image column (the JPEG bytes as they are) and a ClassLabel, in the folder's order."""
    import datasets

    parquet = FOLDER.parent / "jpegs-3000-parquet-v1"
    if (parquet / "complete").is_file():
        return parquet
    root, names = jpeg_folder(), [str(digit) for digit in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for split, folder in (("train", "train"), ("validation", "val")):
        files = sorted((label, path) for label in names for path in (root / folder / label).iterdir())
        rows = {"image": [{"bytes": path.read_bytes(), "path": None} for _, path in files],
                "label": [names.index(label) for label, _ in files]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(parquet / "data" / f"{split}-00000-of-00001.parquet"))
    (parquet / "complete").write_text("ok\n")
    return parquet


def shard_folder() -> Path:
    """The same 3,000 JPEGs as WebDataset shards (webdataset's own writer, 500 samples a
    shard): train-0000..0004.tar and val-0000.tar, in the folder's order."""
    import webdataset

    shards = FOLDER.parent / "jpegs-3000-shards-v1"
    if (shards / "complete").is_file():
        return shards
    root = jpeg_folder()
    shards.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        files = sorted((label, path) for label in map(str, range(10))
                       for path in (root / split / label).iterdir())
        with webdataset.ShardWriter(str(shards / f"{split}-%04d.tar"), maxcount=500, verbose=0) as sink:
            for number, (label, path) in enumerate(files):
                sink.write({"__key__": f"{number:05d}", "jpg": path.read_bytes(), "cls": int(label)})
    (shards / "complete").write_text("ok\n")
    return shards
