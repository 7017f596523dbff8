"""The checkpoint's schema, in one place: what a checkpoint holds, capture next to restore,
the format number, the upgrade of older formats, and the checks that treat a file as the
untrusted input it is (finetune/state/trust.py has the rule for the config inside).

Format 3, a dict with named keys:
  format       3
  run          RunRecord: the resolved config, the command-line overrides, the class names
               and the input spec: enough to rebuild the model and use it
  model        the Net's state dict, less what frozen.pt holds (saver.RunCheckpoints)
  frozen_part  {file, id, names}: the frozen.pt entries `model` relies on
  state        {part: state dict} for each stateful part of the run (run.stateful_parts),
               restored in the order captured: unfreeze (first: it adds optimizer groups),
               optimizer, scheduler, scaler, rng, progress, feature_cache

Format 2 (the release before) kept the same things under flat keys; `upgrade` maps it.
"""

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from finetune.errors import ConfigError
from finetune.hooks import Hook
from finetune.state.files import save_atomic
from finetune.state.saver import FROZEN_FILE, RunCheckpoints, read_joined
from finetune.state.trust import check_plain

FORMAT = 3
READABLE_FORMATS = (2, 3)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunRecord:
    """What a checkpoint says about its run (plain values, loadable with weights_only)."""

    config: dict[str, Any]  # resolved, with no hydra section
    overrides: list[str]
    class_names: list[str]
    input_spec: dict[str, Any]  # model.InputSpec.to_dict()
    torch_threads: int | None = None  # CPU results depend on it (None: saved before it was kept)
    world_size: int | None = None  # processes under torchrun (1 alone; None: not kept then)
    auto_frozen: list[str] | None = None  # the stages freeze=auto:select chose, for a resume


def capture(net: nn.Module, parts: dict[str, Stateful], record: RunRecord) -> dict[str, Any]:
    """A checkpoint of the run as it is now (the tensors as they are: saver copies them)."""
    return {"format": FORMAT, "run": asdict(record), "model": net.state_dict(),
            "state": {name: part.state_dict() for name, part in parts.items()}}


def restore(checkpoint: dict[str, Any], net: nn.Module, parts: dict[str, Stateful],
            source: str) -> None:
    """Put a built run back where `checkpoint` (upgraded) left it. A part that does not fit
    is an error naming it, not a traceback."""
    states = checkpoint["state"]
    missing = [name for name in parts if name not in states]
    if missing:
        raise ConfigError(f"{source}: its checkpoint has no state for {', '.join(missing)}; "
                          "it was written by another version of this tool. Start a new run.")
    for name, part in [("model", net), *parts.items()]:
        try:
            part.load_state_dict(checkpoint["model"] if name == "model" else states[name])
        except ConfigError:
            raise
        except Exception as error:
            raise ConfigError(f"{source}: its checkpoint's {name} state does not fit this run "
                              f"({type(error).__name__}: {error}). Start a new run.") from error


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A format-2 checkpoint (flat keys, phases counted by `unfreeze_phase`) as format 3."""
    if checkpoint.get("format") != 2:
        return checkpoint
    old = checkpoint
    return {"format": FORMAT, "frozen_part": old.get("frozen_part"), "model": old["model"],
            "run": {key: old[key] for key in ("config", "overrides", "class_names", "input_spec")},
            "state": {"unfreeze": {"applied": old["unfreeze_phase"], "trainable": old["trainable"]},
                      "optimizer": old["optimizer"], "scheduler": old["scheduler"],
                      "scaler": old["scaler"], "rng": old["rng"], "progress": old["progress"],
                      "feature_cache": {"key": old["feature_cache_key"]}}}


def averaged_weights(model: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The average's full state dict: a checkpoint's model weights, overlaid with its EMA
    entries."""
    return {**model, **state["weights"]}


