"""The start-up check of an image data set: every image's header opened and verified, the
unreadable ones named (data.bad_images=fail) or left out with a warning (skip).

Opening every image is most of a start-up on many images (20,000 JPEGs: 2.5 to 3.0 s, where
a bare ImageFolder scan takes 0.03 s; benchmarks/startup.py), and a sweep's jobs, a resumed
run and a run on the same data again would repeat it. So the verdict is kept under
trainer.cache_dir/checks, keyed by every image's source stamp (a file's path, size and
modification time; a table's or a shard's stamp and the row), in order, with PIL's version,
formats and pixel limit: a changed, added or removed image makes it miss and the check run
again. A verdict over 64 MiB (most images unreadable) is not kept.

A verdict file is read as untrusted input: one that is not what this module writes, or
names an image the data set does not hold, is ignored with a warning and the check runs
again. The verdict decides only which images are left out: a forged one can hide an
unreadable image, which is then named (or skipped) when it is read, as one that breaks
after the check is, or leave out readable ones, as an edited image cache entry could change
their pixels (the cache folder is the user's own).
"""

import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from finetune.data.images import open_image
from finetune.state.files import atomic_write

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the verdict's meaning or layout changes: old ones then miss
MAX_REASON_CHARS = 500  # a reason longer than this is not one this module wrote
MAX_VERDICT_BYTES = 64 * 2**20  # a longer verdict (a data set mostly unreadable) is not kept


def unreadable(paths: list[str], opener: Callable = open_image) -> dict[str, str]:
    """The images PIL cannot open and verify, with the reason (checked in threads)."""
    def problem(path: str) -> str | None:
        try:
            with opener(path) as image:  # past PIL's pixel limit: refused, with the advice
                image.verify()
        except Exception as error:  # PIL raises many types for broken files
            return f"{type(error).__name__}: {error}"[:MAX_REASON_CHARS]
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:  # file reads: threads overlap the waits
        return {path: reason for path, reason in zip(paths, pool.map(problem, paths), strict=True)
                if reason is not None}


def verdict_key(sources: list[str], stamp: Callable[[str], str]) -> str:
    """What the verdict depends on: each image's stamp (an OSError for one that is gone), and
    PIL: its version, the formats it opens here (plugins too) and its pixel limit."""
    import PIL

    Image.init()  # every format plugin registered
    digest = hashlib.sha256(f"{FORMAT}|{PIL.__version__}|{sorted(Image.ID)}|"
                            f"{Image.MAX_IMAGE_PIXELS}".encode())
    for source in sources:
        digest.update(f"{stamp(source)}\n".encode())
    return digest.hexdigest()


def checked_unreadable(sources: list[str], opener: Callable, stamp: Callable[[str], str],
                       cache_dir: str | None) -> dict[str, str]:
    """unreadable(sources), read from the verdict kept for these very images when there is
    one; else checked, and kept when there is a cache_dir."""
    try:
        key = verdict_key(sources, stamp) if cache_dir else None
    except OSError:  # an image gone since it was listed: the check names it, nothing is kept
        key = None
    if key is None:
        return unreadable(sources, opener)
    path = os.path.join(os.path.expanduser(cache_dir), "checks", f"{key}.json")
    kept = read_verdict(path, set(sources)) if os.path.isfile(path) else None
    if kept is not None:
        log.info("start-up check of %d images: read from %s (no image changed since)", len(sources), path)
        return kept
    found = unreadable(sources, opener)
    keep_verdict(path, {"format": FORMAT, "images": len(sources), "unreadable": found})
    return found


def keep_verdict(path: str, verdict: dict) -> None:
    text = json.dumps(verdict)
    if len(text) > MAX_VERDICT_BYTES:  # ASCII (json escapes the rest): one byte a character
        return
    try:
        with atomic_write(path) as stream:
            stream.write(text)
    except OSError as error:  # a read-only cache folder: the check still holds for this run
        log.warning("trainer.cache_dir: cannot keep the start-up check's verdict in %s: %s", path, error)


def read_verdict(path: str, sources: set[str]) -> dict[str, str] | None:
    """A kept verdict, or None (with a warning) for a file this module did not write."""
    try:
        with open(path, encoding="ascii") as stream:
            text = stream.read(MAX_VERDICT_BYTES + 1)
        if len(text) > MAX_VERDICT_BYTES:
            raise ValueError(f"it is over the {MAX_VERDICT_BYTES:,} bytes a kept verdict takes")
        verdict: Any = json.loads(text)
        if not (isinstance(verdict, dict) and verdict.get("format") == FORMAT
                and verdict.get("images") == len(sources)):
            raise ValueError("it is not a verdict on these images")
        found = verdict.get("unreadable")
        if not isinstance(found, dict) or not all(
                source in sources and isinstance(reason, str) and len(reason) <= MAX_REASON_CHARS
                for source, reason in found.items()):
            raise ValueError("it names images the data set does not hold, or no reasons")
        return found
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        log.warning("trainer.cache_dir: ignoring the start-up check's verdict %s (%s); "
                    "checking the images again", path, error)
        return None
