"""Command line: `python train.py ...` and the `finetune` console script run this.

torch is imported only once a run starts, so `--help` stays quick.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from finetune.config.overrides import check_command_line
from finetune.config.store import register_schemas
from finetune.errors import ConfigError, Interrupted, TrainingFailed
from finetune.state.resume import with_resume_dir
from finetune.state.run_dirs import check_fresh_run_dir, check_writable
from finetune.sweep import finished_result, record_failure, set_aside_failed_attempt
from finetune.train.distributed import launch_notes, launched_by_torchrun, leave

log = logging.getLogger(__name__)

register_schemas()

# conf/ sits next to the package in the checkout (an editable install points here too).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def exit_with(error: Exception, code: int = 2) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


class CheckRunDir(Callback):
    """Runs before Hydra creates the run directory and writes .hydra/ into it, so a refused
    run changes nothing: the directory must be writable and (unless resuming) hold no run."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(config.hydra.run.dir)
            # resuming writes into its own run on purpose; under torchrun rank 0 checks
            if not config.get("resume") and os.environ.get("RANK", "0") == "0":
                check_fresh_run_dir(config.hydra.run.dir)
        except ConfigError as error:
            exit_with(error)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(config.hydra.sweep.dir, key="hydra.sweep.dir")
        except ConfigError as error:
            exit_with(error)


def compose_unresolved(overrides: list[str]) -> dict:
    """The config these overrides give, interpolations kept (`T_max: ${trainer.max_epochs}`
    stays a reference, so raising max_epochs changes that key only)."""
    from hydra import compose

    return OmegaConf.to_container(compose(config_name="config", overrides=overrides))


def describe_config(cfg: DictConfig) -> str:
    """The groups chosen and the keys that differ from those groups' defaults."""
    from hydra import compose

    from finetune.show.console import app_choices, choice_overrides, config_view

    choices = app_choices(dict(HydraConfig.get().runtime.choices))
    defaults = compose(config_name="config", overrides=choice_overrides(choices))
    return config_view(choices, cfg, defaults)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    from finetune.threads import share_cores

    run_dir = HydraConfig.get().runtime.output_dir
    overrides = list(HydraConfig.get().overrides.task)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    if in_sweep:
        finished = finished_result(run_dir, overrides)
        if finished is not None:
            log.info("already finished in %s (%s=%s): skipped", run_dir, cfg.optimized_metric,
                     finished.get(cfg.optimized_metric))
            return finished.get(cfg.optimized_metric)
        set_aside_failed_attempt(run_dir)
        shared = share_cores(HydraConfig.get().launcher)
        if shared:
            log.info("%s", shared)
    try:
        return start(cfg, run_dir, overrides)
    except Interrupted:
        raise  # the run has said where it stopped and written its summary
    except KeyboardInterrupt:
        record_failure(run_dir, overrides, "interrupted before training started", "interrupted")
        raise
    except Exception as error:
        expected = isinstance(error, ConfigError | TrainingFailed)
        # summary.json says failed and why, unless the run wrote its own (or is an older
        # run, resumed); train.log holds the error too, so a failed start is explained
        record_failure(run_dir, overrides, error if expected else
                       RuntimeError(f"{type(error).__name__}: {error}"))
        if in_sweep and not cfg.fail_fast:  # recorded; the other jobs go on
            log.error("job failed: %s", error, exc_info=not expected)
            return float("nan")  # a failed trial to Optuna
        log_to_file(f"error: {error}", exc_info=not expected)
        if not expected:
            raise  # a bug, or the machine: Hydra shows it (HYDRA_FULL_ERROR=1 for all of it)
        exit_with(error, code=2 if isinstance(error, ConfigError) else 1)


