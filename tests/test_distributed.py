"""torchrun: two CPU processes (gloo) train one run in one directory."""

import csv
import json
import subprocess
import sys

import pytest

from finetune.run import run

from conftest import HANG_SECONDS, ROOT, make_config

pytestmark = pytest.mark.slow

DATA = ["backbone.weights=null", "backbone.name=squeezenet1_1", "data=fake",
        "data.train_size=64", "data.val_size=30", "trainer.device=cpu"]


def test_torchrun_two_processes_share_one_run_and_agree(tmp_path):
    # torchrun itself; port 0: a free one, so parallel test runs do not collide
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(ROOT / "train.py"), *DATA,
               "trainer.max_epochs=2", "freeze=[@backbone]",  # frozen, then a phase: re-wrapped
               "unfreeze=[{epoch: 2, patterns: [@stage-1]}]", "backbone.allow_download=false",
               "logger=tensorboard"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    assert len(runs) == 1  # one directory, whatever each rank's clock said
    run_dir = runs[0]
    assert sorted(path.name for path in run_dir.iterdir()) == [
        ".hydra", "checkpoints", "confusion.png", "curves.png", "metrics.csv", "params.tsv",
        "params_epoch2.tsv", "summary.json", "tensorboard", "train.log"]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # rank 0's event file only
    assert (run_dir / "train.log").read_text().count("epoch 2/2") == 1  # rank 0's log only
    output = result.stdout + result.stderr
    assert "the final weights are identical on all 2 ranks" in output
    assert "feature cache: off: distributed training" in output
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    # the ranks' summed validation equals one process evaluating the saved checkpoint
    evaluated = tmp_path / "evaluated"
    accuracy = run(make_config(*DATA, "mode=evaluate",
                               f"checkpoint={run_dir}/checkpoints/last.pt"), str(evaluated))
    assert accuracy == float(rows[-1]["val_acc"])
    loss = json.loads((evaluated / "evaluation.json").read_text())["loss"]
    assert loss == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)
