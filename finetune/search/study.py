"""The study: where it is stored, how it samples and prunes. Every worker, on this machine
or another, opens the same study by storage and name (load_if_exists)."""

import os
import random
import warnings
from typing import Any

from finetune.config.store import direction
from finetune.errors import ConfigError

SAMPLERS = ("tpe", "random", "qmc")
PRUNERS = ("none", "median", "hyperband", "successive_halving", "threshold")


def storage_url(settings: Any, sweep_dir: str) -> str:
    """hparams_search.storage, or by default a SQLite file in the sweep directory."""
    if settings.storage:
        return str(settings.storage)
    return f"sqlite:///{os.path.abspath(os.path.join(sweep_dir, 'optuna.db'))}"


def is_database(url: str) -> bool:
    return "://" in url


def open_storage(settings: Any, sweep_dir: str):
    """A database (SQLite, PostgreSQL, ...) with heartbeats, so that a dead worker's trial is
    failed after the grace period and retried once; or, for a path, a journal file (no
    heartbeats: a killed worker's trial stays running)."""
    import optuna

    # heartbeats outside Study.optimize are this tool's design (workers ask and tell)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    url = storage_url(settings, sweep_dir)
    if not is_database(url):
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(os.path.expanduser(url)))
        except OSError as error:
            raise ConfigError(f"hparams_search.storage={url!r} (a journal file) cannot be "
                              f"opened: {error}. Use a file path in a folder that exists and "
                              "every worker can write.") from error
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=settings.heartbeat_seconds, grace_period=settings.grace_seconds,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ImportError as error:
        raise ConfigError(f"hparams_search.storage={url!r} needs a database driver that is not "
                          f"installed ({error.__cause__ or error}); for PostgreSQL write "
                          "postgresql+psycopg2://... with the postgres extra installed "
                          "(pip install -e '.[postgres]').") from error
    except Exception as error:  # SQLAlchemy's errors: a server not reached, a bad URL, ...
        first = str(error).splitlines()[0]
        raise ConfigError(f"hparams_search.storage={url!r} cannot be opened: {first}. Use a "
                          "database URL the workers can reach (sqlite:///PATH, "
                          "postgresql+psycopg2://USER@HOST/DB) or a journal file path.") from error


def sampler(name: str, seed: int):
    """The sampler, seeded. TPE as a constant liar: a running trial counts as a bad result,
    so workers asking at once are not all sent to the same place."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return {"random": optuna.samplers.RandomSampler, "qmc": optuna.samplers.QMCSampler}[name](seed=seed)


def exists(storage: Any, name: str) -> bool:
    import optuna

    return name in optuna.study.get_all_study_names(storage)


def pruner(settings: Any, metric: str):
    """Optuna's pruner for hparams_search.pruner (`none`: every trial trains every epoch)."""
    import optuna

    name, warmup = settings.pruner, settings.pruner_warmup_epochs
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                           n_warmup_steps=warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if name == "threshold":
        bound = {"lower" if direction(metric) == "maximize" else "upper": settings.prune_threshold}
        return optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


def check_settings(settings: Any) -> None:
    problems = []
    if settings.sampler not in SAMPLERS:
        problems.append(f"hparams_search.sampler={settings.sampler!r} is not valid: use "
                        f"{', '.join(SAMPLERS)}.")
    if settings.pruner not in PRUNERS:
        problems.append(f"hparams_search.pruner={settings.pruner!r} is not valid: use "
                        f"{', '.join(PRUNERS)}.")
    if settings.pruner == "threshold" and settings.prune_threshold is None:
        problems.append("hparams_search.pruner='threshold' needs hparams_search.prune_threshold "
                        "(trials below it are pruned; above it when the metric is a loss).")
    for key in ("n_trials", "n_jobs", "heartbeat_seconds", "grace_seconds"):
        if settings[key] < 1:
            problems.append(f"hparams_search.{key}={settings[key]!r} is not valid: use 1 or more.")
    if settings.grace_seconds <= settings.heartbeat_seconds:
        problems.append(f"hparams_search.grace_seconds={settings.grace_seconds!r} is not valid: "
                        "use more than hparams_search.heartbeat_seconds "
                        f"({settings.heartbeat_seconds}), or live trials are failed.")
    if problems:
        raise ConfigError(" ".join(problems))


def open_study(storage: Any, settings: Any, metric: str, seed: int):
    """The study, made by the first worker (its sampler seeded with `seed`, so a search of
    one worker is repeatable) and joined by the others (each sampler seeded afresh: two
    workers with one seed would propose the same trials)."""
    import optuna

    if exists(storage, settings.study_name):
        seed = random.SystemRandom().randrange(2**31)
    return optuna.create_study(storage=storage,
                               study_name=settings.study_name, load_if_exists=True,
                               direction=direction(metric), sampler=sampler(settings.sampler, seed),
                               pruner=pruner(settings, metric))
