"""data=hf data.streaming=true: Parquet files read as a stream give every process the same
number of whole batches of distinct rows each epoch, validate each row once exactly as
map-style does, and resume at an epoch boundary as if never stopped."""

import collections
import csv
import itertools
import json
import logging

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from finetune.data.streaming import shuffled, training_pieces, validation_pieces
from finetune.errors import ConfigError
from finetune.run import build, run

from conftest import FAST, IMAGE_RUN, make_config, png_bytes
from test_resume import resumed_run_equals_unbroken

datasets = pytest.importorskip("datasets", reason="data.streaming needs the hf extra (in dev)")

FILES = {"train": (25, 20, 15), "validation": (13, 12)}  # rows per Parquet file
BATCH = 8


@pytest.fixture
def parquet(tmp_path):
    """Digit images as PNG bytes in Parquet files of uneven size: train-0000k (60 rows) and
    validation-0000k (25 rows), an Image and a ClassLabel column."""
    bundle = load_digits()
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    rows = iter(range(len(bundle.target)))
    for split, sizes in FILES.items():
        for number, size in enumerate(sizes):
            chosen = list(itertools.islice(rows, size))
            table = datasets.Dataset.from_dict(
                {"image": [{"bytes": png_bytes((bundle.images[i] * 15).astype(np.uint8)), "path": None}
                           for i in chosen],
                 "label": [int(bundle.target[i]) for i in chosen]}, features=features)
            name = f"{split}-{number:05d}-of-{len(sizes):05d}.parquet"
            table.to_parquet(str(tmp_path / "pq" / "data" / name))
    return tmp_path


def streamed(root, *overrides: str) -> list[str]:
    return [*FAST[:2], *IMAGE_RUN, "data=hf", f"data.path={root}/pq", f"data.batch_size={BATCH}",
            "data.image_size=16", f"data.cache_dir={root}/hf-cache", "data.streaming=true", *overrides]


def rows_of(pieces) -> list[tuple[int, int]]:
    return [(file, row) for file, start, stop in pieces for row in range(start, stop)]


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 3), (3, 2)])
def test_each_process_reads_as_many_whole_batches_of_distinct_rows(world, workers):
    counts = [25, 20, 0, 15]
    batches = sum(counts) // (world * BATCH)
    epochs = []
    for epoch in (1, 2):
        read = []
        for rank in range(world):
            parts = [training_pieces(counts, 7, epoch, rank, world, worker, workers, BATCH)
                     for worker in range(workers)]
            assert all(len(rows_of(part)) % BATCH == 0 for part in parts)  # whole batches each
            assert sum(len(rows_of(part)) for part in parts) == batches * BATCH
            read += [row for part in parts for row in rows_of(part)]
        assert len(set(read)) == len(read)  # no row twice in an epoch
        assert all(0 <= row < counts[file] for file, row in read)
        assert sum(counts) - len(read) < world * BATCH  # what is left out: under one batch each
        epochs.append(read)
    assert epochs[0] != epochs[1]  # a new order and start each epoch, the same in every process
    assert epochs[0][:BATCH] == rows_of(training_pieces(counts, 7, 1, 0, world, 0, workers, BATCH))[:BATCH]


@pytest.mark.parametrize("world, workers", [(1, 1), (1, 3), (2, 2), (3, 1)])
def test_validation_reads_each_row_once_in_stored_order(world, workers):
    counts = [13, 0, 12]
    read = []
    for rank in range(world):
        parts = [rows_of(validation_pieces(counts, rank, world, worker, workers, BATCH))
                 for worker in range(workers)]
        batches = [[part[i:i + BATCH] for i in range(0, len(part), BATCH)] for part in parts]
        # the loader takes one batch from each worker in turn
        read += [row for turn in itertools.zip_longest(*batches, fillvalue=[]) for batch in turn
                 for row in batch]
    assert read == [(file, row) for file, count in enumerate(counts) for row in range(count)]


