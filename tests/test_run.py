import csv
import json
import shlex

import pytest
import torch

from finetune import run as run_module
from finetune.errors import ConfigError
from finetune.run import run
from finetune.state.checkpoint import read_run_checkpoint

from conftest import FAST, RESNET, make_config


def test_run_writes_every_output_and_returns_the_optimized_metric(tmp_path):
    value = run(make_config(*FAST, "trainer.max_epochs=2"), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints", "metrics.csv", "params.tsv", "summary.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert value == summary["best_val_acc"]
    assert summary["epochs_completed"] == 2 and summary["status"] == "ok"
    assert summary["weights"].startswith("random init")
    assert summary["trainable_params"] < summary["total_params"]
    for key in ("last_val_acc", "seconds", "best_epoch"):
        assert key in summary
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert summary["best_val_acc"] == max(float(row["val_acc"]) for row in rows)
    assert summary["last_val_acc"] == float(rows[-1]["val_acc"])
    best = read_run_checkpoint(str(tmp_path / "checkpoints" / "best.pt"))
    assert best["run"]["config"]["backbone"]["name"] == "squeezenet1_1"
    assert "pretrained.features.0.weight" not in best["state"]["unfreeze"]["trainable"]  # @stem


@pytest.mark.parametrize("metric", ["last_val_acc", "best_val_loss"])
def test_optimized_metric_choice(tmp_path, metric):
    value = run(make_config(*FAST, f"optimized_metric={metric}"), str(tmp_path))
    assert value == json.loads((tmp_path / "summary.json").read_text())[metric]


def test_dry_run_trains_and_saves_nothing(tmp_path):
    assert run(make_config(*FAST, "dry_run=true"), str(tmp_path)) is None
    assert [p.name for p in tmp_path.iterdir()] == ["params.tsv"]


@pytest.mark.slow
def test_same_seed_same_result_on_cpu(tmp_path):
    results = []
    for name in ("a", "b"):
        run(make_config(*FAST, "trainer.max_epochs=2", "seed=5"), str(tmp_path / name))
        rows = [{k: v for k, v in row.items() if k != "seconds"}
                for row in csv.DictReader(open(tmp_path / name / "metrics.csv"))]
        results.append((rows, read_run_checkpoint(str(tmp_path / name / "checkpoints" / "last.pt"))["model"]))
    (rows_a, model_a), (rows_b, model_b) = results
    assert rows_a == rows_b
    assert all(torch.equal(model_a[key], model_b[key]) for key in model_a)


def test_the_closing_lines_evaluate_the_best_checkpoint_on_the_runs_own_data(tmp_path, caplog):
    """The printed command alone evaluates on the data the run trained on (data=fake with
    its sizes, not the default digits): the checkpoint's data settings are the default."""
    caplog.set_level("INFO")
    accuracy = run(make_config(*FAST), str(tmp_path / "run"), FAST)
    command = next(line.split("evaluate:")[1] for line in caplog.text.splitlines()
                   if "evaluate:" in line)
    arguments = shlex.split(command)[2:]
    assert arguments == ["mode=evaluate", "checkpoint=run/checkpoints/best.pt"]  # from the cwd
    assert run(make_config(*arguments), str(tmp_path / "evaluated"), arguments) == accuracy
    evaluation = json.loads((tmp_path / "evaluated" / "evaluation.json").read_text())
    assert evaluation["data"]["name"] == "fake" and evaluation["images"] == 32
    assert f"results: {tmp_path / 'evaluated' / 'evaluation.json'}" in caplog.text


def test_existing_run_is_never_overwritten(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch\n1\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        run(make_config(*FAST), str(tmp_path))
    assert (tmp_path / "metrics.csv").read_text() == "epoch\n1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_config_error_happens_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError):
        run(make_config(*FAST, "freeze=[pretrained.nothing]"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cheap_checks_come_before_the_model_and_the_data_are_built(tmp_path, monkeypatch):
    """A wrong data.root is a stat, a bad pattern a model of shapes only (the meta device):
    both are reported before any weights are built or images read."""
    def built(*args, **kwargs):
        raise AssertionError("built before the cheap checks")

    monkeypatch.setattr(run_module, "resolve_weights", built)
    monkeypatch.setattr(run_module, "build_data", built)
    with pytest.raises(ConfigError, match="freeze\\[1\\]='pretrained.layr4' matches no parameter"):
        run(make_config(*FAST, RESNET, "freeze=[pretrained.conv1,pretrained.layr4]"),
            str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="param_groups\\[0\\].patterns\\[0\\]='nothing'"):
        run(make_config(*FAST, "param_groups=[{patterns: [nothing]}]"), str(tmp_path / "b"))
    monkeypatch.setattr(run_module, "build_backbone", built)
    with pytest.raises(ConfigError, match="data.root='/no/photos'.*does not exist"):
        run(make_config(*FAST[:1], "data=imagefolder", "data.root=/no/photos"), str(tmp_path / "c"))


def test_summary_and_checkpoint_record_the_torch_thread_count(tmp_path):
    run(make_config(*FAST), str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    saved = read_run_checkpoint(str(tmp_path / "checkpoints" / "last.pt"))
    assert summary["torch_threads"] == saved["run"]["torch_threads"] == torch.get_num_threads()


@pytest.mark.slow
def test_a_backbone_the_meta_device_cannot_build_is_checked_after_its_real_build(tmp_path):
    """regnet computes its widths from tensors, which the meta device cannot read back: the
    early check steps aside, the run builds, and a bad pattern is still named."""
    regnet = (*FAST, "backbone.name=regnet_x_400mf")
    assert run(make_config(*regnet, "dry_run=true"), str(tmp_path / "dry")) is None
    with pytest.raises(ConfigError, match="freeze\\[0\\]='pretrained.nothing' matches no parameter"):
        run(make_config(*regnet, "freeze=[pretrained.nothing]"), str(tmp_path / "bad"))
