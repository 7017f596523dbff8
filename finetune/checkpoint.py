"""Checkpoint stage: atomic save and safe load (weights_only=True, so no code runs on load)."""

import os
import shutil
import tempfile
import threading
from typing import Any

import torch

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


def save_atomic(state: dict[str, Any], path: str) -> None:
    """Write to a temporary file in the same folder, sync it, then rename over `path`.

    A crash during the write leaves the previous file at `path` untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.chmod(temporary, 0o666 & ~UMASK)  # mkstemp makes 0600 files; follow the umask instead
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        os.remove(temporary)
        raise
    replace_durably(temporary, path)


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


def detached_copy(value: Any) -> Any:
    """The same nested state with every tensor copied, so training can go on changing it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: detached_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(detached_copy(item) for item in value)
    return value


class BackgroundSaver:
    """Writes checkpoints on a background thread while the next epoch trains.

    The state is copied when `save` is called; writes happen one at a time and in order;
    `wait` blocks until the last one is on disk and re-raises anything it raised.
    """

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, state: dict[str, Any], path: str, link_to: str | None = None) -> None:
        self.wait()
        snapshot = detached_copy(state)

        def write() -> None:
            try:
                save_atomic(snapshot, path)
                if link_to is not None:
                    link_atomic(path, link_to)
            except BaseException as error:  # surfaced by the next wait()
                self.error = error

        self.thread = threading.Thread(target=write, name="checkpoint-writer")
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def load_safe(path: str, key: str = "checkpoint") -> Any:
    """Load a checkpoint without unpickling arbitrary objects; `key` names it in errors."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r} does not exist: give the path of a .pt/.pth file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"{key}={path!r} could not be loaded safely (torch.load with "
                          f"weights_only=True refused it): {error}") from error
