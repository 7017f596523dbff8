"""Loggers: where a run's numbers go besides the console and metrics.csv.

metrics.csv (one row per epoch, written by the trainer) is always there: that is
`logger=csv`, the default. `logger=tensorboard` adds TensorBoard event files, and
`logger=[tensorboard,mine]` any number of others. A logger is a class with the three
methods of `Logger`, named by `_target_` in conf/logger/<name>.yaml (as `<name>: {_target_:
..., its keys}`); a run builds each one with `run_dir` and `start_step` (the global step a
resumed run continues after, else 0) plus the file's keys. Only rank 0 logs under torchrun.

Steps are global optimizer steps (1, 2, ... across epochs); each epoch's numbers are logged
at the step that ends it, so every chart shares one x axis.
"""

import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from finetune.config import OPTIMIZED_METRICS, dotted_scalars
from finetune.errors import ConfigError
from finetune.hooks import Hook


class Logger(Protocol):
    log_every_n_steps: int  # 0: called for epochs only

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def build_loggers(configs: DictConfig, run_dir: str, start_step: int) -> list[Logger]:
    """The loggers `logger=...` names, built in order; a bad one is a ConfigError naming it."""
    from hydra.utils import instantiate

    loggers = []
    for name, entry in configs.items():
        try:
            loggers.append(instantiate(entry, run_dir=run_dir, start_step=start_step))
        except Exception as error:  # instantiate wraps what the class raised
            if isinstance(error.__cause__, ConfigError):
                raise error.__cause__ from None
            raise ConfigError(f"logger.{name} (_target_={entry.get('_target_')!r}) could not be "
                              f"built: {error}") from error
    return loggers


def check_loggers(configs: DictConfig) -> None:
    """At start-up, before anything is built: each _target_ imports, and what it needs (its
    class's `requires`, a module name) is installed."""
    import importlib.util

    from hydra.utils import get_class

    for name, entry in configs.items():
        try:
            cls = get_class(entry._target_)
        except Exception as error:
            raise ConfigError(f"logger.{name} (_target_={entry._target_!r}) cannot be imported: "
                              f"{error}. Give a class importable from PYTHONPATH.") from error
        needed = getattr(cls, "requires", None)
        if needed and importlib.util.find_spec(needed) is None:
            raise ConfigError(f"logger={name} needs the {needed} package: pip install -e "
                              f"'.[{needed}]' (or choose logger=csv).")


class TensorBoardLogger:
    """Event files in <run_dir>/tensorboard/: per-step training loss, per-epoch losses,
    accuracies and each optimizer group's learning rate, and at the end the hyperparameters
    with the final metrics (the HPARAMS tab). A resumed run purges what the killed run logged
    after its checkpoint, so no step appears twice."""

    requires = "tensorboard"  # the optional extra that provides it

    def __init__(self, run_dir: str, start_step: int = 0, log_every_n_steps: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install -e "
                              "'.[tensorboard]' (or choose logger=csv).") from error
        self.log_every_n_steps = log_every_n_steps
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # into this writer's own file (add_hparams would start a second run folder); the
        # metrics' values are scalars the caller logged under the same names
        for summary in hparams(params, metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def config_hparams(config: DictConfig) -> dict[str, Any]:
    """What the HPARAMS tab shows: every key of the resolved config (a run's has no hydra
    section), lists and null as text."""
    return dotted_scalars(OmegaConf.to_container(config, resolve=True))


def steps_between(logger: Logger) -> int:
    """How often a logger wants the training loss; 0 (per epoch only) if it does not say."""
    return getattr(logger, "log_every_n_steps", 0) or 0


FINAL_METRICS = OPTIMIZED_METRICS


class RunLog(Hook):
    """A trainer hook for everything rank 0 records beside metrics.csv: the loggers and, with
    plots on, curves.png redrawn after every epoch so it can be watched."""

    def __init__(self, loggers: list[Logger], steps_per_epoch: int, curves_path: str | None = None,
                 phase_epochs: Sequence[int] = ()):
        self.loggers, self.steps_per_epoch = loggers, steps_per_epoch
        self.curves_path, self.phase_epochs = curves_path, list(phase_epochs)
        self.plots = None
        if curves_path is not None:
            from finetune.plots import BackgroundPlots

            self.plots = BackgroundPlots()
        every = [steps_between(logger) for logger in loggers if steps_between(logger) > 0]
        self.every_n_steps = math.gcd(*every) if every else 0

    def on_train_batch_end(self, step: int, loss: Any) -> None:
        if not self.every_n_steps or step % self.every_n_steps:
            return  # reading the loss waits for the device: only when a logger wants it
        value = loss.item()
        for logger in self.loggers:
            if steps_between(logger) and step % steps_between(logger) == 0:
                logger.log_metrics({"train/loss_step": value}, step)

    def on_epoch_end(self, progress: Any, improved: bool) -> None:
        """After each epoch (its checkpoint written): `progress` is a trainer.Progress."""
        row = progress.history[-1]
        scalars = {"epoch": row.epoch, "train/loss": row.train_loss, "train/acc": row.train_acc,
                   "val/loss": row.val_loss, "val/acc": row.val_acc,
                   "val/balanced_acc": row.val_balanced_acc, "val/macro_f1": row.val_macro_f1,
                   "val/map": row.val_map, "val/micro_f1": row.val_micro_f1,
                   "epoch_seconds": row.seconds}
        scalars.update({f"lr/{group}": lr for group, lr in row.group_lrs.items()})
        for logger in self.loggers:
            logger.log_metrics(scalars, row.epoch * self.steps_per_epoch)
        if self.plots is not None:
            from finetune.plots import plot_curves

            self.plots.draw(plot_curves, self.curves_path, list(progress.history),
                            self.phase_epochs, progress.best_epoch)

    def finish(self, hparams: dict[str, Any], summary: dict[str, Any], step: int) -> None:
        """The hyperparameters with the run's final metrics (a finished run only)."""
        final = {f"final/{key}": summary[key] for key in FINAL_METRICS
                 if summary.get(key) is not None}
        for logger in self.loggers:
            logger.log_metrics(final, step)
            logger.log_hparams(hparams, final)

    def close(self) -> None:
        """Also waits for curves.png."""
        for logger in self.loggers:
            logger.close()
        if self.plots is not None:
            self.plots.wait()
