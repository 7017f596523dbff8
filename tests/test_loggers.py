"""Loggers: TensorBoard event files, a logger of one's own, and a bad one named."""

import csv
import importlib.util
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from finetune.errors import ConfigError, Interrupted
from finetune.run import run
from finetune.show.loggers import store_folder

from conftest import FAST, make_config, run_cli

STEPS_PER_EPOCH = 4  # 64 fake training images, batches of 16


class RecordingLogger:
    """A logger of one's own, as the README shows: three methods, named by _target_."""

    calls: list = []

    def __init__(self, run_dir: str, start_step: int, log_every_n_steps: int = 0):
        self.log_every_n_steps = log_every_n_steps
        RecordingLogger.calls = [("start", run_dir, start_step)]

    def log_metrics(self, metrics, step):
        RecordingLogger.calls.append(("metrics", step, dict(metrics)))

    def log_hparams(self, params, metrics):
        RecordingLogger.calls.append(("hparams", dict(params), dict(metrics)))

    def close(self):
        RecordingLogger.calls.append(("close",))


class InterruptingLogger(RecordingLogger):
    """Ctrl-C as the first epoch's numbers arrive; its close notes summary.json's status."""

    def __init__(self, run_dir: str, start_step: int, log_every_n_steps: int = 0):
        super().__init__(run_dir, start_step, log_every_n_steps)
        self.run_dir = run_dir

    def log_metrics(self, metrics, step):
        if "epoch" in metrics:
            raise KeyboardInterrupt

    def close(self):
        with open(os.path.join(self.run_dir, "summary.json")) as handle:
            RecordingLogger.calls.append(("close", json.load(handle)["status"]))


