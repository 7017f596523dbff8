"""Decoded-image cache: decode and resize each image file once, not once per epoch.

An image folder's (or CSV's) images go through `Prepared.fixed` (decode, resize, perhaps a
center crop) the same way every epoch; only `Prepared.varying` (random augmentation,
scaling, normalization) differs. The fixed part's uint8 results are written once to one
flat file under trainer.cache_dir/images, memory-mapped when read, with an index of each
image's shape and offset. Later epochs, later runs and every job of a sweep on the same
files read them from there and run only the varying part, so the batches are the ones the
files would give.

The key covers every file's path, size and modification time, the fixed transform and the
library versions: a changed, added or removed file makes the whole entry miss and be
rebuilt (it is one file, written in one pass). Unreadable files are still found at start-up
(data.bad_images), as without the cache. Entries are written to a temporary name and
renamed, index last, so concurrent writers each leave a complete entry and a truncated one
is noticed and rebuilt. The folder is kept under data.cache_max_gb: older entries go first.
"""

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torchvision

from finetune.data.images import decoder_name, open_image
from finetune.errors import ConfigError
from finetune.state.files import atomic_write, load_safe, save_atomic

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout changes: old entries then miss
GIB = 2**30


@dataclass
class Decision:
    enabled: bool
    reason: str  # for the start-up report


class DecodedImages:
    """A cache entry, read-only: image i's uint8 tensor (None for a file that could not be
    read when the entry was built). The file is mapped lazily in each loader process."""

    def __init__(self, data_path: str, index: torch.Tensor):
        self.data_path, self.index = data_path, index  # index rows: offset, channels, h, w
        self.mapped: np.memmap | None = None

    def __getstate__(self):  # loader workers map the file themselves
        return {**self.__dict__, "mapped": None}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, position: int) -> torch.Tensor | None:
        offset, channels, height, width = self.index[position].tolist()
        if channels == 0:
            return None
        if self.mapped is None:
            self.mapped = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        size = channels * height * width
        return torch.from_numpy(np.array(self.mapped[offset:offset + size])).view(channels, height, width)


