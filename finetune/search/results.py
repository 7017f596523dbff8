"""The end of a search: summary.csv and summary.png (every trial with its state, epochs,
metric and parameters, best first), the best trial's command, and which parameters
mattered (Optuna's importance evaluator), printed and written to search.json."""

import csv
import math
import os
import shlex
from typing import Any

from finetune.config.store import direction
from finetune.search.worker import counted
from finetune.state.files import atomic_write, spreadsheet_cell, write_json

COLUMNS = ["trial", "state", "metric", "value", "epochs", "best_epoch", "seconds", "params",
           "run_dir", "error"]
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
          "WAITING": "waiting"}


def trial_rows(study: Any, metric: str, space: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial n_trials counts, best first: complete trials by value, then pruned
    ones by the last value they reported, then the rest."""
    rows = []
    for trial in counted(study.get_trials(deepcopy=False)):
        params = {key: trial.params[key] for key in space if key in trial.params}
        reported = list(trial.intermediate_values.values())
        value = trial.value if trial.value is not None else (reported[-1] if reported else "")
        rows.append({"trial": trial.number, "state": STATES.get(trial.state.name, trial.state.name),
                     "metric": metric, "value": value,
                     "epochs": trial.user_attrs.get("epochs_completed", ""),
                     "best_epoch": trial.user_attrs.get("best_epoch", ""),
                     "seconds": trial.user_attrs.get("seconds", ""),
                     "params": " ".join(f"{key}={value}" for key, value in params.items()),
                     "run_dir": trial.user_attrs.get("run_dir", ""),
                     "error": str(trial.user_attrs.get("error", "")).split("\n")[0],
                     "param_values": params})
    sign = 1 if direction(metric) == "minimize" else -1

    def order(row: dict[str, Any]):
        rank = {"complete": 0, "pruned": 1}.get(row["state"], 2)
        value = row["value"]
        if not isinstance(value, int | float) or math.isnan(value):
            return (rank, 1, 0.0)
        return (rank, 0, sign * value)

    return sorted(rows, key=order)


def write_rows(rows: list[dict[str, Any]], path: str) -> None:
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        writer.writeheader()  # parameters and errors: a formula is kept text
        writer.writerows({key: spreadsheet_cell(value) for key, value in row.items()} for row in rows)


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'trial':>5}  {'state':8}  {rows[0]['metric'] if rows else 'value':>14}  "
             f"{'epochs':>6}  params"]
    for row in rows:
        value = f"{row['value']:.4f}" if isinstance(row["value"], float) else str(row["value"])
        lines.append(f"{row['trial']:>5}  {row['state']:8}  {value:>14}  {row['epochs']!s:>6}  "
                     f"{row['params']}" + (f"  ({row['error']})" if row["error"] else ""))
    return "\n".join(lines)


def importances(study: Any) -> dict[str, float] | str:
    """Which parameters mattered (Optuna's default evaluator, fANOVA), or why not known."""
    import optuna
    from optuna.trial import TrialState

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return "not computed: fewer than 2 trials finished"
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as error:
        return f"not computed: {error}"


def best_command(rows: list[dict[str, Any]], base: list[str]) -> str | None:
    best = next((row for row in rows if row["state"] == "complete"), None)
    if best is None:
        return None
    overrides = [*base, *(f"{key}={value}" for key, value in best["param_values"].items())]
    return "python train.py " + " ".join(shlex.quote(item) for item in overrides)


def plot_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as plots.plot_sweep draws a sweep's jobs (complete trials are its `ok`)."""
    return [{"job": str(row["trial"]), "status": {"complete": "ok"}.get(row["state"], row["state"]),
             "value": row["value"] if row["state"] == "complete" else "",
             "overrides": row["params"], "override_list": row["params"].split()} for row in rows]


def summarize(study: Any, settings: Any, space: dict[str, Any], base: list[str], sweep_dir: str,
              metric: str, plots: bool) -> list[dict[str, Any]]:
    """summary.csv, search.json and (with plots) summary.png; the table printed."""
    rows = trial_rows(study, metric, space)
    write_rows(rows, os.path.join(sweep_dir, "summary.csv"))
    command, mattered = best_command(rows, base), importances(study)
    write_json({"study_name": settings.study_name, "metric": metric, "trials": len(rows),
                "best_trial": next((row["trial"] for row in rows if row["state"] == "complete"), None),
                "best_command": command, "importances": mattered},
               os.path.join(sweep_dir, "search.json"))
    print(f"search of {len(rows)} trials, best first ({os.path.join(sweep_dir, 'summary.csv')}):"
          f"\n{format_rows(rows)}")
    if command:
        print(f"best trial: {command}")
    print("parameters that mattered (importance): " + (
        ", ".join(f"{key} {value:.2f}" for key, value in mattered.items())
        if isinstance(mattered, dict) else mattered))
    if plots:
        from finetune.show.plots import draw_or_warn, log_searched_keys, plot_sweep

        draw_or_warn(plot_sweep, plot_rows(rows), metric, os.path.join(sweep_dir, "summary.png"),
                     log_searched_keys(dict(settings.params)))
    return rows
