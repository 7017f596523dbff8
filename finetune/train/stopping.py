"""Early stopping (trainer.early_stopping): ends training once the monitored validation
metric has not improved for `patience` epochs.

It keeps no state of its own: how long the run has waited follows from the epochs'
metrics, which the checkpoint holds (Progress.history), so a resumed run goes on counting
where it stopped. The decision is Progress.stop_reason, saved with the epoch it ended.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune.hooks import Hook

log = logging.getLogger(__name__)


@dataclass
class EarlyStopping(Hook):
    patience: int
    monitor: str = "val_loss"  # val_loss (lower is better) | val_acc
    min_delta: float = 0.0  # an improvement must be larger than this

    def improves(self, value: float, best: float) -> bool:
        if self.monitor == "val_loss":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def waited(self, history: Sequence[Any]) -> tuple[int, float, int]:
        """Epochs since the last improvement, the best value and its epoch."""
        best, best_epoch = None, 0
        for row in history:
            value = getattr(row, self.monitor)
            if best is None or self.improves(value, best):
                best, best_epoch = value, row.epoch
        return history[-1].epoch - best_epoch, best, best_epoch

    def on_epoch_end(self, progress: Any, improved: bool) -> None:
        waited, best, best_epoch = self.waited(progress.history)
        if waited >= self.patience:
            progress.stop_reason = (
                f"early stopping: {self.monitor} has not improved by more than "
                f"{self.min_delta:g} for {waited} epochs (best {best:.4f} at epoch {best_epoch})")
            log.info("%s; stopped after epoch %d", progress.stop_reason, progress.epoch)


def early_stopping(cfg: Any) -> EarlyStopping | None:
    """The hook trainer.early_stopping asks for, or None when patience is null."""
    if cfg.patience is None:
        return None
    return EarlyStopping(cfg.patience, cfg.monitor, cfg.min_delta)
