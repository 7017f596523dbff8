"""Sweeps (`python train.py -m ...`): a results table at the end, failed jobs recorded rather
than fatal, and finished jobs skipped when the same sweep runs again into the same folder.

Each job writes its usual run directory, `<sweep dir>/<job number>/`, whose summary.json
holds the job's overrides, status and result. At the end `SweepSummary` (a Hydra callback,
so it also runs after Optuna or a parallel launcher) gathers them into
`<sweep dir>/summary.csv`, best first, and prints the same table.
"""

import csv
import json
import logging
import os
import shutil
import statistics
import sys
import time
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.config.store import direction
from finetune.errors import ConfigError
from finetune.state.files import atomic_write, spreadsheet_cell
from finetune.state.run_dirs import RUN_FILES

log = logging.getLogger(__name__)

COLUMNS = ["job", "status", "metric", "value", "best_epoch", "seconds", "overrides", "error",
           "setting_mean", "setting_std", "setting_n"]
FINISHED = ("ok", "pruned")  # a run's status when it ended well (pruned: by a search's pruner)
REPEATS = ("data.fold=", "seed=")  # overrides that repeat one setting: grouped, mean +- std


SUMMARY_MAX_BYTES = 1 << 20  # a run writes a few hundred bytes
SUMMARY_TYPES = {"status": str, "overrides": list, "error": str, "stop_reason": str,
                 "best_epoch": int, "epochs_completed": int, "seconds": int | float}


def read_summary(job_dir: str) -> dict[str, Any] | None:
    """A run's summary.json, or None where there is none or it is not one this tool writes
    (a file: its entries are checked before anything reads them)."""
    path = os.path.join(job_dir, "summary.json")
    try:
        if os.path.getsize(path) > SUMMARY_MAX_BYTES:
            return None
        with open(path) as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        return None
    wrong = [key for key, kind in SUMMARY_TYPES.items()
             if key in summary and not isinstance(summary[key], kind)]
    wrong += [key for key, value in summary.items() if key.startswith(("best_", "last_"))
              and key != "best_epoch" and not isinstance(value, int | float | None)]
    if wrong or not all(isinstance(item, str) for item in summary.get("overrides", [])):
        return None
    return summary


def read_overrides(path: str) -> list[str]:
    """A job's .hydra/overrides.yaml as plain text: never resolved, so a `${...}` in the
    file stays text (OmegaConf would resolve it: read the environment, call resolvers)."""
    try:
        with open(path) as handle:
            overrides = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return []
    return [str(item) for item in overrides] if isinstance(overrides, list) else []


def finished_result(job_dir: str, overrides: list[str]) -> dict[str, Any] | None:
    """The summary of this very job (same overrides) if it already finished well."""
    summary = read_summary(job_dir)
    if summary and summary.get("status") in FINISHED and summary.get("overrides") == overrides:
        return summary
    return None


