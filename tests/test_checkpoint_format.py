"""The checkpoint schema (finetune/state/checkpoint.py): format 3 written, format 2 (the release
before) upgraded, so its runs still resume exactly and load."""

import csv
import json
import math
import shutil

import pytest
import torch
from hydra import initialize_config_dir

import finetune
from finetune.cli import compose_unresolved
from finetune.errors import ConfigError
from finetune.run import run
from finetune.state.checkpoint import FORMAT, read_run_checkpoint, upgrade
from finetune.state.files import load_safe
from finetune.state.resume import load_last, resumed_config

from conftest import CONF_DIR, FAST, ROOT, make_config

FORMAT2_RUN = ROOT / "tests" / "fixtures" / "format2_run"


@pytest.fixture
def format2_run(tmp_path):
    """A copy of the previous release's run, stopped after epoch 2 of 3."""
    run_dir = tmp_path / "run"
    shutil.copytree(FORMAT2_RUN, run_dir)
    return run_dir


def metrics_rows(run_dir) -> list[dict[str, float]]:
    return [{key: float(value) for key, value in row.items() if key != "seconds"}
            for row in csv.DictReader(open(run_dir / "metrics.csv"))]


@pytest.mark.slow
def test_a_format2_run_resumes_where_it_stopped_and_ends_as_if_never_stopped(format2_run):
    raw = load_safe(str(format2_run / "checkpoints" / "last.pt"))
    assert raw["format"] == 2 and raw["unfreeze_phase"] == 1  # the fixture is the old layout
    saved = load_last(str(format2_run))
    assert saved["format"] == FORMAT and saved["state"]["unfreeze"]["applied"] == 1
    before = metrics_rows(format2_run)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = resumed_config(str(format2_run), saved["run"], [], compose_unresolved)
    run(cfg, str(format2_run), saved["run"]["overrides"], checkpoint=saved)
    rows = metrics_rows(format2_run)
    old_columns = [{key: row[key] for key in before[0]} for row in rows]
    assert old_columns[:2] == before and [row["epoch"] for row in rows] == [1, 2, 3]
    expected = json.loads((FORMAT2_RUN / "expected_epoch3.json").read_text())
    # the old release's uninterrupted epoch 3 (bit-identical on the machine that made it)
    assert old_columns[2] == pytest.approx(expected, rel=1e-4)
    # the scores the old release did not record are nan in its epochs, there in the new one
    assert all(math.isnan(row["val_macro_f1"]) for row in rows[:2])
    assert 0 <= rows[2]["val_macro_f1"] <= 1 and 0 <= rows[2]["val_balanced_acc"] <= 1
    last = read_run_checkpoint(str(format2_run / "checkpoints" / "last.pt"))
    assert last["format"] == FORMAT and last["state"]["progress"]["epoch"] == 3
    assert [g["name"] for g in last["state"]["optimizer"]["param_groups"]] == [
        "default", "default/no_decay", "unfreeze1", "unfreeze1/no_decay"]


def test_a_format2_checkpoint_loads_with_its_weights(format2_run):
    path = str(format2_run / "checkpoints" / "last.pt")
    model = finetune.load_model(path)
    assert model.class_names == ["0", "1", "2"] and model.input_spec.image_size == 32
    saved = read_run_checkpoint(path)["model"]
    assert all(torch.equal(value, saved[name]) for name, value in model.net.state_dict().items())
    with torch.no_grad():
        assert model.net(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_upgrade_maps_every_format2_key():
    old = load_safe(str(FORMAT2_RUN / "checkpoints" / "last.pt"))
    new = upgrade(old)
    assert set(new) == {"format", "run", "model", "frozen_part", "state"}
    assert set(new["state"]) == {"unfreeze", "optimizer", "scheduler", "scaler", "rng",
                                 "progress", "feature_cache"}
    assert new["state"]["unfreeze"]["trainable"] == old["trainable"]
    assert new["run"]["overrides"] == old["overrides"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    run(make_config(*FAST), str(run_dir))
    return run_dir


def test_a_checkpoint_holds_named_parts_and_no_write_only_keys(trained):
    saved = load_safe(str(trained / "checkpoints" / "last.pt"))
    assert set(saved) == {"format", "run", "model", "frozen_part", "state"}
    assert set(saved["run"]) == {"config", "overrides", "class_names", "input_spec", "torch_threads",
                                 "world_size", "auto_frozen"}
    assert saved["run"]["torch_threads"] == torch.get_num_threads()
    assert saved["run"]["world_size"] == 1
    assert set(saved["state"]) == {"unfreeze", "optimizer", "scheduler", "scaler", "rng",
                                   "progress", "feature_cache"}


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(format=99), "format 99"),
    (lambda c: c.pop("run"), "entries do not fit it"),
    (lambda c: c["run"]["config"].update(head=({"_target_": "torch.nn.Linear"},)), "tuple"),
    (lambda c: c["run"].update(class_names="abc"), "not what this tool writes"),
    (lambda c: c["run"].update(input_spec={"image_size": -3}), "input spec"),
])
def test_a_damaged_checkpoint_is_named_not_a_traceback(trained, tmp_path, change, message):
    checkpoint = load_safe(str(trained / "checkpoints" / "last.pt"))
    change(checkpoint)
    shutil.copy(trained / "checkpoints" / "frozen.pt", tmp_path)
    torch.save(checkpoint, tmp_path / "damaged.pt")
    with pytest.raises(ConfigError, match=message):
        finetune.load_model(str(tmp_path / "damaged.pt"))
