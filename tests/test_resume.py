"""Resume: a stopped run, continued from its last checkpoint, ends as if never stopped."""

import copy
import csv
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import time

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from finetune.cli import compose_unresolved
from finetune.errors import ConfigError
from finetune.run import run
from finetune.state.checkpoint import read_run_checkpoint
from finetune.state.resume import find_run_dir, load_last, resumed_config
from finetune.train import trainer

from conftest import CONF_DIR, FAST, make_config, own_progress_lock

SETUPS = {
    "partial freeze": [],
    "probe, cached features, dropout head": ["freeze=[pretrained]", "head=mlp"],
    "gradual unfreezing": ["freeze=[@backbone]", "unfreeze=[{epoch: 2, patterns: [@stage-1]}]"],
    "recipes: accumulation, early stopping, EMA, MixUp/CutMix, smoothing, class weights": [
        "trainer.accumulate_grad_batches=3", "trainer.early_stopping.patience=5",
        "trainer.ema_decay=0.9", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
        "loss.label_smoothing=0.1", "loss.class_weights=balanced"],
}
# interrupted once and resumed (the soak below kills the setups above at random)
RESUMED_SETUPS = {**SETUPS, "timm backbone, gradual unfreezing": [
    "backbone.name=timm/convnext_atto", "freeze=[@backbone]",
    "unfreeze=[{epoch: 2, patterns: [@stage-1]}]"],  # and LoRA: tests/test_adapters.py
    "freeze=auto, dropout head": ["freeze=auto", "head=mlp"],
    "freeze=auto:select": ["freeze=auto:select"]}


def config(*overrides: str, epochs: int = 3):
    return make_config(*FAST, f"trainer.max_epochs={epochs}", *overrides)


def resumed(run_dir) -> OmegaConf:
    """What `python train.py resume=RUN_DIR` trains with."""
    saved = load_last(str(run_dir))
    cfg = OmegaConf.create(saved["run"]["config"])
    cfg.resume = str(run_dir)
    return cfg


