"""data=hf data.streaming=true: a folder of Parquet files read as a stream, for data too big
to keep (map-style copies data files into datasets' Arrow cache first).

At start-up only the files' metadata (rows per row group), their features (datasets reads
them from the schema) and the label column are read; the labels are kept as one array of
class ids (hf_labels.ClassIds), not an object per row. Each epoch every process then trains on
the same number of whole batches: N // (processes x batch size), N the training rows. The
files are put in a new order each epoch and the rows taken from a circular range of them
that starts at a new place; process r reads its own contiguous part of that range and each
of its loader workers a contiguous block of its batches, shuffled in a buffer of
data.shuffle_buffer rows. The order and the start come from (seed, epoch) alone, so every
process agrees on them without talking, no process runs out of batches before another (no
hang at the epoch's end), and a run resumed at an epoch boundary reads what an unbroken one
reads. Fewer than processes x batch size rows are left out each epoch, at a new place each
time. Validation reads every row once: process r its contiguous 1/processes of the rows,
in stored order.

datasets' own stream (`streaming=True` and `split_dataset_by_node`) is not used for the
rows: it gives processes unequal numbers of rows (shards or every n-th row), and can skip
to a row only by reading and decoding the rows before it. pyarrow (datasets' own reader)
reads the row groups a worker needs, each once, and decodes only the rows it takes.
"""

import bisect
import copy
import io
import itertools
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from finetune.data.folders import read_or_skip
from finetune.data.hf_labels import ClassIds
from finetune.data.images import read_image
from finetune.errors import ConfigError

MAX_ROW_GROUP_BYTES = 4 * 2**30  # pyarrow may hold a row group's column whole: no more than this
READ_ROWS = 64  # rows pyarrow decodes at a time from a row group


class ParquetSplit:
    """One split's Parquet files: their features and rows per row group, and a column read
    whole (the labels: what hf_labels reads)."""

    def __init__(self, files: list[str], source: str):
        import datasets
        import pyarrow.parquet as pq

        self.files, self.source = sorted(files), source
        self.groups: list[list[int]] = []
        features = None
        for file in self.files:
            try:
                metadata = pq.read_metadata(file)  # the features: datasets' reading of the
                found = datasets.Features.from_arrow_schema(pq.read_schema(file))  # stored types
            except Exception as error:  # pyarrow raises several types for a broken file
                raise ConfigError(f"data.path: {file} cannot be read as a Parquet file: {error}") from error
            if features is not None and found != features:
                raise ConfigError(f"data.path: {file} has the columns {found}, unlike "
                                  f"{self.files[0]} ({features}); one split's files must match.")
            features = found
            self.groups.append(row_groups(file, metadata))
        self.features = features
        self.counts = [sum(groups) for groups in self.groups]
        self.group_starts = [list(itertools.accumulate(groups, initial=0)) for groups in self.groups]

    def __len__(self) -> int:
        return sum(self.counts)

    def column(self, name: str) -> Any:
        """A column's values over the files, in order, as one pyarrow ChunkedArray."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        read = [pq.read_table(file, columns=[name]).column(name) for file in self.files]
        return pa.chunked_array([chunk for column in read for chunk in column.chunks], read[0].type)


def row_groups(file: str, metadata: Any) -> list[int]:
    """Rows per row group; a row group whose size would take more memory than allowed is
    refused before anything is read."""
    sizes = [metadata.row_group(index) for index in range(metadata.num_row_groups)]
    too_big = [index for index, group in enumerate(sizes) if group.total_byte_size > MAX_ROW_GROUP_BYTES]
    if too_big:
        raise ConfigError(f"data.path: {file}'s row group {too_big[0]} holds "
                          f"{sizes[too_big[0]].total_byte_size:,} bytes, over the "
                          f"{MAX_ROW_GROUP_BYTES:,} a stream reads at once; write the file with "
                          "smaller row groups.")
    return [group.num_rows for group in sizes]


def circular_range(counts: list[int], order: list[int], start: int, length: int) -> list[tuple]:
    """The rows [start, start + length) of the files laid end to end in `order`, wrapping
    round at the end: (file, first row, row after the last) pieces."""
    total = sum(counts)
    begins = list(itertools.accumulate((counts[file] for file in order), initial=0))
    pieces, start = [], start % total
    while length > 0:
        place = bisect.bisect_right(begins, start) - 1  # the file holding row `start`
        file, row = order[place], start - begins[place]
        taken = min(length, counts[file] - row)
        pieces.append((file, row, row + taken))
        length, start = length - taken, (start + taken) % total
    return pieces


def batches_per_process(total: int, world: int, batch_size: int) -> int:
    return total // (world * batch_size)


def training_pieces(counts: list[int], seed: int, epoch: int, rank: int, world: int,
                    worker: int, workers: int, batch_size: int) -> list[tuple]:
    """This loader worker's rows of this process's training rows this epoch: whole batches,
    from a circular range of the files in an order and from a start drawn from (seed,
    epoch), the same in every process."""
    draw = random.Random(f"stream/{seed}/{epoch}")
    order = draw.sample(range(len(counts)), len(counts))
    start = draw.randrange(sum(counts))
    batches = batches_per_process(sum(counts), world, batch_size)
    first, last = batches * worker // workers, batches * (worker + 1) // workers
    return circular_range(counts, order, start + (rank * batches + first) * batch_size,
                          (last - first) * batch_size)


def validation_pieces(counts: list[int], rank: int, world: int, worker: int, workers: int,
                      batch_size: int) -> list[tuple]:
    """This worker's validation rows: its process's contiguous 1/world of the rows in stored
    order, in batches dealt to the workers in turn (the loader takes them back in turn, so
    the batches come out in stored order whatever the number of workers)."""
    total = sum(counts)
    first, last = total * rank // world, total * (rank + 1) // world
    order = list(range(len(counts)))
    return [piece for start in range(first + worker * batch_size, last, workers * batch_size)
            for piece in circular_range(counts, order, start, min(batch_size, last - start))]


def shuffled(samples: Iterator, size: int, draw: random.Random) -> Iterator:
    """The samples in a random order within a buffer of `size` (1: as they come)."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        place = draw.randrange(size)
        yield buffer[place]
        buffer[place] = sample
    draw.shuffle(buffer)
    yield from buffer


