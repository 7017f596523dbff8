"""One worker: take the next trial, run it, tell the study, until the study has its
n_trials. Workers share nothing but the storage, so any number of them, on any machines,
work on one study without waiting for each other."""

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.errors import ConfigError
from finetune.search import pruning
from finetune.search.space import as_overrides, contains
from finetune.sweep import read_summary

log = logging.getLogger(__name__)

POLL_SECONDS = 2  # how often an idle worker looks for a trial to retry

RunTrial = Callable[[list[str], str, str | None], None]  # (overrides, job dir, resume from)


def counted(trials: list[Any]) -> list[Any]:
    """The trials n_trials counts: each failed trial that was retried is counted once (by its
    retry), and a surplus trial (asked after the study was full) not at all."""
    retried = {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}
    return [trial for trial in trials if trial.number not in retried
            and not trial.user_attrs.get("surplus")]


def study_is_full(trials: list[Any], n_trials: int) -> bool:
    from optuna.trial import TrialState

    kept = counted(trials)
    return len(kept) >= n_trials and not any(trial.state == TrialState.WAITING for trial in kept)


def others_running(trials: list[Any]) -> bool:
    from optuna.trial import TrialState

    return any(trial.state == TrialState.RUNNING for trial in trials)


def is_surplus(study: Any, trial: Any, n_trials: int) -> bool:
    """Two workers that both saw room for one more trial asked at once: the later is over."""
    numbers = sorted(other.number for other in counted(study.get_trials(deepcopy=False)))
    return trial.number not in numbers[:n_trials]


@dataclass
class Search:
    """What every trial of this worker shares."""

    study: Any
    storage: Any  # the study's storage (heartbeats go to it)
    space: dict[str, Any]  # key -> Optuna distribution
    n_trials: int
    base: list[str]  # the command line's overrides, each trial's values added to them
    sweep_dir: str
    metric: str  # optimized_metric
    run_trial: RunTrial


class Heartbeat:
    """Tells a database storage that this worker's trial lives, every heartbeat interval,
    from a thread (training keeps the main one busy)."""

    def __init__(self, storage: Any, trial: Any):
        from optuna.storages import RDBStorage

        self.storage, self.trial_id = storage, trial._trial_id
        self.interval = storage.get_heartbeat_interval() if isinstance(storage, RDBStorage) else None
        self.stopped = threading.Event()

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            threading.Thread(target=self.beat, daemon=True).start()
        return self

    def beat(self) -> None:
        while not self.stopped.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()


def resume_from(search: Search, trial: Any) -> str | None:
    """A retried trial's run directory (the dead attempt's, <sweep dir>/<its number>), when
    its checkpoint is there. The storage is a file: it gives a number, not a path."""
    failed = retried(search, trial).get("failed_trial")
    if type(failed) is not int or failed < 0:
        return None
    run_dir = os.path.join(search.sweep_dir, str(failed))
    return run_dir if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")) else None


def overrides_of(search: Search, trial: Any) -> list[str] | None:
    """The trial's values as overrides, if they are the search space's (a retried trial's
    come back from the storage, a file: nothing else may reach the command line)."""
    values = trial.params
    if values.keys() != search.space.keys() or not all(
            contains(distribution, values[key]) for key, distribution in search.space.items()):
        return None
    return [*search.base, *as_overrides(values)]


def tell(search: Search, trial: Any, run_dir: str) -> None:
    """The run's summary.json -> the trial's state: COMPLETE with its value, PRUNED, FAIL."""
    from optuna.trial import TrialState

    summary = read_summary(run_dir) or {"status": "failed"}
    for key in ("epochs_completed", "best_epoch", "seconds", "error"):
        if key in summary:
            trial.set_user_attr(key, summary[key])
    value = summary.get(search.metric)
    if summary["status"] == "ok" and isinstance(value, int | float) and value == value:
        search.study.tell(trial, value)
    elif summary["status"] == pruning.PRUNED:
        search.study.tell(trial, state=TrialState.PRUNED)
    else:
        search.study.tell(trial, state=TrialState.FAIL)


def retried(search: Search, trial: Any) -> dict[str, Any]:
    """Optuna's marks of a retry (failed_trial: the number of the trial it repeats)."""
    return search.storage.get_trial_system_attrs(trial._trial_id)


def run_one(search: Search, trial: Any) -> None:
    from optuna.trial import TrialState

    overrides = overrides_of(search, trial)
    if overrides is None:
        log.error("trial %d: its values %s are not in hparams_search.params; failed, not run",
                  trial.number, trial.params)
        search.study.tell(trial, state=TrialState.FAIL)
        return
    resumed = resume_from(search, trial)
    run_dir = os.path.abspath(resumed or os.path.join(search.sweep_dir, str(trial.number)))
    trial.set_user_attr("run_dir", run_dir)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    if resumed:
        log.info("trial %d retries trial %d, whose worker stopped: resuming %s", trial.number,
                 retried(search, trial)["failed_trial"], resumed)
    pruning.current_trial = trial
    try:
        with Heartbeat(search.storage, trial):
            search.run_trial(overrides, run_dir, resumed)
    except KeyboardInterrupt:  # failed, and queued again: the next start resumes it
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        search.study.tell(trial, state=TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(search.study, search.storage.get_trial(trial._trial_id))
        raise
    finally:
        pruning.current_trial = None
    tell(search, trial, run_dir)


def ask(search: Search) -> Any:
    """The next trial: a queued one (a retry, or one enqueued by hand) first, else a new one."""
    try:
        return search.study.ask(search.space)
    except ValueError as error:  # Optuna checks a queued trial's choices against the space
        raise ConfigError(f"study {search.study.study_name!r}: a queued trial's values are not "
                          f"in hparams_search.params ({error}). Its storage holds trials of "
                          "another search space: use a new study_name or storage.") from error


def work(search: Search) -> int:
    """Trials until the study is full; how many this worker ran."""
    from optuna.storages import RDBStorage, fail_stale_trials
    from optuna.trial import TrialState

    ran, heartbeats = 0, isinstance(search.storage, RDBStorage)
    while True:
        if heartbeats:
            fail_stale_trials(search.study)  # a dead worker's trial: failed, queued once more
        trials = search.study.get_trials(deepcopy=False)
        if study_is_full(trials, search.n_trials):
            if not (heartbeats and others_running(trials)):
                return ran
            # a trial still runs elsewhere: if its worker dies, this one retries it
            time.sleep(min(POLL_SECONDS, search.storage.get_heartbeat_interval()))
            continue
        trial = ask(search)
        if is_surplus(search.study, trial, search.n_trials):
            trial.set_user_attr("surplus", True)
            search.study.tell(trial, state=TrialState.FAIL)
            continue
        run_one(search, trial)
        ran += 1
