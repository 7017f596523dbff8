"""A trial's epochs reported to the study: after each epoch the optimized metric as it
stands (the best so far for best_*, the epoch's own for last_*) goes to `trial.report`;
when the pruner says stop, the run ends after that epoch as an early stop does, its
summary.json saying `pruned` (run.summarize) and the study recording PRUNED."""

import logging
import math
from typing import Any

from finetune.hooks import Hook

log = logging.getLogger(__name__)

PRUNED = "pruned"  # Progress.stop_reason starts with it: the summary's status is `pruned`

current_trial: Any = None  # the Optuna trial this process runs now (search/worker.py sets it)


def metric_so_far(history: list[Any], metric: str) -> float:
    """optimized_metric over the epochs so far, as summary.json will hold it."""
    which, score = metric.split("_", 1)
    values = [getattr(row, score) for row in history if not math.isnan(getattr(row, score))]
    if not values:
        return math.nan
    if which == "last":
        return values[-1]
    return min(values) if score.endswith("loss") else max(values)


class TrialReport(Hook):
    def __init__(self, trial: Any, metric: str):
        self.trial, self.metric = trial, metric

    def on_fit_start(self, progress: Any) -> None:
        pruner = type(self.trial.study.pruner).__name__
        log.info("search: trial %d of study %r; %s goes to the study after each epoch (%s)",
                 self.trial.number, self.trial.study.study_name, self.metric,
                 "no pruning" if pruner == "NopPruner" else f"pruner: {pruner}")

    def on_epoch_end(self, progress: Any, improved: bool) -> None:
        value = metric_so_far(progress.history, self.metric)
        if math.isnan(value):
            return
        self.trial.report(value, progress.epoch)
        if progress.stop_reason is None and self.trial.should_prune():
            progress.stop_reason = (f"{PRUNED} by the study's pruner after epoch {progress.epoch} "
                                    f"({self.metric} {value:.4f})")
            log.info("%s", progress.stop_reason)


def trial_report(metric: str) -> TrialReport | None:
    """The hook for the trial this process runs, if it runs one."""
    return None if current_trial is None else TrialReport(current_trial, metric)