def set_aside_failed_attempt(job_dir: str) -> None:
    """A job that failed (or was killed) before runs again; keep what it wrote, moved into
    attempt-<time>/, so nothing is lost and the job directory is fresh."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(job_dir, name))]
    if not found:
        return
    summary = read_summary(job_dir)
    if summary is not None and summary.get("status") in FINISHED:
        return  # another job's finished result: left alone, the run refuses the directory
    attempt = os.path.join(job_dir, time.strftime("attempt-%Y%m%d-%H%M%S"))
    os.makedirs(attempt)
    for name in found:
        shutil.move(os.path.join(job_dir, name), attempt)
    log.info("an earlier attempt of this job failed; its files moved to %s", attempt)


def record_failure(job_dir: str, overrides: list[str], error: BaseException | str,
                   status: str = "failed") -> None:
    """summary.json for a run or job that stopped before it could write its own, unless
    the directory already has one (the run's own, or a resumed run's); rank 0 only."""
    from finetune.state.files import write_json

    if os.path.exists(os.path.join(job_dir, "summary.json")) or os.environ.get("RANK", "0") != "0":
        return
    os.makedirs(job_dir, exist_ok=True)
    write_json({"status": status, "error": str(error), "overrides": overrides},
               os.path.join(job_dir, "summary.json"))


def job_rows(sweep_dir: str, metric: str) -> list[dict[str, Any]]:
    """One row per job directory (a folder with Hydra's .hydra/overrides.yaml), best first."""
    rows = []
    for name in sorted(os.listdir(sweep_dir)):
        job_dir = os.path.join(sweep_dir, name)
        overrides_file = os.path.join(job_dir, ".hydra", "overrides.yaml")
        if not os.path.isfile(overrides_file):
            continue
        summary = read_summary(job_dir) or {
            "status": "failed", "error": "no readable summary.json: the job was stopped before it "
            "ended (or the file is not this tool's)"}
        overrides = read_overrides(overrides_file)  # what Hydra ran there last
        if summary.get("overrides", overrides) != overrides:
            summary = {"status": "failed", "error": "refused: its directory holds the result of "
                       f"another job ({summary['overrides']}); use a new hydra.sweep.dir"}
        error = str(summary.get("error", ""))
        rows.append({"job": name, "status": summary["status"], "metric": metric,
                     "value": summary.get(metric, ""), "best_epoch": summary.get("best_epoch", ""),
                     "seconds": summary.get("seconds", ""), "overrides": " ".join(overrides),
                     "error": error.splitlines()[0] if error else "", "override_list": overrides})
    lower_is_better = direction(metric) == "minimize"

    def order(row: dict[str, Any]):
        if row["status"] != "ok" or not isinstance(row["value"], int | float) or row["value"] != row["value"]:
            return (1, 0.0)  # failed, or no number (NaN): after every result
        return (0, row["value"] if lower_is_better else -row["value"])

    return sorted(rows, key=order)


def setting(overrides: list[str]) -> str:
    """A job's overrides without those that only repeat it (data.fold, seed)."""
    return " ".join(override for override in overrides
                    if not override.lstrip("+").startswith(REPEATS)) or "(defaults)"


def group_repeats(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """When the sweep repeats settings over data.fold or seed: one entry per setting with
    the mean, sample standard deviation and count of its finished jobs' values, best mean
    first; each job row gets its setting's figures too (setting_mean, _std, _n). No
    repeats: an empty list, and the rows unchanged."""
    values: dict[str, list[float]] = {}
    for row in rows:
        if row["status"] == "ok" and isinstance(row["value"], int | float) and row["value"] == row["value"]:
            values.setdefault(setting(row["override_list"]), []).append(float(row["value"]))
    if all(len(found) < 2 for found in values.values()):
        return []
    groups = [{"setting": name, "mean": statistics.mean(found), "n": len(found),
               "std": statistics.stdev(found) if len(found) > 1 else 0.0, "values": found}
              for name, found in values.items()]
    groups.sort(key=lambda group: group["mean"], reverse=direction(metric) == "maximize")
    by_setting = {group["setting"]: group for group in groups}
    for row in rows:
        group = by_setting.get(setting(row["override_list"]))
        if group is not None:
            row.update(setting_mean=group["mean"], setting_std=group["std"], setting_n=group["n"])
    return groups


def format_groups(groups: list[dict[str, Any]], metric: str) -> str:
    lines = [f"by setting, over data.fold / seed ({metric}: mean +- std, n), best first:"]
    lines += [f"  {group['mean']:.4f} +- {group['std']:.4f}  n={group['n']}  {group['setting']}"
              for group in groups]
    return "\n".join(lines)


def write_table(rows: list[dict[str, Any]], path: str) -> None:
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        writer.writeheader()  # job folders, overrides and errors: a formula is kept text
        writer.writerows({key: spreadsheet_cell(value) for key, value in row.items()}
                         for row in rows)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'job':>4}  {'status':8}  {rows[0]['metric'] if rows else 'value':>14}  "
             f"{'epoch':>5}  {'seconds':>8}  overrides"]
    for row in rows:
        value = f"{row['value']:.4f}" if isinstance(row["value"], float) else str(row["value"])
        lines.append(f"{row['job']:>4}  {row['status']:8}  {value:>14}  "
                     f"{row['best_epoch']!s:>5}  {row['seconds']!s:>8}  {row['overrides']}"
                     + (f"  ({row['error']})" if row["error"] else ""))
    return "\n".join(lines)


def sweep_plots(setting: str) -> bool:
    from finetune.show.plots import plots_enabled

    try:
        return plots_enabled(setting)
    except ConfigError:  # plots=true without matplotlib: every job has said so already
        return False


class SweepSummary(Callback):
    """At the end of a sweep: summary.csv and the printed table; exit code 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        if config.get("hparams_search") is not None:  # a search's trial: the search sums up
            return
        if config.dry_run or not os.path.isdir(sweep_dir):  # a dry run has no results
            return
        rows = job_rows(sweep_dir, config.optimized_metric)
        groups = group_repeats(rows, config.optimized_metric)
        write_table(rows, os.path.join(sweep_dir, "summary.csv"))
        print(f"sweep of {len(rows)} jobs, best first ({os.path.join(sweep_dir, 'summary.csv')}):"
              f"\n{format_table(rows)}")
        if groups:
            print(format_groups(groups, config.optimized_metric))
        if sweep_plots(config.plots):
            from finetune.show.plots import draw_or_warn, plot_sweep

            draw_or_warn(plot_sweep, rows, config.optimized_metric,
                         os.path.join(sweep_dir, "summary.png"), (), groups)
        failed = [row["job"] for row in rows if row["status"] != "ok"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}; run the same "
                  f"command again with hydra.sweep.dir={sweep_dir} to rerun only those.",
                  file=sys.stderr)
            sys.exit(1)