def test_the_shuffle_buffer_keeps_every_sample_once():
    import random

    out = list(shuffled(iter(range(50)), 8, random.Random(0)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert list(shuffled(iter(range(5)), 1, random.Random(0))) == list(range(5))


def test_each_row_group_is_read_once_however_finely_the_rows_are_asked_for(tmp_path, monkeypatch):
    """Row groups of 7 rows, read in 10 strided batches of 2 (a worker's validation
    batches): the right cells, and each group opened at most once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetune.data import streaming

    cells = [{"bytes": str(row).encode(), "path": None} for row in range(30)]
    pq.write_table(pa.table({"image": cells}), str(tmp_path / "a.parquet"), row_group_size=7)
    split = streaming.ParquetSplit([str(tmp_path / "a.parquet")], "a test split")
    assert split.groups == [[7, 7, 7, 7, 2]]
    monkeypatch.setattr(streaming, "READ_ROWS", 2)
    reader, opened = streaming.RowReader(split, "image"), []
    monkeypatch.setattr(reader, "open", lambda *place: opened.append(place) or
                        streaming.RowReader.open(reader, *place))
    wanted = [row for start in range(0, 30, 3) for row in range(start, start + 2)]
    got = [(row, data) for start in range(0, 30, 3) for row, data in reader.read(0, start, start + 2)]
    assert got == [(row, str(row).encode()) for row in wanted]
    assert len(opened) <= len(split.groups[0])


def images_and_labels(loader):
    batches = list(loader)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def test_the_stream_validates_exactly_as_map_style_and_trains_on_distinct_rows(parquet):
    """The same weights score the same on either: validation reads the same images, prepared
    alike, in the same order. Training reads whole batches of the training rows, none twice."""
    stream = build(make_config(*streamed(parquet), "dry_run=true")).data
    mapped = build(make_config(*streamed(parquet), "data.streaming=false", "dry_run=true")).data
    assert stream.reading.startswith("60 training and 25 validation rows streamed from 3 Parquet "
                                     "file(s), the split 'train' of")
    assert "trains on 7 batches of 8 per epoch" in stream.reading
    for got, expected in zip(images_and_labels(stream.val_loader),
                             images_and_labels(mapped.val_loader), strict=True):
        assert torch.equal(got, expected)
    stream.train_loader.dataset.set_epoch(1)
    batches = list(stream.train_loader)
    assert len(batches) == len(stream.train_loader) == 60 // BATCH
    assert all(len(labels) == BATCH for _, labels in batches)
    def counted(pairs) -> collections.Counter:
        return collections.Counter((image.numpy().tobytes(), int(label)) for image, label in pairs)

    every = counted(zip(*images_and_labels(mapped.train_loader), strict=True))
    read = counted(pair for images, labels in batches for pair in zip(images, labels, strict=True))
    assert not read - every and read.total() == 56  # each read row is one of the split's, once


@pytest.mark.slow
def test_a_streamed_run_resumed_at_an_epoch_boundary_ends_as_an_unbroken_one(parquet, monkeypatch,
                                                                            caplog):
    cfg = make_config(*streamed(parquet), "trainer.max_epochs=2", "loss.class_weights=balanced")
    caplog.set_level(logging.INFO)
    resumed_run_equals_unbroken(cfg, parquet / "runs", monkeypatch)
    assert "feature cache: off: the data is streamed (data.streaming=true)" in caplog.text
    assert json.loads((parquet / "runs" / "unbroken" / "summary.json").read_text())["epochs_completed"] == 2


@pytest.mark.slow
def test_freeze_auto_measures_on_rows_of_the_stream(parquet):
    """freeze=auto: each epoch's scales measured on batches of the stream (from a place the
    seed and epoch draw, the same on every process); auto:select chooses from them."""
    run(make_config(*streamed(parquet), "backbone.name=resnet18", "freeze=auto",
                    "trainer.max_epochs=2"), str(parquet / "auto"))
    rows = list(csv.DictReader(open(parquet / "auto" / "metrics.csv")))
    scales = [float(row["lr_scale/@stage4"]) for row in rows]
    assert len(rows) == 2 and all(0 < scale <= 1 for scale in scales)
    assert {row["epoch"] for row in csv.DictReader(open(parquet / "auto" / "rgn.csv"))} == {"1", "2"}
    choice = build(make_config(*streamed(parquet), "backbone.name=resnet18", "freeze=auto:select",
                               "dry_run=true")).choice
    measured = [unit for unit, norm in choice.norms.items() if norm > 0]
    assert len(measured) >= 5 and set(choice.frozen) < set(measured)  # the largest trains


@pytest.mark.slow
def test_an_unreadable_image_is_made_up_for_or_named(parquet):
    """bad_images=skip: the training stream still gives its whole batches; fail: the image
    is named by its file and row."""
    file = next((parquet / "pq" / "data").glob("train-00001-*"))
    table = datasets.Dataset.from_parquet(str(file), cache_dir=str(parquet / "c"))
    broken = table.cast_column("image", datasets.Image(decode=False)).map(
        lambda row, index: {"image": {"bytes": b"not an image" if index == 3 else row["image"]["bytes"],
                                      "path": None}}, with_indices=True)
    broken.cast_column("image", datasets.Image()).to_parquet(str(file))
    for setting in ("skip", "fail"):
        data = build(make_config(*streamed(parquet), f"data.bad_images={setting}", "dry_run=true")).data
        if setting == "skip":
            assert sum(len(labels) for _, labels in data.train_loader) == 56
        else:
            with pytest.raises(RuntimeError, match=rf"cannot read image .*{file.name}#3"):
                list(data.train_loader)


@pytest.mark.parametrize("overrides, message", [
    (["data.folds=3"], "data.folds=3 is not valid: a stream"),
    (["data.val_fraction=0.2"], "data.val_fraction=0.2 is not valid: a stream"),
    (["data.cache_images=true"], "data.cache_images='True' is not valid: a stream"),
    (["data.shuffle_buffer=0"], "data.shuffle_buffer=0 is not valid"),
    (["trainer.cache_features=true", "freeze=[pretrained]"],
     "trainer.cache_features=true would change the results: the data is streamed"),
    (["data.batch_size=64"], "data.batch_size=64: the 60 training rows of the split 'train'"),
])
def test_what_a_stream_cannot_do_is_named(parquet, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(make_config(*streamed(parquet), *overrides, "dry_run=true"))


def test_an_image_column_stored_as_something_else_is_named(parquet):
    """Files whose metadata says images but whose column holds plain bytes: datasets reads
    the features from the stored types, so the column is named as not images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in (parquet / "pq" / "data").glob("train-*"):
        table = pq.read_table(file)
        plain = pa.table({"image": pa.array([b"x"] * len(table)), "label": table.column("label")})
        pq.write_table(plain.replace_schema_metadata(table.schema.metadata), str(file))
    with pytest.raises(ConfigError, match=r"data.image_column='image' holds Value\('binary'\), "
                                          "not images"):
        build(make_config(*streamed(parquet), "dry_run=true"))


def test_a_saved_folder_or_arrow_files_are_not_streamed(parquet):
    table = datasets.load_dataset(f"{parquet}/pq", cache_dir=str(parquet / "c"))
    table.save_to_disk(str(parquet / "saved"))
    with pytest.raises(ConfigError, match="is a folder written by save_to_disk, whose Arrow files "
                                          "are read where they are"):
        build(make_config(*streamed(parquet), f"data.path={parquet}/saved", "dry_run=true"))
    (parquet / "arrow").mkdir()
    for name in ("train", "validation"):
        (parquet / "arrow" / f"{name}.arrow").write_bytes(
            next((parquet / "saved" / name).glob("*.arrow")).read_bytes())
    with pytest.raises(ConfigError, match="holds arrow files; streaming reads Parquet files"):
        build(make_config(*streamed(parquet), f"data.path={parquet}/arrow", "dry_run=true"))
