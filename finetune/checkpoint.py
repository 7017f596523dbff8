"""Checkpoint stage: atomic save and safe load (weights_only=True, so no code runs on load)."""

import os
import tempfile
from typing import Any

import torch

from finetune.errors import ConfigError


def save_atomic(state: dict[str, Any], path: str) -> None:
    """Write to a temporary file in the same folder, then rename over `path`.

    A crash during the write leaves the previous file at `path` untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_safe(path: str, key: str = "checkpoint") -> Any:
    """Load a checkpoint without unpickling arbitrary objects; `key` names it in errors."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r} does not exist: give the path of a .pt/.pth file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"{key}={path!r} could not be loaded safely (torch.load with "
                          f"weights_only=True refused it): {error}") from error
