"""Files a run writes and reads: atomic writes (a reader or a crash never sees half a file)
and safe loads (torch.load with weights_only=True, so no code in a file runs, of a file whose
zip index was checked first, so nothing in it inflates past the file's own size)."""

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from finetune.errors import ConfigError

UMASK = os.umask(0)  # read once: os.umask can only be read by setting it
os.umask(UMASK)


def fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (a power loss could otherwise undo it)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def replace_durably(temporary: str, path: str) -> None:
    try:
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextmanager
def atomic_write(path: str, mode: str = "w", durable: bool = False) -> Iterator[IO]:
    """Write a temporary file beside `path`, then rename it over `path`: a watcher or a
    crash sees the old file or the new one, never half of one. Concurrent writers each
    rename a complete file. `durable` also syncs the data and the rename to disk."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1],
                                         dir=folder)
    os.chmod(temporary, 0o666 & ~UMASK)  # mkstemp makes 0600 files; follow the umask instead
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"newline": ""})) as stream:
            yield stream
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
    except BaseException:
        os.remove(temporary)
        raise
    if durable:
        replace_durably(temporary, path)
    else:
        os.replace(temporary, path)


def save_atomic(state: dict[str, Any], path: str) -> None:
    """torch.save, durably: a crash during the write leaves the previous file untouched."""
    import torch  # here, not at the top: the command line imports this module before torch

    with atomic_write(path, "wb", durable=True) as stream:
        torch.save(state, stream)


def write_json(data: dict, path: str) -> None:
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may read as a formula


def spreadsheet_cell(value: Any) -> Any:
    """A cell of a CSV/TSV file this tool writes, as a spreadsheet must show it: a string
    starting like a formula (a class named =HYPERLINK(...), say) gets a leading ' so it stays
    text (OWASP's rule against CSV injection); numbers and other values are left as they are,
    so numeric columns stay numeric."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def link_atomic(source: str, path: str) -> None:
    """Make `path` hold the same bytes as `source` without writing them again.

    A hard link shares the file; replacing `source` later (os.replace makes a new file) leaves
    `path` with the old content. Falls back to a synced copy where links are not supported.
    """
    temporary = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-link-{os.getpid()}")
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
    replace_durably(temporary, path)


def load_safe(path: str, key: str = "checkpoint") -> Any:
    """Load a .pt file without unpickling arbitrary objects (or a .safetensors file, which
    holds tensors only); `key` names it in errors."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r} does not exist: give the path of a .pt/.pth file.")
    if path.endswith(".safetensors"):
        return load_safetensors(path, key)
    check_archive(path, key)
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"{key}={path!r} could not be loaded safely (torch.load with "
                          f"weights_only=True refused it): {error}") from error


ZIP_MAGIC = b"PK\x03\x04"  # what torch.load looks for to read a file as a zip archive
METHODS = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def check_archive(path: str, key: str) -> None:
    """Refuse a .pt file whose zip index declares more than the file can hold, before
    torch.load inflates anything: torch.save stores every entry uncompressed, so a
    compressed entry (a zip bomb: megabytes on disk, gigabytes in memory) or entries adding
    up to more bytes than the file (overlapping ones) mean a file crafted or damaged."""
    index = zip_index(path, key)
    if index is None:
        return
    entries, size = index
    compressed = [entry for entry in entries if entry.compress_type != zipfile.ZIP_STORED]
    if compressed:
        entry = max(compressed, key=lambda entry: entry.file_size)
        method = METHODS.get(entry.compress_type, f"zip method {entry.compress_type}")
        raise ConfigError(f"{key}={path!r} holds {len(compressed)} compressed entries, the largest "
                          f"{entry.filename!r} ({method}: {entry.compress_size:,} bytes that inflate "
                          f"to {entry.file_size:,}); torch.save stores every entry uncompressed, so "
                          "the file was re-packed, perhaps to exhaust memory when loaded. If you "
                          "trust it, load it with torch.load and save it again with torch.save.")
    declared = sum(entry.file_size for entry in entries)
    if declared > size:
        largest = max(entries, key=lambda entry: entry.file_size)
        raise ConfigError(f"{key}={path!r} declares {declared:,} bytes of entries in a file of "
                          f"{size:,} bytes (the largest, {largest.filename!r}: "
                          f"{largest.file_size:,}); the uncompressed entries torch.save writes "
                          "fit in their file, so it is damaged or crafted to exhaust memory. "
                          "If you trust it, load it with torch.load and save it again with "
                          "torch.save.")


def zip_index(path: str, key: str) -> tuple[list[zipfile.ZipInfo], int] | None:
    """The entries a zip archive's central directory declares (nothing is inflated) and the
    file's size; None for a file torch.load does not read as a zip archive."""
    try:
        with open(path, "rb") as stream:
            if stream.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                # torch's legacy format (before 1.6), read as such: it compresses nothing,
                # and each storage's size, declared in the pickle and again in the stream
                # (torch checks they agree), is read from the stream: memory stays within
                # the file
                return None
            with zipfile.ZipFile(stream) as archive:
                return archive.infolist(), os.fstat(stream.fileno()).st_size
    except OSError as error:
        raise ConfigError(f"{key}={path!r} cannot be read: {error}") from error
    except Exception as error:  # BadZipFile, or another type for a crafted index
        raise ConfigError(f"{key}={path!r} starts as a zip archive (torch.save's format) but its "
                          f"zip index cannot be read ({error}): the file is damaged; save it "
                          "again with torch.save.") from error


def load_safetensors(path: str, key: str) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ConfigError(f"{key}={path!r} is a .safetensors file: pip install safetensors "
                          "(timm's extra brings it).") from error
    try:  # safetensors refuses a header whose tensors do not exactly cover the file
        return load_file(path, device="cpu")
    except Exception as error:
        raise ConfigError(f"{key}={path!r} is not a readable safetensors file: {error}") from error
