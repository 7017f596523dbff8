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

import logging
import math
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from finetune.config.schemas import OPTIMIZED_METRICS, dotted_scalars
from finetune.errors import ConfigError
from finetune.hooks import Hook
from finetune.state.files import atomic_write
from finetune.state.trust import load_class


class Logger(Protocol):
    log_every_n_steps: int  # 0: called for epochs only

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def build_loggers(configs: DictConfig, run_dir: str, start_step: int,
                  trust: Sequence[str] | None = None) -> list[Logger]:
    """The loggers `logger=...` names, built in order; a bad one is a ConfigError naming it.
    `trust` not None: the configs are a file's (trust.load_class)."""
    loggers = []
    for name, entry in configs.items():
        cls = load_class(f"logger.{name}._target_", entry._target_, trust)
        arguments = {key: value for key, value in OmegaConf.to_container(entry, resolve=True).items()
                     if key != "_target_"}
        try:
            loggers.append(cls(**arguments, run_dir=run_dir, start_step=start_step))
        except ConfigError:
            raise
        except Exception as error:
            raise ConfigError(f"logger.{name} (_target_={entry.get('_target_')!r}) could not be "
                              f"built: {error}") from error
    return loggers


def check_loggers(configs: DictConfig, trust: Sequence[str] | None = None) -> None:
    """At start-up, before anything is built: each _target_ imports, and what it needs (its
    class's `requires`, a module name) is installed."""
    import importlib.util

    for name, entry in configs.items():
        try:
            cls = load_class(f"logger.{name}._target_", entry._target_, trust)
        except ConfigError:
            raise
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
            if not math.isnan(value):  # not recorded (single-label mAP, multi-label accuracy)
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


RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id, as MLflow writes them
HYDRA_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")  # the <date> folder of Hydra's run and sweep dirs


def store_folder(run_dir: str) -> str:
    """Where the MLflow store goes when no tracking URI is given: above the date folder of
    Hydra's layouts (outputs/ for outputs/<date>/<time>, multirun/ for a sweep's
    multirun/<date>/<time>/<job>), else the folder holding the run directory (runs/ for
    hydra.run.dir=runs/a). Never the working directory: there, the run directory itself."""
    where = os.path.abspath(run_dir)
    parent = os.path.dirname(where)
    dates = [folder for folder in (parent, os.path.dirname(parent))
             if HYDRA_DATE.fullmatch(os.path.basename(folder))]
    folder = os.path.dirname(dates[0]) if dates else parent
    return where if os.path.realpath(folder) == os.path.realpath(os.getcwd()) else folder


def default_store(run_dir: str) -> tuple[str, str]:
    """The tracking URI and artifact folder without a tracking_uri: MLflow's own default is
    the working directory (./mlflow.db, ./mlruns), often a checkout; store_folder instead."""
    folder = store_folder(run_dir)
    return "sqlite:///" + os.path.join(folder, "mlflow.db"), os.path.join(folder, "mlartifacts")


def run_files(run_dir: str, with_checkpoints: bool, skip: Sequence[str] = ()) -> list[str]:
    """The run directory's files (not Hydra's .hydra/), checkpoints/ only if asked; none
    whose absolute path starts with one in `skip` (a store kept in the run directory)."""
    files, skip = [], tuple(skip)
    for parent, folders, names in os.walk(os.path.abspath(run_dir)):
        folders[:] = [name for name in folders if not name.startswith(".")
                      and (with_checkpoints or name != "checkpoints")
                      and not os.path.join(parent, name).startswith(skip)]
        files += [os.path.join(parent, name) for name in names if not name.startswith(".")
                  and not os.path.join(parent, name).startswith(skip)]
    return sorted(files)