def outcome(run_dir) -> tuple[dict, list[dict], dict]:
    """Final weights, metrics.csv without timings, summary.json without timings."""
    weights = read_run_checkpoint(str(run_dir / "checkpoints" / "last.pt"))["model"]
    rows = [{key: value for key, value in row.items() if key != "seconds"}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("seconds")
    return weights, rows, summary


def assert_same(one, other) -> None:
    (weights_a, rows_a, summary_a), (weights_b, rows_b, summary_b) = one, other
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert rows_a == rows_b and summary_a == summary_b


def interrupt_at(monkeypatch, epoch: int) -> None:
    """Ctrl-C at the start of `epoch`."""
    original = trainer.train_and_validate

    def train_and_validate(*args):
        if args[5] == epoch:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(trainer, "train_and_validate", train_and_validate)


def resumed_run_equals_unbroken(cfg, folder, monkeypatch, stop_at: int = 2) -> None:
    """`cfg` run unbroken, and again stopped (Ctrl-C) at the start of epoch `stop_at` then
    resumed: both end alike (weights, metrics.csv, summary.json)."""
    run(copy.deepcopy(cfg), str(folder / "unbroken"))  # a copy each: a run may set keys
    interrupt_at(monkeypatch, stop_at)
    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(cfg), str(folder / "stopped"))
    monkeypatch.undo()
    run(resumed(folder / "stopped"), str(folder / "stopped"))
    assert_same(outcome(folder / "unbroken"), outcome(folder / "stopped"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A setup's run left alone (3 epochs): its outcome and seconds, trained once (in a
    forked child) for the module's tests that compare with it."""
    done = {}

    def twin(name: str) -> tuple[tuple, float]:
        if name not in done:  # in a child, as the soak's runs train
            run_dir = tmp_path_factory.mktemp("twin") / "run"
            started = time.perf_counter()
            child = multiprocessing.get_context("fork").Process(
                target=train_in_child, args=(RESUMED_SETUPS[name], run_dir, False))
            child.start()
            child.join()
            assert child.exitcode == 0, f"the uninterrupted run of {name} failed"
            done[name] = outcome(run_dir), time.perf_counter() - started
        return done[name]

    return twin


@pytest.fixture
def one_thread():
    """The thread count of the forked twins (conftest.run_forked's reason): CPU results are
    bit-identical for the same count, whatever FINETUNE_TEST_THREADS says."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", RESUMED_SETUPS)
@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, name, uninterrupted,
                                                      one_thread):
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(config(*RESUMED_SETUPS[name]), str(tmp_path / "stopped"))
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 2
    monkeypatch.undo()
    run(resumed(tmp_path / "stopped"), str(tmp_path / "stopped"))
    assert_same(uninterrupted(name)[0], outcome(tmp_path / "stopped"))


@pytest.mark.slow
def test_a_row_written_after_the_last_checkpoint_is_not_doubled(tmp_path, monkeypatch):
    run(config(), str(tmp_path / "twin"))
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(config(), str(tmp_path / "stopped"))
    monkeypatch.undo()
    with open(tmp_path / "stopped" / "metrics.csv", "a") as handle:  # killed after the row
        handle.write("3,9,0,9,0,0.1,1.0\n")                          # but before last.pt
    run(resumed(tmp_path / "stopped"), str(tmp_path / "stopped"))
    assert_same(outcome(tmp_path / "twin"), outcome(tmp_path / "stopped"))


def test_resuming_a_finished_run_says_so_and_writes_nothing_or_what_a_kill_left_out(tmp_path, caplog):
    run(config(epochs=2), str(tmp_path))
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    finished = outcome(tmp_path)
    caplog.set_level("INFO")
    run(resumed(tmp_path), str(tmp_path))
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    assert "had already finished all its 2 epochs: nothing to train" in caplog.text
    assert "train more:  python train.py resume=. trainer.max_epochs=4" in caplog.text  # the cwd

    # killed after its last checkpoint, before the last metrics row and summary.json: the
    # resume completes them from the checkpoint (the soak's random kills found this)
    metrics, summary = tmp_path / "metrics.csv", tmp_path / "summary.json"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    summary.unlink()
    run(resumed(tmp_path), str(tmp_path))
    rows, completed = outcome(tmp_path)[1:]
    assert len(rows) == 2 and (rows, completed) == finished[1:]  # but the seconds
    assert "metrics.csv and summary.json completed from its checkpoint" in caplog.text


def started(run_dir, *overrides: str, epochs: int) -> None:
    """`python train.py OVERRIDES` into RUN_DIR: the overrides saved as the command line's."""
    overrides = [*FAST, f"trainer.max_epochs={epochs}", *overrides]
    run(make_config(*overrides), str(run_dir), overrides)


def raised(run_dir, max_epochs: int):
    """What `python train.py resume=RUN_DIR trainer.max_epochs=N` trains with."""
    saved = load_last(str(run_dir))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return resumed_config(str(run_dir), saved["run"], [f"trainer.max_epochs={max_epochs}"],
                              compose_unresolved)


def learning_rates(run_dir) -> list[float]:
    return [float(row["lr"]) for row in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.mark.slow
def test_more_epochs_on_a_cosine_run_decay_on_from_the_last_rate(tmp_path, monkeypatch):
    """The printed "train more" command: the cosine tail is planned again from epoch 2's
    rate over the 2 added epochs (before, epoch 3 trained at lr 0 and the rate climbed back),
    and that plan is in the checkpoint: an extended run stopped and resumed ends the same."""
    for name in ("extended", "stopped"):
        started(tmp_path / name, epochs=2)
    run(raised(tmp_path / "extended", 4), str(tmp_path / "extended"))
    rates = learning_rates(tmp_path / "extended")
    assert rates[:2] == pytest.approx([0.05, 0.025])  # cosine over 2 epochs
    assert rates[2:] == pytest.approx([0.025 * (1 + math.cos(math.pi * k / 3)) / 2
                                       for k in (1, 2)])  # decaying, the last above 0
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(raised(tmp_path / "stopped", 4), str(tmp_path / "stopped"))
    monkeypatch.undo()
    run(resumed(tmp_path / "stopped"), str(tmp_path / "stopped"))  # the saved 4 epochs
    assert_same(outcome(tmp_path / "extended"), outcome(tmp_path / "stopped"))


@pytest.mark.slow
def test_more_epochs_on_a_step_run_go_on_as_a_longer_run_would(tmp_path):
    step = ("scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5")
    started(tmp_path / "long", *step, epochs=3)
    started(tmp_path / "extended", *step, epochs=2)
    run(raised(tmp_path / "extended", 3), str(tmp_path / "extended"))
    assert learning_rates(tmp_path / "extended") == pytest.approx([0.05, 0.025, 0.0125])
    long, extended = outcome(tmp_path / "long"), outcome(tmp_path / "extended")
    assert_same(long[:2] + (None,), extended[:2] + (None,))  # weights and every metric


@pytest.mark.slow
def test_a_schedule_planned_for_the_run_length_is_not_stretched(tmp_path, caplog):
    linear = ("scheduler=none", "+scheduler._target_=torch.optim.lr_scheduler.PolynomialLR",
              "+scheduler.total_iters=2")
    caplog.set_level("INFO")
    started(tmp_path, *linear, epochs=2)
    assert "train more" not in caplog.text  # no hint for what cannot be done
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with pytest.raises(ConfigError, match="PolynomialLR plans the run's length"):
        run(raised(tmp_path, 4), str(tmp_path))
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_latest_is_the_newest_run_with_a_checkpoint(tmp_path):
    for name in ("2026-01-01/10-00-00", "2026-01-02/09-00-00", "2026-01-03/08-00-00"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    (tmp_path / "2026-01-01/10-00-00/checkpoints/last.pt").write_bytes(b"")
    time.sleep(0.01)
    (tmp_path / "2026-01-02/09-00-00/checkpoints/last.pt").write_bytes(b"")
    # the newest folder has no checkpoint yet: it is not a run that can be resumed
    assert find_run_dir("latest", str(tmp_path)) == str(tmp_path / "2026-01-02/09-00-00")


@pytest.mark.parametrize("value, message", [
    ("missing", "is not a directory"),
    ("empty", "does not exist, so there is nothing to resume"),
    ("latest", "no run under"),
])
def test_nothing_to_resume_is_named(tmp_path, value, message):
    (tmp_path / "empty").mkdir()
    path = value if value == "latest" else str(tmp_path / value)
    with pytest.raises(ConfigError, match=f"resume=.*{message}"):
        find_run_dir(path, str(tmp_path / "outputs"))


@pytest.mark.slow
def test_only_raising_max_epochs_is_allowed():
    config = OmegaConf.to_container(make_config(*FAST, "trainer.max_epochs=5", "optimizer.lr=0.1"),
                                    resolve=True)
    saved = {"config": config, "overrides": ["trainer.max_epochs=5", "optimizer.lr=0.1"]}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = resumed_config("/run", saved, ["resume=/run", "trainer.max_epochs=8"],
                             compose_unresolved)
        assert cfg.trainer.max_epochs == 8 and cfg.resume == "/run"
        assert resumed_config("/run", saved, ["optimizer.lr=0.1"],
                              compose_unresolved).trainer.max_epochs == 5
        with pytest.raises(ConfigError, match=r"optimizer.lr \(saved 0.1\).*Only trainer.max_epochs"):
            resumed_config("/run", saved, ["optimizer.lr=0.5"], compose_unresolved)
        with pytest.raises(ConfigError, match=r"seed \(saved 3\)"):  # named, though a default
            resumed_config("/run", {**saved, "config": {**config, "seed": 3}}, ["seed=0"],
                           compose_unresolved)
        with pytest.raises(ConfigError, match="trainer.max_epochs=4 is below the run's 5"):
            resumed_config("/run", saved, ["trainer.max_epochs=4"], compose_unresolved)
        assert resumed_config("/run", saved, ["data.num_workers=2"],
                              compose_unresolved).data.num_workers == 2  # this machine's


def test_a_saved_config_never_chooses_where_datasets_writes(tmp_path):
    """data=hf's data.cache_dir (where datasets writes its Arrow copy) comes from the command
    line, resuming and evaluating, as trainer.cache_dir does: never from the saved config."""
    from finetune.use.evaluate import evaluation_data

    chosen = f"data.cache_dir={tmp_path}/chosen-by-the-file"
    config = OmegaConf.to_container(make_config(*FAST[:2], "data=hf", "data.path=/data/pets", chosen),
                                    resolve=True)
    saved = {"config": config, "overrides": ["data=hf", "data.path=/data/pets", chosen]}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert resumed_config("/run", saved, [], compose_unresolved).data.cache_dir is None
        mine = resumed_config("/run", saved, [f"data.cache_dir={tmp_path}/mine"], compose_unresolved)
        assert mine.data.cache_dir == f"{tmp_path}/mine" and mine.data.path == "/data/pets"
    evaluated = evaluation_data(make_config(*FAST[:2], "mode=evaluate"), config["data"], [])
    assert evaluated.cache_dir is None and evaluated.path == "/data/pets"


# --- SIGKILL at random moments -------------------------------------------------------------

def train_in_child(overrides: list[str], run_dir, resume: bool) -> None:
    torch.set_num_threads(1)
    own_progress_lock()
    cfg = resumed(run_dir) if resume else config(*overrides, epochs=3)
    run(cfg, str(run_dir))


def run_with_kills(overrides: list[str], run_dir, seconds: float, rng: random.Random) -> int:
    """Start the run, SIGKILL it at random moments and resume it until it finishes; returns
    how many times it was killed. A run killed before its first checkpoint starts again."""
    context = multiprocessing.get_context("fork")  # no re-import: each start takes milliseconds
    kills = 0
    while True:
        resume = (run_dir / "checkpoints" / "last.pt").exists()
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        child = context.Process(target=train_in_child, args=(overrides, run_dir, resume))
        child.start()
        child.join(timeout=rng.uniform(0, seconds) if kills < 2 else None)
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            kills += 1
        elif child.exitcode == 0:
            return kills
        else:
            raise AssertionError(f"the training process failed with exit code {child.exitcode}")


@pytest.mark.slow
def test_soak_runs_killed_at_random_end_bit_identical(tmp_path, uninterrupted):
    """A run of each setup, SIGKILLed up to twice at random and resumed; the runs left alone
    are the resume test's."""
    rng = random.Random(1)
    kills = 0
    for index, name in enumerate(SETUPS):
        run_dir = tmp_path / f"run-{index}"
        twin, seconds = uninterrupted(name)
        kills += run_with_kills(SETUPS[name], run_dir, seconds, rng)
        assert_same(twin, outcome(run_dir))
    assert kills >= len(SETUPS)  # most runs were really interrupted, some more than once


@pytest.mark.slow
def test_a_checkpoint_saved_before_plots_and_loggers_existed_resumes(tmp_path):
    overrides = [*FAST, "plots=false"]
    run(make_config(*overrides), str(tmp_path), overrides)
    saved = load_last(str(tmp_path))
    del saved["run"]["config"]["plots"], saved["run"]["config"]["logger"]  # as saved before
    saved["run"]["overrides"].remove("plots=false")  # no such key then
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = resumed_config(str(tmp_path), saved["run"], ["trainer.max_epochs=2"],
                             compose_unresolved)
    # keys added since take their schema defaults (a file's overrides are never composed)
    assert cfg.plots == "auto" and cfg.logger == {}
    run(cfg, str(tmp_path), saved["run"]["overrides"], checkpoint=saved)
    assert json.loads((tmp_path / "summary.json").read_text())["epochs_completed"] == 2