def events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_gets_epochs_steps_group_learning_rates_and_hparams(tmp_path):
    run(make_config(*FAST, "trainer.max_epochs=2", "logger=tensorboard",
                    "logger.tensorboard.log_every_n_steps=2", "freeze=[@backbone]",
                    "unfreeze=[{epoch: 2, patterns: [@stage-1]}]"), str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))  # csv: always written
    accumulator = events(tmp_path)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1  # one event file
    epoch_ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for tag, column in (("val/acc", "val_acc"), ("val/loss", "val_loss"),
                        ("train/loss", "train_loss"), ("train/acc", "train_acc")):
        assert scalars(accumulator, tag) == [
            (step, pytest.approx(float(row[column]), rel=1e-6))
            for step, row in zip(epoch_ends, rows, strict=True)]
    assert [step for step, _ in scalars(accumulator, "train/loss_step")] == [2, 4, 6, 8]
    assert [step for step, _ in scalars(accumulator, "lr/default")] == epoch_ends
    assert [step for step, _ in scalars(accumulator, "lr/unfreeze1")] == [8]  # from its epoch
    assert scalars(accumulator, "lr/unfreeze1")[0][1] == pytest.approx(float(rows[1]["lr"]))
    assert set(accumulator.PluginTagToContent("hparams")) == {
        "_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    best = max(float(row["val_acc"]) for row in rows)
    assert scalars(accumulator, "final/best_val_acc") == [(8, pytest.approx(best))]
    assert not {"val/map", "val/micro_f1"} & set(accumulator.Tags()["scalars"])  # NaN: left out


def test_a_resumed_run_purges_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    every_step = ("logger=tensorboard", "logger.tensorboard.log_every_n_steps=1")
    run(make_config(*FAST, *every_step), str(tmp_path))  # epoch 1, checkpointed
    with SummaryWriter(str(tmp_path / "tensorboard")) as writer:  # as if killed in epoch 2
        writer.add_scalar("train/loss_step", 123.0, STEPS_PER_EPOCH + 2)
    run(make_config(*FAST, *every_step, "trainer.max_epochs=2", f"resume={tmp_path}"),
        str(tmp_path))
    steps = scalars(events(tmp_path), "train/loss_step")
    assert [step for step, _ in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert 123.0 not in [value for _, value in steps]
    assert [step for step, _ in scalars(events(tmp_path), "val/acc")] == [4, 8]


def test_a_logger_of_ones_own_gets_every_epoch_and_the_final_metrics(tmp_path):
    run(make_config(*FAST, "trainer.max_epochs=2",
                    "+logger.mine._target_=test_loggers.RecordingLogger",
                    "+logger.mine.log_every_n_steps=3"), str(tmp_path))
    calls = RecordingLogger.calls
    assert calls[0] == ("start", str(tmp_path), 0) and calls[-1] == ("close",)
    steps = [call[1] for call in calls if call[0] == "metrics" and "train/loss_step" in call[2]]
    assert steps == [3, 6]
    epochs = [call[2]["epoch"] for call in calls if call[0] == "metrics" and "epoch" in call[2]]
    assert epochs == [1, 2]
    _, params, final = next(call for call in calls if call[0] == "hparams")
    assert params["optimizer.lr"] == 0.05 and params["backbone.name"] == "squeezenet1_1"
    assert set(final) == {f"final/{which}_val_{score}" for which in ("best", "last")
                          for score in ("acc", "loss", "balanced_acc", "macro_f1", "top5_acc")}


@pytest.mark.slow
def test_freeze_auto_gives_the_loggers_each_epochs_scales_as_metrics_csv_has_them(tmp_path):
    run(make_config(*FAST, "trainer.max_epochs=1", "freeze=auto",
                    "+logger.mine._target_=test_loggers.RecordingLogger"), str(tmp_path))
    logged = next(call[2] for call in RecordingLogger.calls
                  if call[0] == "metrics" and "epoch" in call[2])
    scales = {key: value for key, value in logged.items() if key.startswith("lr_scale/")}
    row = next(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert scales and scales == {key: float(value) for key, value in row.items()
                                 if key.startswith("lr_scale/")}
    assert max(scales.values()) == 1.0 and scales["lr_scale/@head"] == 1.0


def test_an_interrupted_run_closes_its_loggers_after_its_last_file(tmp_path):
    with pytest.raises(Interrupted):
        run(make_config(*FAST, "+logger.mine._target_=test_loggers.InterruptingLogger"),
            str(tmp_path))
    assert RecordingLogger.calls[-1] == ("close", "interrupted")


def test_a_logger_that_cannot_be_used_is_named_at_start_up(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"logger\.mine \(_target_='no.such.Logger'\) cannot "
                                          "be imported"):
        run(make_config(*FAST, "dry_run=true", "+logger.mine._target_=no.such.Logger"),
            str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"logger\.mine=.* needs a _target_"):
        run(make_config(*FAST, "+logger.mine.every=3"), str(tmp_path / "b"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs the tensorboard package: "
                                          r"pip install -e '\.\[tensorboard\]'"):
        run(make_config(*FAST, "logger=tensorboard"), str(tmp_path / "c"))
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written


@pytest.mark.slow
def test_mlflow_runs_are_read_back_by_mlflows_client_and_a_resume_goes_on_in_the_same_run(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracked = ("logger=mlflow", f"logger.mlflow.tracking_uri={uri}")
    run(make_config(*FAST, *tracked), str(tmp_path / "run"))  # epoch 1
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    run(make_config(*FAST, *tracked, "trainer.max_epochs=2", f"resume={tmp_path / 'run'}"),
        str(tmp_path / "run"))
    assert (tmp_path / "run" / "mlflow_run_id").read_text().strip() == run_id
    client = mlflow.MlflowClient(uri)
    saved = client.get_run(run_id)
    assert saved.info.status == "FINISHED" and saved.info.run_name == "run"
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    history = client.get_metric_history(run_id, "val/acc")
    assert [(point.step, point.value) for point in history] == [
        (STEPS_PER_EPOCH * int(row["epoch"]), float(row["val_acc"])) for row in rows]
    assert saved.data.params["optimizer.lr"] == "0.05" and saved.data.params["trainer.max_epochs"] == "1"
    assert saved.data.tags["resumed.trainer.max_epochs"] == "2"  # MLflow keeps a param's first value
    assert saved.data.metrics["final/best_val_acc"] == max(float(row["val_acc"]) for row in rows)
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"metrics.csv", "summary.json", "params.tsv"} <= artifacts and "checkpoints" not in artifacts
    assert len(client.search_runs([saved.info.experiment_id])) == 1  # one run, resumed


@pytest.mark.slow
def test_mlflow_gets_every_file_the_run_wrote_in_a_store_under_outputs(tmp_path, monkeypatch,
                                                                       tmp_path_factory):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_cli(*FAST, "logger=mlflow", "hydra.run.dir=outputs/2026-12-02/12-18-52",
                     plots=True)
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == ["outputs"]  # the working directory: nothing of MLflow's
    outputs = tmp_path / "outputs"
    assert sorted(os.listdir(outputs)) == ["2026-12-02", "mlartifacts", "mlflow.db"]
    run_dir = outputs / "2026-12-02" / "12-18-52"
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(f"sqlite:///{outputs}/mlflow.db")
    saved = client.get_run(run_id)
    assert saved.info.status == "FINISHED"
    assert saved.info.artifact_uri.startswith((outputs / "mlartifacts").as_uri())
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"confusion.png", "curves.png", "train.log", "summary.json"} <= artifacts
    uploaded = client.download_artifacts(run_id, "train.log", str(tmp_path_factory.mktemp("got")))
    log = (run_dir / "train.log").read_text()
    assert open(uploaded).read() == log and "evaluate:    python train.py mode=evaluate" in log


def test_the_default_mlflow_store_is_in_the_outputs_root_never_the_working_directory(tmp_path):
    assert store_folder("outputs/2026-12-02/12-18-52") == str(tmp_path / "outputs")
    assert store_folder("multirun/2026-12-02/12-18-52/3") == str(tmp_path / "multirun")
    assert store_folder("runs/a") == str(tmp_path / "runs")  # a hydra.run.dir of one's own
    assert store_folder("exp1") == str(tmp_path / "exp1")  # beside it would be the working dir
    assert store_folder("/scratch/outputs/2026-12-02/12-18-52-2") == "/scratch/outputs"
    assert store_folder("/scratch/exp1") == "/scratch"


def wandb_records(path):
    """The records of a wandb transaction log (.wandb), parsed with wandb's own protobuf
    messages; the framing is LevelDB's log format (7-byte chunk headers in 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, position, pending = path.read_bytes(), 7, b""  # after the ":W&B" file header
    while position + 7 <= len(raw):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header: padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


@pytest.mark.slow
def test_a_wandb_offline_run_records_the_epochs_config_and_final_metrics(tmp_path):
    import wandb

    run(make_config(*FAST, "trainer.max_epochs=2", "logger=wandb", "logger.wandb.mode=offline"),
        str(tmp_path / "run"))
    # run.finish() only asks wandb's service to close the log; a loaded machine showed it
    # still empty on return. teardown waits for the service, as a process's exit does.
    wandb.teardown()
    (log_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(log_file))
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
               for record in records if record.WhichOneof("record_type") == "history"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    epochs = [(int(entry["_step"]), float(entry["val/acc"])) for entry in history if "val/acc" in entry]
    assert epochs == [(STEPS_PER_EPOCH * int(row["epoch"]), float(row["val_acc"])) for row in rows]
    config = {item.key or "/".join(item.nested_key): item.value_json for record in records
              if record.WhichOneof("record_type") == "config" for item in record.config.update}
    assert config["optimizer.lr"] == "0.05"
    summary = {item.key or "/".join(item.nested_key): item.value_json for record in records
               if record.WhichOneof("record_type") == "summary" for item in record.summary.update}
    assert float(summary["final/best_val_acc"]) == max(float(row["val_acc"]) for row in rows)
    exits = [record.exit.exit_code for record in records if record.WhichOneof("record_type") == "exit"]
    assert exits == [0]  # finished (1: failed or interrupted)