def start(cfg: DictConfig, run_dir: str, overrides: list[str]) -> float | None:
    """Say what runs, then run it: a new run's config, a resumed run's saved one, or (to
    evaluate or predict) the checkpoint, which run_inference describes."""
    from finetune.run import run
    from finetune.state.resume import load_last, resumed_config

    saved = None
    for note in launch_notes():
        log.info("%s", note)
    if cfg.resume:
        saved = load_last(cfg.resume)
        cfg = resumed_config(cfg.resume, saved["run"], overrides, compose_unresolved)
        overrides = saved["run"]["overrides"]
        log.info("config: the resumed run's, %s", f"with its overrides: {' '.join(overrides)}"
                 if overrides else "with no overrides (the defaults of its version)")
    elif cfg.mode in ("train", "lr_find"):
        log.info("%s", describe_config(cfg))
    return run(cfg, run_dir, overrides, checkpoint=saved)


def log_to_file(message: str, exc_info: bool = False) -> None:
    """Into train.log only (Hydra's file handler): the console gets the message once, from
    exit_with or from Hydra's own report."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None,
                               sys.exc_info() if exc_info else None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def search_command(argv: list[str]) -> int | None:
    """`-m` with an hparams_search option: the search's exit code; None for a grid sweep."""
    from hydra import compose, initialize_config_dir

    if not {"-m", "--multirun"} & set(argv) or not any(
            item.lstrip("+").startswith("hparams_search=") for item in argv):
        return None
    overrides = [item for item in argv if item not in ("-m", "--multirun")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    if cfg.get("hparams_search") is None:
        return None
    from finetune.config.validation import validate
    from finetune.search.driver import search

    validate(cfg)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sweep_dir = str(cfg.hydra.sweep.dir)
    check_writable(sweep_dir, key="hydra.sweep.dir")
    os.makedirs(sweep_dir, exist_ok=True)
    base = [item for item in overrides if not item.startswith("hydra.sweep.dir=")]
    return search(cfg, argv, base, sweep_dir, run_trial)


def run_trial(overrides: list[str], run_dir: str, resume: str | None) -> None:
    """One trial of a search in this process: `python train.py -m OVERRIDES` as a sweep of
    one job into `run_dir` (a retried trial: `python train.py resume=RUN_DIR`)."""
    sweep_dir, number = os.path.split(run_dir)
    root = logging.getLogger()
    handlers, level, saved_argv = root.handlers[:], root.level, sys.argv
    try:
        sys.argv = (with_resume_dir(["train.py", f"resume={resume}"]) if resume else
                    ["train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}",
                     f"hydra.sweep.subdir={number}"])
        hydra_main()
    except ConfigError as error:  # a retried trial's run directory that cannot be resumed
        log.error("trial in %s cannot resume: %s", run_dir, error)
    except SystemExit:  # a refused trial: its summary.json says why
        pass
    finally:
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:], sys.argv = handlers, saved_argv
        root.setLevel(level)


def main() -> float | None:
    """`python train.py ...` and the `finetune` console script (`finetune cache`: the
    caches' sizes, or clearing them)."""
    if sys.argv[1:2] == ["cache"]:
        from finetune.cache_command import main as cache_main

        sys.exit(cache_main(sys.argv[2:]))
    try:
        sys.argv = with_resume_dir(sys.argv)
        check_command_line(sys.argv, CONFIG_DIR)
        if launched_by_torchrun():
            from finetune.launch import torchrun_argv

            sys.argv = torchrun_argv(sys.argv)
    except ConfigError as error:
        exit_with(error)
    try:
        searched = search_command(sys.argv[1:])
    except ConfigError as error:
        exit_with(error)
    except KeyboardInterrupt:
        print("search interrupted: the running trials are queued again; the same command "
              "with the same hydra.sweep.dir (or storage) goes on", file=sys.stderr)
        sys.exit(130)
    if searched is not None:
        sys.exit(searched)
    try:
        return hydra_main()
    except Interrupted:
        sys.exit(130)  # the run has said where it stopped and how to go on
    except KeyboardInterrupt:
        print("interrupted before training started: nothing new was saved", file=sys.stderr)
        sys.exit(130)
    finally:
        if launched_by_torchrun():
            leave()
