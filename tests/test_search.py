"""-m hparams_search=optuna on the project's own workers: the search space, exact trial
counts with several workers on one storage (SQLite, PostgreSQL), pruning, a sweep started
again, and a killed worker's trial retried from its checkpoint."""

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from optuna.trial import TrialState

from finetune.errors import ConfigError
from finetune.search.space import distributions
from finetune.search.worker import counted

from conftest import FAST, HANG_SECONDS, ROOT, run_cli

SEARCH = ("-m", "hparams_search=optuna", *FAST)


def study_at(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="finetune", storage=storage)


def sqlite(sweep) -> str:
    return f"sqlite:///{sweep}/optuna.db"


def assert_surplus_never_ran(all_trials, counted_trials, sweep) -> None:
    """Two workers asking at once for the last place: the later trial is marked surplus,
    failed, and never run (docs/sweeps.md)."""
    numbers = {trial.number for trial in counted_trials}
    for trial in (trial for trial in all_trials if trial.number not in numbers):
        assert trial.user_attrs.get("surplus") and trial.state == TrialState.FAIL
        assert not (sweep / str(trial.number)).exists()


def rows(sweep) -> list[dict]:
    return list(csv.DictReader(open(sweep / "summary.csv")))


def test_the_search_space_becomes_optunas_distributions():
    space = distributions({"optimizer.lr": "tag(log, interval(1e-4, 1e-1))",
                           "freeze": 'choice("[pretrained]", "[@stem,@stage1]", "[]")',
                           "trainer.max_epochs": "range(1, 4)"})
    assert space["optimizer.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert space["freeze"].choices == ("[pretrained]", "[@stem,@stage1]", "[]")
    assert space["trainer.max_epochs"].choices == (1, 2, 3)
    with pytest.raises(ConfigError, match=r"hparams_search.params.optimizer.lr='between\(1, 2\)' "
                                          r"is not valid: use interval"):
        distributions({"optimizer.lr": "between(1, 2)"})


@pytest.mark.parametrize("setting, message", [
    ("hparams_search.pruner=sometimes", "hparams_search.pruner='sometimes' is not valid: use none, median"),
    ("hparams_search.pruner=threshold", "needs hparams_search.prune_threshold"),
    ("hparams_search.sampler=grid", "hparams_search.sampler='grid' is not valid"),
    ("hparams_search.n_jobs=0", "hparams_search.n_jobs=0 is not valid: use 1 or more"),
    ("optimizer.lr=0.1", "optimizer.lr=0.1: the search samples this key"),
    ("hparams_search.storage=/no/such/folder/study.journal", "(a journal file) cannot be opened"),
    ("hparams_search.storage='postgresql+psycopg2://nobody@/db?host=/no/such/socket'",
     "hparams_search.storage='postgresql+psycopg2://nobody@/db?host=/no/such/socket' cannot be opened"),
])
def test_a_bad_search_setting_is_refused_before_anything_runs(tmp_path, setting, message):
    result = run_cli(*SEARCH, setting, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2 and message in result.stderr
    assert not list((tmp_path / "sweep").glob("*/summary.json"))


def crafted_study(sweep, values: dict) -> None:
    """The sweep's default storage, a file, with a queued trial of these values."""
    sweep.mkdir()
    study = optuna.create_study(storage=sqlite(sweep), study_name="finetune", direction="maximize")
    study.enqueue_trial(values, skip_if_exists=False)


def test_a_stored_trial_outside_the_search_space_is_failed_not_run(tmp_path):
    sweep, marker = tmp_path / "sweep", tmp_path / "code_ran"
    crafted_study(sweep, {"optimizer.lr": 5.0, "optimizer.weight_decay": 1e-4, "freeze": "[]",
                          "head.layers.0.out_features": 64})  # lr out of its interval
    result = run_cli(*SEARCH, "hparams_search.n_trials=1", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1  # the one trial did not finish
    [trial] = study_at(sqlite(sweep)).get_trials()
    assert trial.state == TrialState.FAIL and not (sweep / "0").exists()
    crafted = tmp_path / "crafted"
    crafted_study(crafted, {"optimizer.lr": 0.01, "optimizer.weight_decay": 1e-4,
                            "freeze": f"${{oc.create:{{_target_: os.system, command: touch {marker}}}}}",
                            "head.layers.0.out_features": 64})  # not one of freeze's choices
    result = run_cli(*SEARCH, "hparams_search.n_trials=1", f"hydra.sweep.dir={crafted}")
    assert result.returncode == 2
    assert "a queued trial's values are not in hparams_search.params" in result.stderr
    assert not marker.exists() and not (crafted / "0").exists()


@pytest.mark.slow
def test_two_workers_finish_exactly_n_trials_each_once(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(*SEARCH, "hparams_search.n_trials=4", "hparams_search.n_jobs=2",
                     "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}")  # the workers start together
    assert result.returncode == 0, result.stderr
    trials = counted(all_trials := study_at(sqlite(sweep)).get_trials())
    assert len(trials) == 4 and all(trial.state == TrialState.COMPLETE for trial in trials)
    assert len({trial.user_attrs["worker"] for trial in trials}) == 2  # both took trials
    ran = sorted(path.parent.name for path in sweep.glob("*/summary.json"))
    assert ran == sorted(str(trial.number) for trial in trials)  # each once, a directory each
    assert {row["trial"] for row in rows(sweep)} == set(ran)
    assert_surplus_never_ran(all_trials, trials, sweep)


@pytest.mark.slow
def test_pruned_trials_end_early_and_a_search_started_again_runs_only_what_is_missing(tmp_path):
    sweep = tmp_path / "sweep"
    pruning = ("hparams_search.pruner=threshold", "hparams_search.prune_threshold=1.01",
               "trainer.max_epochs=3")  # no accuracy reaches 1.01: pruned after epoch 1
    result = run_cli(*SEARCH, "hparams_search.n_trials=2", *pruning, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    assert [trial.state for trial in study_at(sqlite(sweep)).get_trials()] == [TrialState.PRUNED] * 2
    for trial in ("0", "1"):
        summary = json.loads((sweep / trial / "summary.json").read_text())
        assert summary["status"] == "pruned" and summary["epochs_completed"] == 1
        assert summary["stop_reason"].startswith("pruned by the study's pruner after epoch 1")
        assert len(list(csv.DictReader(open(sweep / trial / "metrics.csv")))) == 1
        assert (sweep / trial / "checkpoints" / "best.pt").is_file()
    assert [(row["state"], row["epochs"]) for row in rows(sweep)] == [("pruned", "1")] * 2
    assert json.loads((sweep / "search.json").read_text())["best_trial"] is None  # none finished

    finished = {trial: (sweep / trial / "metrics.csv").stat().st_mtime_ns for trial in ("0", "1")}
    again = run_cli(*SEARCH, "hparams_search.n_trials=3", "trainer.max_epochs=1",
                    f"hydra.sweep.dir={sweep}")  # the same study, one more trial, no pruner
    assert again.returncode == 0, again.stderr
    assert [trial.state for trial in study_at(sqlite(sweep)).get_trials()][2] == TrialState.COMPLETE
    assert {trial: (sweep / trial / "metrics.csv").stat().st_mtime_ns for trial in finished} == finished
    order = [row["trial"] for row in rows(sweep)]
    assert order[0] == "2" and sorted(order[1:]) == ["0", "1"]  # complete first, then pruned
    best = json.loads((sweep / "search.json").read_text())["best_command"]
    assert best.startswith("python train.py ") and "optimizer.lr=" in best


def search_process(sweep, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *SEARCH, *overrides, "plots=false",
                             f"hydra.sweep.dir={sweep}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried_and_resumes_from_its_checkpoint(tmp_path):
    sweep = tmp_path / "sweep"
    settings = ("hparams_search.n_trials=2", "hparams_search.heartbeat_seconds=1",
                "hparams_search.grace_seconds=3", "trainer.max_epochs=6", "data.train_size=128")
    worker = search_process(sweep, *settings)
    checkpoint = sweep / "0" / "checkpoints" / "last.pt"
    started = time.monotonic()
    while not checkpoint.is_file():  # the dead run's epochs must be kept: kill after one
        assert worker.poll() is None and time.monotonic() - started < HANG_SECONDS
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)  # no goodbye: its heartbeats just stop
    worker.wait(HANG_SECONDS)
    dead_epochs = len(list(csv.DictReader(open(sweep / "0" / "metrics.csv"))))
    assert 1 <= dead_epochs < 6 and not (sweep / "1").exists()
    result = run_cli(*SEARCH, *settings, f"hydra.sweep.dir={sweep}")  # the same command again
    assert result.returncode == 0, result.stderr
    dead, *others = study_at(sqlite(sweep)).get_trials()  # a retry, and one new trial
    assert dead.state == TrialState.FAIL and len(others) == 2  # the remaining trials only
    assert all(trial.state == TrialState.COMPLETE for trial in others)
    retry, new = sorted(others, key=lambda trial: "failed_trial" not in trial.system_attrs)
    assert retry.system_attrs["failed_trial"] == 0 and retry.user_attrs["run_dir"] == str(sweep / "0")
    epochs = [int(row["epoch"]) for row in csv.DictReader(open(sweep / "0" / "metrics.csv"))]
    assert epochs == list(range(1, 7))  # the dead run's epochs kept, the rest added
    assert new.user_attrs["run_dir"] == str(sweep / str(new.number))
    assert not (sweep / str(retry.number)).exists()  # the retry resumed in place
    assert len(rows(sweep)) == 2  # the retry stands for trial 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster (Debian's postgresql package; .ci/run installs it),
    listening on a Unix socket in its own folder; its URL."""
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))),
                                            None)
    if initdb is None:
        pytest.skip("no PostgreSQL server here: initdb not found (apt-get install postgresql)")
    bin_dir = os.path.dirname(os.path.realpath(initdb))
    folder = tempfile.mkdtemp(prefix="finetune-pg-")  # the server's user must reach it
    user = [] if os.geteuid() else ["runuser", "-u", "postgres", "--"]  # initdb refuses root
    if user:
        shutil.chown(folder, "postgres")
    port, data = free_port(), os.path.join(folder, "data")
    try:
        subprocess.run([*user, f"{bin_dir}/initdb", "-D", data, "-U", "postgres", "-A", "trust"],
                       check=True, capture_output=True, timeout=HANG_SECONDS)
        subprocess.run([*user, f"{bin_dir}/pg_ctl", "-D", data, "-w", "-l", f"{folder}/log",
                        "-o", f"-k {folder} -p {port} -c listen_addresses=''", "start"],
                       check=True, capture_output=True, timeout=HANG_SECONDS)
    except (subprocess.CalledProcessError, OSError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"a PostgreSQL server could not be started here: {error}")
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={folder}&port={port}"
    finally:
        subprocess.run([*user, f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=HANG_SECONDS)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_a_postgresql_study(tmp_path, postgres):
    sweep = tmp_path / "sweep"
    result = run_cli(*SEARCH, "hparams_search.n_trials=4", "hparams_search.n_jobs=2",
                     "trainer.max_epochs=2", f"hparams_search.storage='{postgres}'",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    trials = counted(all_trials := study_at(postgres).get_trials())
    assert len(trials) == 4 and all(trial.state == TrialState.COMPLETE for trial in trials)
    assert len({trial.user_attrs["worker"] for trial in trials}) == 2
    assert not (sweep / "optuna.db").exists()  # the study lives in the server
    assert len(rows(sweep)) == 4
    assert_surplus_never_ran(all_trials, trials, sweep)
