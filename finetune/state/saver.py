"""A run's checkpoints/ folder, written in the background while training goes on:
last.pt every epoch, best.pt linked to the best epoch's, and frozen.pt written once.

What goes into a checkpoint is checkpoint.py's business; this module owns where its
tensors lie on disk (the frozen part split off into frozen.pt) and joins them on reading.
"""

import os
import threading
import uuid
from typing import Any

import torch

from finetune.errors import ConfigError
from finetune.state.files import link_atomic, load_safe, save_atomic


def detached_copy(value: Any) -> Any:
    """The same nested state with every tensor copied to the CPU, so training can go on
    changing it. GPU tensors go to pinned memory without waiting: the copies are queued
    before the next training step on the same stream, and `copies_done` waits for them."""
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            return host.copy_(value.detach(), non_blocking=True)
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: detached_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(detached_copy(item) for item in value)
    return value


def cuda_devices(value: Any) -> set[torch.device]:
    if isinstance(value, torch.Tensor):
        return {value.device} if value.is_cuda else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return set().union(*(cuda_devices(item) for item in value))
    return set()


class BackgroundSaver:
    """Writes checkpoints on a background thread while the next epoch trains.

    The state is copied when `save` is called; writes happen one at a time and in order;
    `wait` blocks until the last one is on disk and re-raises anything it raised.
    """

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, state: dict[str, Any], path: str, link_to: str | None = None,
             copy: bool = True) -> None:
        """`copy=False` writes the tensors as they are: only for tensors nothing changes
        before the next `save` or `wait`."""
        self.wait()
        snapshot = detached_copy(state) if copy else state
        copies_done = []  # one event per GPU the copies came from, on that GPU's stream
        for device in cuda_devices(state) if copy else ():
            copies_done.append(torch.cuda.Event())
            copies_done[-1].record(torch.cuda.current_stream(device))

        def write() -> None:
            try:
                for event in copies_done:
                    event.synchronize()
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


FROZEN_FILE = "frozen.pt"


class RunCheckpoints:
    """A run's checkpoints/ folder: last.pt every epoch, best.pt, and frozen.pt.

    Tensors that training cannot change (frozen weights, the buffers of modules kept in eval
    mode) are written once per run to frozen.pt instead of every epoch: a frozen backbone
    would otherwise be copied and written again each time. last.pt holds everything else and
    names the frozen.pt entries it relies on, with that file's id; `read_checkpoint` joins
    them. best.pt is a hard link to the best epoch's last.pt, so it is never written twice.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.saver = BackgroundSaver()  # the next epoch trains while a checkpoint is written
        self.frozen_id: str | None = None
        self.frozen_names: frozenset[str] = frozenset()

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def write_frozen(self, model_state: dict[str, torch.Tensor], unchanging: set[str]) -> None:
        """Write frozen.pt, the `unchanging` entries of the model's state dict, while the first
        epoch trains: no copy is needed, as nothing changes them before the first `save`
        (unfreeze phases start at epoch 2 at the earliest)."""
        self.frozen_id = uuid.uuid4().hex
        tensors = {name: tensor for name, tensor in model_state.items() if name in unchanging}
        self.saver.save({"id": self.frozen_id, "tensors": tensors}, self.path(FROZEN_FILE),
                        copy=False)
        self.frozen_names = frozenset(tensors)

    def adopt(self, frozen_part: dict[str, Any] | None) -> None:
        """Go on with the frozen.pt a resumed run's checkpoint names (if any)."""
        if frozen_part:
            self.frozen_id, self.frozen_names = frozen_part["id"], frozenset(frozen_part["names"])

    def link_best(self) -> None:
        """best.pt is last.pt (a run killed between writing one and linking the other)."""
        link_atomic(self.path("last.pt"), self.path("best.pt"))

    def save(self, state: dict[str, Any], unchanging: set[str], best: bool) -> None:
        """Write last.pt (and link best.pt to it) in the background, without the entries
        frozen.pt holds and that are still `unchanging` (an unfreeze phase changes that)."""
        in_frozen_file = self.frozen_names & unchanging
        model = {name: tensor for name, tensor in state["model"].items()
                 if name not in in_frozen_file}
        state = {**state, "model": model, "frozen_part": {
            "file": FROZEN_FILE, "id": self.frozen_id, "names": sorted(in_frozen_file)}}
        self.saver.save(state, self.path("last.pt"), link_to=self.path("best.pt") if best else None)

    def wait(self) -> None:
        self.saver.wait()


def read_joined(path: str, key: str = "checkpoint") -> Any:
    """A .pt file loaded safely; for a checkpoint of this tool, its model state made whole
    again from frozen.pt beside it. A file names its frozen part, but only ever the
    frozen.pt in its own folder is read: a name that points elsewhere is refused."""
    state = load_safe(path, key)
    part = state.get("frozen_part") if isinstance(state, dict) else None
    if not part:
        return state
    if not (isinstance(part, dict) and part.get("file") == FROZEN_FILE
            and isinstance(part.get("id"), str) and isinstance(part.get("names"), list)
            and all(isinstance(name, str) for name in part["names"])
            and isinstance(state.get("model"), dict)):
        raise ConfigError(f"{key}={path!r}: its frozen_part entry is not one this tool writes "
                          f"(it must name {FROZEN_FILE} beside the file); refusing the file.")
    if not part["names"]:
        return state
    frozen_path = os.path.join(os.path.dirname(os.path.abspath(path)), FROZEN_FILE)
    if not os.path.isfile(frozen_path):
        raise ConfigError(f"{key}={path!r} keeps its frozen weights in {frozen_path}, which does "
                          "not exist: keep the checkpoints/ folder's files together.")
    frozen = load_safe(frozen_path, key)
    frozen = frozen if isinstance(frozen, dict) else {}
    tensors = frozen.get("tensors") if isinstance(frozen.get("tensors"), dict) else {}
    if frozen.get("id") != part["id"] or not set(part["names"]) <= set(tensors):
        raise ConfigError(f"{key}={path!r}: {frozen_path} belongs to another run (its id or "
                          "tensors do not match); keep each run's checkpoints/ folder together.")
    state["model"] = {**{name: tensors[name] for name in part["names"]}, **state["model"]}
    return state