class RowReader:
    """The image cells of a split's rows, asked for in increasing order within a file. A
    Parquet row group can be read only from its start, so a read goes on from where the
    last one stopped when it is in the same row group: each row group is read once,
    READ_ROWS rows at a time, however finely a worker's batches divide it."""

    def __init__(self, split: ParquetSplit, column: str):
        self.split, self.column = split, column
        self.file, self.batches, self.cells, self.first = None, iter(()), None, 0  # cells: rows first..

    def group_of(self, file: int, row: int) -> int:
        return bisect.bisect_right(self.split.group_starts[file], row) - 1

    def read(self, file: int, start: int, stop: int) -> Iterator[tuple[int, Any]]:
        """(row in the file, its image's bytes) for the rows [start, stop)."""
        going_on = (file == self.file and self.cells is not None and self.first <= start
                    and self.group_of(file, start) == self.group_of(file, self.first))
        if not going_on:
            self.open(file, start)
        for row in range(start, stop):
            while self.cells is not None and row >= self.first + len(self.cells):
                self.advance()
            if self.cells is None:
                raise RuntimeError(f"{self.split.files[file]} ends before its row {row}, which its "
                                   "metadata promised; the file is damaged")
            yield row, self.cells[row - self.first].as_py()

    def open(self, file: int, start: int) -> None:
        import pyarrow.parquet as pq

        group = self.group_of(file, start)
        groups = range(group, len(self.split.groups[file]))
        reader = pq.ParquetFile(self.split.files[file], buffer_size=2**20)
        self.file, self.first = file, self.split.group_starts[file][group]
        self.batches = (batch.column(0).field("bytes")
                        for batch in reader.iter_batches(READ_ROWS, row_groups=groups,
                                                         columns=[self.column]))
        self.cells = next(self.batches, None)

    def advance(self) -> None:
        self.first += len(self.cells)
        self.cells = next(self.batches, None)