class MLflowLogger:
    """An MLflow run per training run, in `experiment` at `tracking_uri` (null:
    $MLFLOW_TRACKING_URI, else mlflow.db with artifacts in mlartifacts/ beside it, in
    store_folder), named after the run directory: the per-step training loss, the per-epoch
    metrics, at the end the resolved config as params and the final metrics, and when the
    run closes (after the run's last file) its directory's files as artifacts (checkpoints/
    too with log_checkpoints). A resumed run goes on in the same MLflow run, whose id it
    keeps in <run_dir>/mlflow_run_id."""

    requires = "mlflow"

    def __init__(self, run_dir: str, start_step: int = 0, log_every_n_steps: int = 10,
                 tracking_uri: str | None = None, experiment: str = "finetune",
                 log_checkpoints: bool = False):
        try:
            import mlflow
        except ImportError as error:
            raise ConfigError("logger=mlflow needs the mlflow package: pip install -e "
                              "'.[mlflow]' (or choose logger=csv).") from error
        artifacts, self.skip = None, ()
        if tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
            tracking_uri, artifacts = default_store(run_dir)
            self.skip = (tracking_uri.removeprefix("sqlite:///"), artifacts)  # in the run dir
        self.client, self.run_dir = mlflow.MlflowClient(tracking_uri), run_dir
        self.log_every_n_steps, self.log_checkpoints = log_every_n_steps, log_checkpoints
        self.finished = False  # log_hparams ran: the run ended well
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifacts and pathlib.Path(artifacts).as_uri()))
        id_file = os.path.join(run_dir, "mlflow_run_id")
        saved = open(id_file).read().strip() if start_step and os.path.isfile(id_file) else ""
        if RUN_ID.fullmatch(saved):  # the file is untrusted: an id of MLflow's form only
            self.run_id = saved
            self.client.update_run(saved, status="RUNNING")
        else:
            where = os.path.abspath(run_dir)
            run = self.client.create_run(experiment_id, run_name=os.path.basename(where),
                                         tags={"finetune.run_dir": where})
            self.run_id = run.info.run_id
            with atomic_write(id_file) as handle:
                handle.write(self.run_id + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(name, float(value), now, step) for name, value in metrics.items()
                  if not math.isnan(value)]  # NaN: not recorded (multi-label accuracy, ...)
        self.client.log_batch(self.run_id, metrics=values)

    def log_hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        from mlflow.entities import Param

        # a resumed run's params were logged before, and MLflow keeps a param's first value:
        # one changed since (a raised trainer.max_epochs) is kept as a tag, resumed.<name>
        logged = self.client.get_run(self.run_id).data.params
        values = {name: str(value)[:6000] for name, value in params.items()}
        items = [Param(name, value) for name, value in values.items() if name not in logged]
        for start in range(0, len(items), 100):  # MLflow takes 100 params per request
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        for name, value in values.items():
            if name in logged and logged[name] != value:
                self.client.set_tag(self.run_id, f"resumed.{name}", value)
        self.finished = True

    def close(self) -> None:
        for path in run_files(self.run_dir, self.log_checkpoints, self.skip):
            folder = os.path.dirname(os.path.relpath(path, self.run_dir))
            self.client.log_artifact(self.run_id, path, folder or None)
        self.client.set_terminated(self.run_id, "FINISHED" if self.finished else "KILLED")


class WandbLogger:
    """A Weights & Biases run per training run in `project`, its files under
    <run_dir>/wandb/ (WANDB_MODE=offline keeps it there until `wandb sync`): the per-step
    training loss, the per-epoch metrics, the resolved config and the final metrics as the
    run's summary. A resumed run goes on in the same wandb run (its id is the run
    directory's, hashed)."""

    requires = "wandb"

    def __init__(self, run_dir: str, start_step: int = 0, log_every_n_steps: int = 10,
                 project: str = "finetune", entity: str | None = None, mode: str | None = None):
        try:
            import wandb
        except ImportError as error:
            raise ConfigError("logger=wandb needs the wandb package: pip install -e '.[wandb]' "
                              "(or choose logger=csv).") from error
        import hashlib

        self.log_every_n_steps, self.finished = log_every_n_steps, False
        run_id = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]
        self.run = wandb.init(project=project, entity=entity, dir=run_dir, mode=mode, id=run_id,
                              name=os.path.basename(os.path.abspath(run_dir)),
                              resume="allow" if start_step else None, reinit="create_new")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({name: value for name, value in metrics.items() if not math.isnan(value)},
                     step=step)

    def log_hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        self.run.config.update(params, allow_val_change=True)
        self.run.summary.update(metrics)
        self.finished = True

    def close(self) -> None:
        self.run.finish(exit_code=0 if self.finished else 1)  # 1: failed (Ctrl-C, an error)


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
    plots on, curves.png redrawn after every epoch so it can be watched. The run closes it
    last, however it ends, so the loggers that keep files get them all."""

    def __init__(self, loggers: list[Logger], steps_per_epoch: int, curves_path: str | None = None,
                 phase_epochs: Sequence[int] = ()):
        self.loggers, self.steps_per_epoch = loggers, steps_per_epoch
        self.curves_path, self.phase_epochs = curves_path, list(phase_epochs)
        self.plots = None
        if curves_path is not None:
            from finetune.show.plots import BackgroundPlots

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
                   "val/top5_acc": row.val_top5_acc, "epoch_seconds": row.seconds}
        scalars.update({f"lr/{group}": lr for group, lr in row.group_lrs.items()})
        scalars.update({f"lr_scale/{unit}": scale for unit, scale in row.lr_scales.items()})
        for logger in self.loggers:
            logger.log_metrics(scalars, row.epoch * self.steps_per_epoch)
        if self.plots is not None:
            from finetune.show.plots import plot_curves

            self.plots.draw(plot_curves, self.curves_path, list(progress.history),
                            self.phase_epochs, progress.best_epoch)

    def finish(self, hparams: dict[str, Any], summary: dict[str, Any], step: int) -> None:
        """The hyperparameters with the run's final metrics (a finished run only)."""
        final = {f"final/{key}": summary[key] for key in FINAL_METRICS
                 if summary.get(key) is not None}
        for logger in self.loggers:
            logger.log_metrics(final, step)
            logger.log_hparams(hparams, final)

    def on_fit_end(self, progress: Any) -> None:
        """curves.png's last drawing, before the run draws its other pictures."""
        self.wait_for_plots()

    def wait_for_plots(self) -> None:
        if self.plots is not None:
            self.plots.wait()
            self.plots = None

    def close(self) -> None:
        """The run calls this after it has written its last file (train.log's closing lines
        included, flushed here): a logger may keep the run's files."""
        self.wait_for_plots()
        for handler in logging.getLogger().handlers:
            handler.flush()
        for logger in self.loggers:
            logger.close()
