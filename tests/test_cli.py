"""End-to-end: `python train.py ...` as a user runs it: its main() in-process
(conftest.run_cli), and in a subprocess where the process itself matters (Ctrl-C, the
console script; tests/test_distributed.py starts torchrun)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from finetune.run import run

from conftest import HANG_SECONDS, ROOT, make_config, run_cli
from test_freeze import SEED_NAMES

pytestmark = pytest.mark.slow


def test_the_default_run_learns_leaves_a_complete_run_directory_and_says_what_next(tmp_path):
    """`python train.py`, cut to 1 of its 10 epochs: it learns the digits (its training
    accuracy over the epoch, 0.77-0.78 here with 1 or 2 threads, chance is 0.1; the
    validation accuracy after one epoch at lr 0.05 swings with the CPU's kernels, 0.16-0.39,
    and is not asserted; the README's 10-epoch figure comes from benchmarks/presets.py),
    shows and leaves what a user looks at, and its directory is then never trained over."""
    result = run_cli(f"hydra.run.dir={tmp_path}", "trainer.max_epochs=1", plots=True)
    assert result.returncode == 0, result.stderr
    for name in ("metrics.csv", "summary.json", "params.tsv", "train.log", "curves.png",
                 "confusion.png", "checkpoints/last.pt", "checkpoints/best.pt",
                 ".hydra/config.yaml"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and 0 <= summary["best_val_acc"] <= 1
    assert 0 < summary["trainable_params"] < summary["total_params"]  # part of it is frozen
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1"]
    assert float(rows[0]["train_acc"]) >= 0.5  # 5x chance, with a margin on every machine
    params = list(csv.DictReader(open(tmp_path / "params.tsv"), delimiter="\t"))
    assert params[0] == {"name": "pretrained.conv1.weight", "shape": "64x3x7x7", "numel": "9408",
                         "trainable": "False", "group": "-", "lr": "", "weight_decay": "",
                         "mode": "eval"}
    out = result.stdout
    assert out.startswith("config: backbone=resnet18  head=linear  data=digits  optimizer=sgd")
    assert "  trainer.max_epochs: 1  (default: 10)" in out
    assert "random init" in out and "parameters (freeze=" in out and "feature cache: off" in out
    assert out.count("epoch 1/1") == 1 and f"best epoch {summary['best_epoch']}: val acc" in out
    assert "\r" not in result.stderr and "it/s" not in result.stderr  # not a terminal: no bar
    evaluate = next(line for line in out.splitlines() if "mode=evaluate" in line)
    # the run directory is the working directory here: paths as the user would type them
    assert "python train.py mode=evaluate checkpoint=./checkpoints/best.pt" in evaluate
    assert "python train.py resume=. trainer.max_epochs=2" in out
    # a finished run's directory is never trained over, by another config or a bad one
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for overrides in (["optimizer=adamw"], ["freeze=[nothing]"]):
        again = run_cli(f"hydra.run.dir={tmp_path}", *overrides)
        assert again.returncode == 2 and "already holds a run" in again.stderr
        assert "Traceback" not in again.stderr
        assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_seed_experiment_dry_run_prints_the_seed_table(tmp_path, caplog):
    caplog.set_level("INFO")  # in-process: the console shows these log records
    run(make_config("experiment=seed", "dry_run=true", "backbone.allow_download=false"),
        str(tmp_path))
    lines = [line.split("\t[")[0] for line in caplog.text.splitlines()
             if line.startswith("params: ")]
    flags = [False] * 16 + [True] * 4
    assert lines == [f"params: \t{name}, \tgradient: {flag}"
                     for name, flag in zip(SEED_NAMES, flags, strict=True)]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.csv").exists()


def test_image_folder_run_with_a_frozen_resnet50(tmp_path):
    for split in ("train", "val"):
        for label, colour in (("ants", (200, 10, 10)), ("bees", (10, 10, 200))):
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            for n in range(3):
                Image.new("RGB", (50, 40), colour).save(tmp_path / "photos" / split / label / f"{n}.jpg")
    overrides = ["backbone=resnet50", "data=imagefolder", f"data.root={tmp_path}/photos",
                 "freeze=[pretrained]", "optimizer.lr=3e-4", "data.image_size=64",
                 "data.num_workers=2", "trainer.max_epochs=1", "backbone.allow_download=false"]
    run(make_config(*overrides), str(tmp_path / "run"), overrides)  # workers: processes
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trainable_params"] == 2048 * 2 + 2  # only the Linear head


# One case per path an error takes to the user (Hydra's own checks, finetune's, the command
# line before Hydra); every message, and every other bad input, is tested in-process too.
@pytest.mark.parametrize("overrides, fragments", [
    (["backbone=resnet99"], ["backbone=resnet99 is not an option", "resnet18"]),  # group option
    (["backbone.nmae=x"], ["no key backbone.nmae", "Did you mean backbone.name"]),  # schema
    (["backbone.name=resnt18"], ["backbone.name='resnt18'", "resnet18"]),  # finetune checks
    (["resume=/no/such/run"], ["resume='/no/such/run' is not a directory"]),  # before Hydra
])
def test_bad_input_exits_2_with_one_clear_message_and_no_unexplained_run_directory(
        tmp_path, overrides, fragments):
    result = run_cli(*overrides, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1
    if (tmp_path / "run").exists():  # refused once the run had started: it says why
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"
        assert fragments[0] in (tmp_path / "run" / "train.log").read_text()
        assert not (tmp_path / "run" / "metrics.csv").exists()


def test_finetune_console_script_runs_the_same_cli(tmp_path):
    result = subprocess.run(["finetune", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "backbone: alexnet" in result.stdout


def test_an_output_directory_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "file").write_text("keep me")
    result = run_cli(f"hydra.run.dir={tmp_path}/file/run", "data=fake")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"hydra.run.dir='{tmp_path}/file/run' cannot be written" in result.stderr
    assert (tmp_path / "file").read_text() == "keep me"


def test_ctrl_c_saves_and_resume_finishes_the_run(tmp_path):
    """SIGINT once the first epoch's checkpoint is written: exit 130 and a resumable run.
    The signal follows the 'epoch 1/2' line within milliseconds; the epoch of 256 images
    left takes a quarter of a second or more, so the run cannot finish first. The child gets the
    default SIGINT action: a shell starts a background job (`pytest &`) with SIGINT ignored,
    and a child would inherit that and never see the signal."""
    command = [sys.executable, str(ROOT / "train.py"), "backbone.weights=null",
               "backbone.name=squeezenet1_1", "data=fake",
               "data.train_size=256", "trainer.max_epochs=2", "trainer.device=cpu",
               "backbone.allow_download=false", "plots=false", f"hydra.run.dir={tmp_path}/run"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stdout:  # the console, line by line as it is printed
        lines.append(line)
        if line.startswith("epoch 1/2"):
            break
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    while not last.exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=HANG_SECONDS)
    stdout = "".join(lines) + stdout
    assert process.returncode == 130, stdout + stderr
    said = stdout + stderr  # one line says where it stopped and how to go on
    assert said.count("interrupted") == 1 and "continue with: python train.py resume=" in said
    assert "Traceback" not in said
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1
    saved_config = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    result = run_cli(f"resume={tmp_path}/run")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "ok"
    assert (tmp_path / "run" / ".hydra" / "config.yaml").read_text() == saved_config
