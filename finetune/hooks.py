"""The moments of the epoch loop (train/trainer.py's fit) that a part of training can act at.

A training feature (gradual unfreezing, checkpoints, loggers, plots, the DDP re-wrap, ...)
is a `Hook` that overrides the moments it needs; fit calls every hook at each moment, in
the order given. A hook that remembers something across epochs also has `state_dict()` /
`load_state_dict()` and is one of the run's stateful parts (run.stateful_parts), so the
checkpoint holds it. Smaller than Lightning's Callback
on purpose: only the moments this project uses.
"""

from typing import Any  # no torch import: the command line imports this before a run starts


class Hook:
    def on_fit_start(self, progress: Any) -> None:
        """Before the first epoch this process trains (after a resume's restore)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before epoch `epoch` (1-based) trains."""

    def on_train_batch_end(self, step: int, loss: Any) -> None:
        """After optimizer step `step` (global, 1-based); `loss` is the step's loss tensor, on the
        device: reading it waits for the device, so read it only when needed."""

    def on_validation_start(self) -> None:
        """After an epoch's training, before its validation pass."""

    def on_validation_end(self) -> None:
        """After the validation pass, before the schedule steps."""

    def on_epoch_end(self, progress: Any, improved: bool) -> None:
        """After an epoch's training, validation and schedule step; `progress` has its row."""

    def on_fit_end(self, progress: Any) -> None:
        """When training stops, finished or not (Ctrl-C, a failure): finish what is pending."""
