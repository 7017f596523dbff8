"""Sweeps: summary.csv, failed jobs recorded, finished jobs skipped on a rerun."""

import csv
import json
import os

import pytest
from hydra import compose, initialize_config_dir

from finetune.search.study import open_storage, open_study
from finetune.sweep import finished_result, job_rows, record_failure, set_aside_failed_attempt

from conftest import CONF_DIR, run_cli

SMALL = ["backbone.weights=null", "backbone.name=squeezenet1_1", "data=fake",
         "data.train_size=32", "data.val_size=16", "trainer.max_epochs=1", "trainer.device=cpu"]


def make_job(sweep, name, overrides, summary=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps({"overrides": overrides, **summary}))
    return job


def test_rows_are_sorted_best_first_with_failures_last(tmp_path):
    make_job(tmp_path, "0", ["optimizer.lr=0.1"], {"status": "ok", "best_val_acc": 0.5,
                                                    "best_val_loss": 0.7, "best_epoch": 2,
                                                    "seconds": 1.0})
    make_job(tmp_path, "1", ["optimizer.lr=-1"], {"status": "failed",
                                                   "error": "optimizer.lr=-1.0 is not valid\nmore"})
    make_job(tmp_path, "2", ["optimizer.lr=0.01"], {"status": "ok", "best_val_acc": 0.9,
                                                     "best_val_loss": 0.3, "best_epoch": 1,
                                                     "seconds": 1.0})
    make_job(tmp_path, "3", ["optimizer.lr=0.001"])  # killed: no summary.json
    rows = job_rows(str(tmp_path), "best_val_acc")
    assert [row["job"] for row in rows] == ["2", "0", "1", "3"]
    assert rows[2]["error"] == "optimizer.lr=-1.0 is not valid"
    assert rows[3]["status"] == "failed" and rows[3]["overrides"] == "optimizer.lr=0.001"
    assert [row["job"] for row in job_rows(str(tmp_path), "best_val_loss")] == ["2", "0", "1", "3"]
    make_job(tmp_path, "4", ["optimizer.lr=1"], {"status": "ok", "best_val_acc": 0.99})
    (tmp_path / "4" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=2\n")  # reused
    refused = next(row for row in job_rows(str(tmp_path), "best_val_acc") if row["job"] == "4")
    assert refused["status"] == "failed" and "holds the result of another job" in refused["error"]


def test_only_the_same_finished_job_is_skipped_and_failed_attempts_are_kept(tmp_path):
    job = make_job(tmp_path, "0", ["a=1"], {"status": "ok", "best_val_acc": 0.5})
    assert finished_result(str(job), ["a=1"])["best_val_acc"] == 0.5
    assert finished_result(str(job), ["a=2"]) is None  # another sweep's job 0
    failed = make_job(tmp_path, "1", ["a=2"])
    (failed / "metrics.csv").write_text("epoch\n1\n")
    record_failure(str(failed), ["a=2"], ValueError("broken"))
    set_aside_failed_attempt(str(failed))
    (attempt,) = failed.glob("attempt-*")
    assert sorted(os.listdir(attempt)) == ["metrics.csv", "summary.json"]
    assert not (failed / "summary.json").exists()


@pytest.mark.slow
def test_a_sweep_records_failures_and_a_rerun_skips_finished_jobs(tmp_path):
    command = ["-m", *SMALL, "head=linear,mlp", "optimizer.lr=0.01,-1",
               f"hydra.sweep.dir={tmp_path}/sweep"]
    first = run_cli(*command, plots=True)
    assert first.returncode == 1, first.stderr  # 2 of 4 jobs failed, the others finished
    assert "2 of 4 jobs failed" in first.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert [row["status"] for row in rows] == ["ok", "ok", "failed", "failed"]
    for row in rows:
        summary = json.loads((tmp_path / "sweep" / row["job"] / "summary.json").read_text())
        assert row["overrides"] == " ".join(summary["overrides"])
        if row["status"] == "ok":
            assert "optimizer.lr=0.01" in row["overrides"]
            assert float(row["value"]) == summary["best_val_acc"]
            kept = tmp_path / "sweep" / row["job"] / "checkpoints"  # a job's default: best
            assert sorted(path.name for path in kept.iterdir()) == ["best.pt"]
        else:
            assert "optimizer.lr=-1" in row["overrides"]
            assert "optimizer.lr=-1.0 is not valid" in row["error"]
    assert float(rows[0]["value"]) >= float(rows[1]["value"])
    assert (tmp_path / "sweep" / "summary.png").is_file()  # beside summary.csv (plots=auto)
    finished = {row["job"]: (tmp_path / "sweep" / row["job"] / "metrics.csv").stat().st_mtime_ns
                for row in rows if row["status"] == "ok"}
    second = run_cli(*command, plots=True)  # the same command: plots is one of its settings
    assert second.returncode == 1 and second.stdout.count("skipped") == 2
    for job, mtime in finished.items():
        assert (tmp_path / "sweep" / job / "metrics.csv").stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "sweep").glob("*/attempt-*"))) == 2  # the failed ones, kept


@pytest.mark.parametrize("launcher, target, settings", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {}),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
     {"gpus_per_node": 1, "timeout_min": 240, "array_parallelism": 16}),
])
def test_launcher_presets_compose(launcher, target, settings):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    assert {key: cfg.hydra.launcher[key] for key in settings} == settings


def test_optuna_direction_follows_the_optimized_metric(tmp_path):
    for metric, direction in (("best_val_acc", "maximize"), ("last_val_loss", "minimize")):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["hparams_search=optuna", f"optimized_metric={metric}"])
        (tmp_path / metric).mkdir()
        storage = open_storage(cfg.hparams_search, str(tmp_path / metric))
        study = open_study(storage, cfg.hparams_search, metric, seed=0)
        assert study.direction.name.lower() == direction


@pytest.mark.slow
def test_fail_fast_stops_the_sweep_at_the_first_failed_job(tmp_path):
    result = run_cli("-m", *SMALL, "optimizer.lr=-1,0.01", "fail_fast=true",
                       f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 2 and "optimizer.lr=-1.0 is not valid" in result.stderr
    assert not (tmp_path / "1").exists()  # the second job never started