def inference_weights(checkpoint: dict[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """What a saved run predicts with: the EMA weights where it kept an average."""
    ema = checkpoint.get("state", {}).get("ema")
    if ema is None:
        return checkpoint["model"]
    weights = ema.get("weights") if isinstance(ema, dict) else None
    if not isinstance(weights, dict) or not all(
            isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in weights.items()):
        raise ConfigError(f"{source}: its ema entry is not a state dict of tensors; the file is "
                          "damaged or not this tool's.")
    return averaged_weights(checkpoint["model"], ema)


def read_run_checkpoint(path: str, key: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint a run of this tool wrote, upgraded to this format, with its model state
    whole and its shape checked; anything else is a ConfigError naming `key` and the file."""
    return checked(read_joined(path, key), f"{key}={path!r}")


def checked(checkpoint: Any, source: str) -> dict[str, Any]:
    """The loaded file as a checkpoint of this format, or a ConfigError naming `source`."""
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        raise ConfigError(f"{source} is not a checkpoint written by a run of this tool (it has "
                          "no format or saved config); give a run's checkpoints/last.pt or best.pt.")
    if checkpoint["format"] not in READABLE_FORMATS:
        raise ConfigError(f"{source} has checkpoint format {checkpoint['format']!r}; this "
                          f"version reads formats {', '.join(map(str, READABLE_FORMATS))}.")
    try:
        checkpoint = upgrade(checkpoint)
        record = RunRecord(**checkpoint["run"])
        kinds = {"config": dict, "overrides": list, "class_names": list, "input_spec": dict}
        wrong = [name for name, kind in kinds.items() if not isinstance(getattr(record, name), kind)]
        wrong += [name for name in ("torch_threads", "world_size")
                  if getattr(record, name) is not None and type(getattr(record, name)) is not int]
        wrong += [] if isinstance(checkpoint["model"], dict) else ["model"]
        wrong += [] if isinstance(checkpoint["state"], dict) else ["state"]
    except (KeyError, TypeError) as error:
        raise ConfigError(f"{source}: a checkpoint of format {checkpoint['format']} whose "
                          f"entries do not fit it ({type(error).__name__}: {error}); the file is "
                          "damaged or not this tool's.") from error
    if wrong or not all(isinstance(name, str) for name in record.class_names):
        raise ConfigError(f"{source}: its entries {', '.join(wrong) or 'class_names'} are not "
                          "what this tool writes; the file is damaged or not this tool's.")
    check_plain(record.config, source)
    check_plain(record.overrides, source, "overrides")
    return checkpoint


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """backbone.checkpoint: a plain state dict, or the model of a checkpoint this tool wrote
    (nothing else in it is used), with the backbone's keys."""
    key = "backbone.checkpoint"
    state = read_joined(path, key)
    if isinstance(state, dict) and "format" in state:
        state = checked(state, f"{key}={path!r}")["model"]
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # {"model": state dict, ...}, as many training scripts save
    if not isinstance(state, dict) or not all(
            isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state.items()):
        raise ConfigError(f"{key}={path!r} holds a {type(state).__name__} that is not a state "
                          "dict (names to tensors).")
    if any(name.startswith("pretrained.") for name in state):
        state = {name.removeprefix("pretrained."): value for name, value in state.items()
                 if name.startswith("pretrained.")}
    return state


class CheckpointHook(Hook):
    """A trainer hook that writes checkpoints/ at the end of every epoch: the sum of the
    run's parts (`capture`), last.pt and best.pt, with frozen.pt written once per run (or,
    resuming, the one the checkpoint names adopted)."""

    def __init__(self, run_dir: str, net: nn.Module, parts: dict[str, Stateful],
                 record: RunRecord, unchanging: Any, resumed: dict[str, Any] | None = None):
        self.folder = RunCheckpoints(os.path.join(run_dir, "checkpoints"))
        self.net, self.parts, self.record = net, parts, record
        self.unchanging = unchanging  # net -> the state entries training cannot change now
        self.resumed = resumed  # the checkpoint a resumed run goes on from, else None

    def on_fit_start(self, progress: Any) -> None:
        if self.resumed is None:
            self.folder.write_frozen(self.net.state_dict(), self.unchanging(self.net))
            return
        self.folder.adopt(self.resumed.get("frozen_part"))
        if progress.best_epoch == progress.epoch:  # killed between last.pt and linking best.pt
            self.folder.link_best()

    def on_epoch_end(self, progress: Any, improved: bool) -> None:
        self.folder.save(capture(self.net, self.parts, self.record), self.unchanging(self.net),
                         best=improved)

    def on_fit_end(self, progress: Any) -> None:  # also on Ctrl-C: the last one is finished
        self.folder.wait()


def keep_checkpoints(run_dir: str, policy: str) -> str | None:
    """What a finished run keeps of checkpoints/ (trainer.checkpoints), and the file to use
    it by (None: nothing kept). `all`: last.pt (resumable), best.pt and frozen.pt as
    written; `last`: last.pt and frozen.pt; `best`: best.pt alone, as the weights it
    predicts with and the run's record (load_model, evaluate, predict, export, calibrate
    read it; nothing to resume: a sweep's jobs keep this much); `none`: nothing."""
    folder = os.path.join(run_dir, "checkpoints")
    best, last = os.path.join(folder, "best.pt"), os.path.join(folder, "last.pt")
    if policy == "all":
        return best
    if policy == "last":
        os.remove(best)
        return last
    if policy == "none":
        shutil.rmtree(folder)
        return None
    checkpoint = read_run_checkpoint(best)
    kept = {"format": FORMAT, "run": checkpoint["run"], "state": {},
            "model": inference_weights(checkpoint, best)}
    if "calibration" in checkpoint:
        kept["calibration"] = checkpoint["calibration"]
    save_atomic(kept, best)  # a file of its own: no longer last.pt's hard link
    for name in ("last.pt", FROZEN_FILE):
        os.remove(os.path.join(folder, name))
    return best
