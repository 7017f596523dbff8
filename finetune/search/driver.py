"""`python train.py -m hparams_search=... [overrides]`: open the study, start the local
workers (hparams_search.n_jobs: this process and n_jobs - 1 more, each with its share of
the cores), work until the study is full, then sum up.

The same command started again, or on another machine with the same storage and study
name, adds workers to the same study: the trials already there count towards n_trials."""

import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from omegaconf import DictConfig

from finetune.errors import ConfigError
from finetune.search import study as studies
from finetune.search.results import summarize
from finetune.search.space import distributions
from finetune.search.worker import RunTrial, Search, work
from finetune.sweep import sweep_plots
from finetune.threads import machine_cores

log = logging.getLogger(__name__)

WORKER = "FINETUNE_SEARCH_WORKER"  # set in the workers this command starts: 1, 2, ...
READY_WAIT_SECONDS = 600  # the longest the first worker waits for the others to start


def check_base(settings: Any, base: list[str]) -> None:
    """The command line may not set a key the search samples (Hydra would get it twice)."""
    searched = {key for key in settings.params}
    clashing = [item for item in base if item.split("=", 1)[0].lstrip("+~") in searched]
    if clashing:
        raise ConfigError(f"{', '.join(clashing)}: the search samples "
                          f"{'these keys' if len(clashing) > 1 else 'this key'} "
                          "(hparams_search.params); drop it from the command line, or from "
                          "hparams_search.params to fix it.")


def start_workers(count: int, argv: list[str], sweep_dir: str, threads: int) -> list[subprocess.Popen]:
    """`count` more workers: the same command in new processes, into the same sweep directory."""
    argv = [item for item in argv if not item.startswith("hydra.sweep.dir=")]
    command = [sys.executable, "-c", "from finetune.cli import main; main()", *argv,
               f"hydra.sweep.dir={sweep_dir}"]
    workers = []
    for index in range(1, count + 1):
        env = {**os.environ, WORKER: str(index)}
        env.setdefault("OMP_NUM_THREADS", str(threads))
        workers.append(subprocess.Popen(command, env=env))
    return workers


def ready_file(sweep_dir: str, worker: int) -> str:
    return os.path.join(sweep_dir, ".workers", f"ready-{worker}")


def wait_for(others: list[subprocess.Popen], sweep_dir: str) -> None:
    """Start together: the local workers import torch and open the study while this one
    does the same, then all take trials (so the first does not take several before the
    others exist). A worker that exits or is slow is not waited for past the limit."""
    import torch  # noqa: F401  (the import the others are doing: done meanwhile, not after)

    deadline = time.monotonic() + READY_WAIT_SECONDS
    pending = dict(enumerate(others, start=1))
    while pending and time.monotonic() < deadline:
        pending = {index: process for index, process in pending.items()
                   if process.poll() is None and not os.path.exists(ready_file(sweep_dir, index))}
        time.sleep(0.1)


def share_cores(jobs: int) -> int:
    """This process's torch threads when `jobs` workers share the machine."""
    threads = max(1, machine_cores() // jobs)
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)
        log.info("torch threads: %d (%d cores shared by %d workers)", threads, machine_cores(), jobs)
    return threads


def search(cfg: DictConfig, argv: list[str], base: list[str], sweep_dir: str,
           run_trial: RunTrial) -> int:
    """Run the search; the exit code (1 when a trial failed)."""
    settings, metric = cfg.hparams_search, cfg.optimized_metric
    studies.check_settings(settings)
    check_base(settings, base)
    space = distributions(dict(settings.params))
    worker = int(os.environ.get(WORKER, "0"))
    storage = studies.open_storage(settings, sweep_dir)
    study = studies.open_study(storage, settings, metric, cfg.seed)
    if worker == 0:
        log.info("search: study %r in %s, %d trials, %s sampler, pruner %s, %d local workers",
                 settings.study_name, studies.storage_url(settings, sweep_dir), settings.n_trials,
                 settings.sampler, settings.pruner, settings.n_jobs)
    threads = share_cores(settings.n_jobs if worker == 0 else 1)
    if worker == 0:
        shutil.rmtree(os.path.dirname(ready_file(sweep_dir, 0)), ignore_errors=True)
    others = start_workers(settings.n_jobs - 1, argv, sweep_dir, threads) if worker == 0 else []
    if worker:  # ready: torch imported, the study open
        import torch  # noqa: F401

        os.makedirs(os.path.dirname(ready_file(sweep_dir, worker)), exist_ok=True)
        open(ready_file(sweep_dir, worker), "w").close()
    try:
        wait_for(others, sweep_dir)
        work(Search(study, storage, space, settings.n_trials, base, sweep_dir, metric, run_trial))
    finally:
        for other in others:
            other.wait()
    if worker:
        return 0
    rows = summarize(study, settings, space, base, sweep_dir, metric, sweep_plots(cfg.plots))
    failed = [row for row in rows if row["state"] not in ("complete", "pruned")]
    if failed:
        print(f"{len(failed)} of {len(rows)} trials did not finish; the same command with "
              f"hydra.sweep.dir={sweep_dir} goes on (a stopped trial is resumed once).",
              file=sys.stderr)
    return 1 if failed else 0