class StreamedImages(IterableDataset):
    """A split's rows as a stream of (image, target), prepared as an image folder's images
    are (read_image, then the same transform). `place` tells it the process and the seed;
    `set_epoch` which epoch's rows to read."""

    def __init__(self, split: ParquetSplit, labels: ClassIds, classes: list[str],
                 image_column: str, transform, skip: bool, batch_size: int, shuffle_buffer: int):
        self.split, self.labels, self.classes, self.image_column = split, labels, classes, image_column
        self.transform, self.skip = transform, skip
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.training, self.rank, self.world, self.seed, self.epoch = False, 0, 1, 0, 0
        self.file_starts = list(itertools.accumulate(split.counts, initial=0))

    def place(self, training: bool, seed: int, rank: int, world: int) -> "StreamedImages":
        self.training, self.seed, self.rank, self.world = training, seed, rank, world
        if training and batches_per_process(len(self.split), world, self.batch_size) == 0:
            raise ConfigError(f"data.batch_size={self.batch_size}: the {len(self.split)} training "
                              f"rows of {self.split.source} make no whole batch for each of "
                              f"{world} process(es); use a smaller batch size.")
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def measuring_copy(self, seed: int) -> "StreamedImages":
        """freeze=auto's measuring rows: the training rows one process would read in an epoch
        `seed` draws (a new place of the files each time), the same in every process."""
        measured = copy.copy(self)
        measured.training, measured.seed, measured.epoch, measured.rank, measured.world = (
            True, seed, 0, 0, 1)
        return measured

    @property
    def targets(self) -> torch.Tensor:
        """Every row's target (loss.class_weights=balanced counts them)."""
        return self.labels.targets()

    def __len__(self) -> int:
        """This process's rows per epoch (training: its whole batches)."""
        total = len(self.split)
        if self.training:
            return batches_per_process(total, self.world, self.batch_size) * self.batch_size
        return total * (self.rank + 1) // self.world - total * self.rank // self.world

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counts = self.split.counts
        if not self.training:
            pieces = validation_pieces(counts, self.rank, self.world, worker, workers, self.batch_size)
            yield from self.readable(self.rows(pieces))
            return
        pieces = training_pieces(counts, self.seed, self.epoch, self.rank, self.world, worker,
                                 workers, self.batch_size)
        draw = random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        # the rows' bytes are shuffled, not their prepared images: a tenth of the memory, and
        # an image is prepared just before it is batched
        rows = shuffled(self.rows(pieces), self.shuffle_buffer, draw)
        yield from self.filled(rows, pieces, sum(stop - start for _, start, stop in pieces))

    def filled(self, rows: Iterator, pieces: list[tuple], quota: int) -> Iterator:
        """Exactly `quota` samples: an unreadable image left out (data.bad_images=skip) is
        made up for by the range's first readable rows again, so every process still trains
        on the same number of batches."""
        produced = 0
        for sample in self.readable(rows):
            produced += 1
            yield sample
        while produced < quota:
            before = produced
            for sample in itertools.islice(self.readable(self.rows(pieces)), quota - produced):
                produced += 1
                yield sample
            if produced == before:
                raise RuntimeError(f"no readable image in the rows {pieces} of {self.split.source}")

    def rows(self, pieces: list[tuple]) -> Iterator[tuple[int, int, Any]]:
        """(file, row, image bytes) of the pieces' rows, in order."""
        reader = RowReader(self.split, self.image_column)
        for file, start, stop in pieces:
            for row, data in reader.read(file, start, stop):
                yield file, row, data

    def readable(self, rows: Iterator) -> Iterator:
        """The rows' samples, prepared; an unreadable one left out (data.bad_images=skip)."""
        for file, row, data in rows:
            sample = self.prepared(file, row, data)
            if sample is not None:
                yield sample

    def prepared(self, file: int, row: int, data: bytes | None):
        """(image, target), or None for an unreadable image left out (data.bad_images=skip)."""
        def read():
            if not data:  # a path in a data set's cell is not followed
                raise ValueError("the row holds no image bytes (its cell names a file, which "
                                 "this tool does not open)")
            return read_image(io.BytesIO(data))

        image = read_or_skip(read, f"{self.split.files[file]}#{row}", self.skip)
        if image is None:
            return None
        return self.transform(image), self.labels.target(self.file_starts[file] + row)

    def describe(self, validation: "StreamedImages") -> str:
        """The start-up report's line: what is read, and each process's share."""
        total, files = len(self.split), len(self.split.files)
        batches = batches_per_process(total, self.world, self.batch_size)
        left = total - batches * self.batch_size * self.world
        return (f"{total} training and {len(validation.split)} validation rows streamed from "
                f"{files} Parquet file(s), {self.split.source}: each of {self.world} "
                f"process(es) trains on {batches} batches of {self.batch_size} per epoch (a "
                f"range of the files in a new order from a new start each epoch, shuffled in "
                f"a buffer of {self.shuffle_buffer} rows; {left} row(s) left out each epoch) and "
                f"validates its own 1/{self.world} of the validation rows")