def read_batch(dataset, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images `positions` of a dataset that batch_readable accepts, read whole: its uint8
    images stacked, then prepared at once (the same numbers as one by one); None when all
    of them were unreadable."""
    decoded = dataset.decoded
    readable = [position for position in positions if decoded.index[position, 1] > 0]
    if not readable:
        return None
    images = torch.stack([decoded.get(position) for position in readable])
    targets = [dataset.samples[position][1] for position in readable]
    labels = torch.stack(targets) if torch.is_tensor(targets[0]) else torch.tensor(targets)
    return dataset.transform.varying(images), labels


def batch_readable(dataset) -> bool:
    """Whether read_batch can read `dataset`: cached, one image shape, nothing random after
    the cache (scaling and normalization only: validation, or training without
    augmentation). Such batches need no loader workers: nothing is decoded."""
    from torchvision.transforms import v2

    decoded = getattr(dataset, "decoded", None)
    if decoded is None or len(decoded) == 0:
        return False
    shapes = decoded.index[:, 1:][decoded.index[:, 1] > 0]
    one_shape = len(shapes) > 0 and bool((shapes == shapes[0]).all())
    steps = dataset.transform.varying.transforms
    return one_shape and all(isinstance(step, v2.ToDtype | v2.Normalize) for step in steps)


def entry_key(stamps: list[str], fixed: object) -> str:
    """Everything the cached tensors depend on: the images as they are now (each one's
    stamp: a file's path, size and modification time), the fixed transform and the
    libraries that decode and resize."""
    digest = hashlib.sha256(f"{FORMAT}|{fixed!r}|{torch.__version__}|{torchvision.__version__}|"
                            f"{decoder_name()}".encode())
    for stamp in stamps:
        digest.update(stamp.encode())
    return digest.hexdigest()


def fixed_size(fixed: object) -> tuple[int, int] | int:
    """What the fixed part makes of an image: a center crop's (height, width), else the
    short side of its resize."""
    from torchvision.transforms import v2

    steps = fixed.transforms
    crop = next((step.size for step in steps if isinstance(step, v2.CenterCrop)), None)
    if crop is not None:
        return tuple(crop)
    short = next(step.size for step in steps if isinstance(step, v2.Resize))
    return short[0] if isinstance(short, list | tuple) else short


def estimated_bytes(paths: list[str], fixed: object, opener=open_image) -> int:
    """The entry's size from the image headers alone (nothing decoded): 3 x the output
    height x width per image, after a center crop's fixed size or a short-side resize."""

    size = fixed_size(fixed)
    if isinstance(size, tuple):
        return len(paths) * 3 * size[0] * size[1]
    short, total = size, 0
    for path in paths:
        with opener(path) as image:  # the header alone, refused past PIL's pixel limit
            width, height = image.size
        total += 3 * short * short * max(width, height) // max(min(width, height), 1)
    return total


def decide(setting: str, images: int, size: int, max_gb: float) -> Decision:
    """Whether data.cache_images is on for `images` images taking `size` bytes, and why
    (an error for `true` that cannot be honoured)."""
    if setting == "false":
        return Decision(False, "off (data.cache_images=false)")
    if size > max_gb * GIB:
        reason = f"{images} images would take {size / GIB:.1f} GiB, over data.cache_max_gb={max_gb:g}"
        if setting == "true":
            raise ConfigError(f"data.cache_images=true: {reason}; raise data.cache_max_gb or "
                              "set data.cache_images=auto.")
        return Decision(False, f"off: {reason}")
    return Decision(True, f"on: {images} images decoded and resized once ({size / 2**20:.0f} "
                          "MiB under trainer.cache_dir/images), then read back each epoch")


def load_index(index_path: str, data_path: str, key: str, count: int, fixed: object) -> torch.Tensor | None:
    """A complete entry's index, else None (a miss: built again)."""
    if not (os.path.isfile(index_path) and os.path.isfile(data_path)):
        return None
    try:
        saved = load_safe(index_path, "image cache")  # weights only, its zip index checked first
        index, data_size = saved["index"], os.path.getsize(data_path)
        # the file is untrusted: images laid end to end, as build_entry writes them, no
        # number in it past the data file's size
        valid = (saved["key"] == key and index.shape == (count, 4) and index.dtype == torch.long
                 and bool((index >= 0).all()) and bool((index <= data_size).all()))
        sizes = index[:, 1] * index[:, 2] * index[:, 3]
        valid = (valid and torch.equal(index[:, 0], sizes.cumsum(0) - sizes)
                 and data_size == int(sizes.sum()))
    except Exception as error:  # truncated, corrupt or another format
        log.warning("image cache %s is unreadable (%s); rebuilding it", index_path, error)
        return None
    if not valid:
        log.warning("image cache %s is incomplete or stale; rebuilding it", data_path)
        return None
    wrong = unexpected_shapes(index, fixed)
    if wrong:
        log.warning("image cache %s holds images of other shapes than the transform gives (%s); "
                    "rebuilding it", data_path, wrong)
        return None
    return index


def unexpected_shapes(index: torch.Tensor, fixed: object) -> str:
    """The first image shapes in an index that the fixed part does not give ('': none):
    3 channels and its size, or (0, 0, 0) for a file that could not be read."""
    shapes = index[:, 1:]
    size = fixed_size(fixed)
    if isinstance(size, tuple):
        fits = (shapes[:, 1] == size[0]) & (shapes[:, 2] == size[1])
        wanted = f"(3, {size[0]}, {size[1]})"
    else:
        fits = shapes[:, 1:].min(dim=1).values == size
        wanted = f"3 channels, the shorter side {size}"
    fits = (fits & (shapes[:, 0] == 3)) | (shapes == 0).all(dim=1)
    wrong = [tuple(shape) for shape in shapes[~fits][:3].tolist()]
    return f"{', '.join(map(str, wrong))}, not {wanted}" if wrong else ""


def decode_all(paths: list[str], fixed: object, loader, skip: bool) -> list[torch.Tensor | None]:
    """Every file through the fixed transform, in threads (the decoders and resizing
    release the GIL); None for a file that fails now, with a warning, or an error."""
    def decoded(path: str) -> torch.Tensor | None:
        try:
            return fixed(loader(path)).contiguous()
        except Exception as error:
            if not skip:
                raise RuntimeError(f"cannot read image {path}: {error}") from error
            log.warning("data.bad_images=skip: leaving out unreadable image %s: %s", path, error)
            return None

    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        return list(pool.map(decoded, paths))


def build_entry(paths: list[str], fixed: object, loader, skip: bool, data_path: str,
                index_path: str, key: str) -> torch.Tensor:
    tensors = decode_all(paths, fixed, loader, skip)
    index, offset = [], 0
    with atomic_write(data_path, "wb") as stream:
        for tensor in tensors:
            shape = (0, 0, 0) if tensor is None else tuple(tensor.shape)
            index.append((offset, *shape))
            if tensor is not None:
                stream.write(tensor.numpy().tobytes())
                offset += tensor.numel()
    index_tensor = torch.tensor(index, dtype=torch.long)
    save_atomic({"key": key, "index": index_tensor}, index_path)  # last: the entry is whole
    return index_tensor


def make_room(folder: str, needed: int, max_gb: float, keep: str) -> list[str]:
    """Remove the oldest entries (by last use) until `needed` more bytes fit under the
    bound; the names removed."""
    entries = {}
    for name in os.listdir(folder):
        stem = name.split(".", 1)[0]
        if name.endswith((".u8", ".idx.pt")) and stem != keep:
            path = os.path.join(folder, name)
            size, used = os.path.getsize(path), os.path.getmtime(path)
            total, last = entries.get(stem, (0, 0.0))
            entries[stem] = (total + size, max(last, used))
    held = sum(size for size, _ in entries.values())
    removed = []
    for stem, (size, _) in sorted(entries.items(), key=lambda item: item[1][1]):
        if held + needed <= max_gb * GIB:
            break
        for suffix in (".u8", ".idx.pt"):
            if os.path.exists(os.path.join(folder, stem + suffix)):
                os.remove(os.path.join(folder, stem + suffix))
        held -= size
        removed.append(stem)
    return removed


class Entry(NamedTuple):
    """An image dataset's entry: its key, data file and index file."""

    key: str
    data_path: str
    index_path: str


def entry_of(dataset, cache_dir: str) -> Entry:
    """The entry for an image dataset's images as they are now (one stat each: found once)."""
    key = entry_key([dataset.source_stamp(path) for path, _ in dataset.samples], dataset.transform.fixed)
    folder = os.path.join(os.path.expanduser(cache_dir), "images")
    return Entry(key, os.path.join(folder, f"{key}.u8"), os.path.join(folder, f"{key}.idx.pt"))


def entry_bytes(dataset, entry: Entry) -> int:
    """An entry's size: a built entry's data file's (a later run or a sweep's job opens no
    image for it), else estimated from the image headers."""
    if os.path.isfile(entry.index_path) and os.path.isfile(entry.data_path):
        return os.path.getsize(entry.data_path)  # a broken entry is rebuilt, re-estimated, in attach
    return estimated_bytes([path for path, _ in dataset.samples], dataset.transform.fixed,
                           dataset.open_source)


def attach(dataset, entry: Entry, max_gb: float, size: int) -> bool:
    """Give an image dataset its entry (dataset.decoded; `size`: its entry_bytes); whether
    this call built it."""
    dataset.decoded, built = cached_images(dataset, entry, max_gb, size)
    dataset.whole_batches = batch_readable(dataset)
    return built


def cached_images(dataset, entry: Entry, max_gb: float, size: int) -> tuple[DecodedImages, bool]:
    """The entry for an image dataset's files and fixed transform, built on a miss; and
    whether this call built it."""
    paths = [path for path, _ in dataset.samples]
    fixed = dataset.transform.fixed
    folder = os.path.dirname(entry.data_path)
    os.makedirs(folder, exist_ok=True)
    had_data = os.path.isfile(entry.data_path)
    index = load_index(entry.index_path, entry.data_path, entry.key, len(paths), fixed)
    built = index is None
    if built:
        if had_data:  # `size` was the broken entry's: what the images will take instead
            size = estimated_bytes(paths, fixed, dataset.open_source)
        removed = make_room(folder, size, max_gb, entry.key)
        if removed:
            log.info("image cache: removed %d older entries to stay under data.cache_max_gb=%g",
                     len(removed), max_gb)
        index = build_entry(paths, fixed, dataset.loader, dataset.skip, entry.data_path,
                            entry.index_path, entry.key)
    else:
        os.utime(entry.index_path)  # last used: the bound removes the oldest first
    return DecodedImages(entry.data_path, index), built
