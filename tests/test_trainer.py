import csv

import pytest
import torch

from finetune.errors import ConfigError
from finetune.model.freeze import unchanging_state_names
from finetune.run import build
from finetune.state.checkpoint import CheckpointHook, RunRecord, read_run_checkpoint
from finetune.state.files import load_safe
from finetune.train.trainer import (
    MetricsCsv,
    Monitor,
    Progress,
    Step,
    evaluate,
    fit,
    resolve_device,
    train_one_epoch,
)

from conftest import FAST, RESNET, make_config

FAST = (*FAST, RESNET)  # these tests name resnet18's parameters, stages and BatchNorm layers

FROZEN = "freeze=[pretrained.conv1,pretrained.bn1,pretrained.layer1]"


def snapshot(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def train_epoch(setup):
    step = Step(setup.net, setup.device)
    train_one_epoch(setup.net, setup.data.train_loader, setup.optimizer, step, 1, 1)


def test_frozen_parameters_are_bit_identical_and_trainable_ones_change():
    setup = build(make_config(*FAST, FROZEN))
    before = snapshot(setup.net)
    train_epoch(setup)
    after = setup.net.state_dict()
    for name, param in setup.net.named_parameters():
        if param.requires_grad:
            assert not torch.equal(after[name], before[name]), f"{name} did not train"
        else:
            assert torch.equal(after[name], before[name]), f"frozen {name} changed"
    assert any(not p.requires_grad for p in setup.net.parameters())


def batchnorm_buffers(net, prefix):
    return {name: value.clone() for name, value in net.named_buffers() if name.startswith(prefix)}


def test_batchnorm_statistics_in_frozen_parts_stay_put_by_default():
    setup = build(make_config(*FAST, FROZEN))
    frozen_before = batchnorm_buffers(setup.net, "pretrained.layer1.")
    trained_before = batchnorm_buffers(setup.net, "pretrained.layer2.")
    train_epoch(setup)
    frozen_after = batchnorm_buffers(setup.net, "pretrained.layer1.")
    trained_after = batchnorm_buffers(setup.net, "pretrained.layer2.")
    assert frozen_before and all(torch.equal(frozen_after[k], v) for k, v in frozen_before.items())
    assert not torch.equal(trained_after["pretrained.layer2.0.bn1.running_mean"],
                           trained_before["pretrained.layer2.0.bn1.running_mean"])


def test_batchnorm_statistics_move_with_frozen_modules_train():
    setup = build(make_config(*FAST, FROZEN, "frozen_modules=train"))
    before = batchnorm_buffers(setup.net, "pretrained.layer1.")
    train_epoch(setup)
    after = batchnorm_buffers(setup.net, "pretrained.layer1.")
    assert not torch.equal(after["pretrained.layer1.0.bn1.running_mean"],
                           before["pretrained.layer1.0.bn1.running_mean"])
    assert after["pretrained.layer1.0.bn1.num_batches_tracked"] == 4  # 64 images / 16
    # the weights themselves are still frozen
    assert not setup.net.pretrained.layer1[0].bn1.weight.requires_grad


def test_forward_hooks_see_train_mode_in_training_and_eval_mode_in_validation():
    setup = build(make_config(*FAST, FROZEN, "head=mlp"))
    seen = {"frozen": [], "trainable": [], "head_dropout": []}
    watched = {"frozen": setup.net.pretrained.layer1[0].bn1,
               "trainable": setup.net.pretrained.layer2[0].bn1,
               "head_dropout": setup.net.add_layers[2]}
    for key, module in watched.items():
        module.register_forward_hook(lambda m, args, out, key=key: seen[key].append(m.training))
    train_epoch(setup)
    assert seen == {"frozen": [False] * 4, "trainable": [True] * 4, "head_dropout": [True] * 4}
    for flags in seen.values():
        flags.clear()
    evaluate(setup.net, setup.data.val_loader, Step(setup.net, setup.device))
    assert seen == {"frozen": [False] * 2, "trainable": [False] * 2, "head_dropout": [False] * 2}


def fit_with_checkpoints(setup, run_dir, epochs: int = 2) -> Progress:
    """trainer.fit with the hooks that write metrics.csv and checkpoints/, as a run has them."""
    step, progress = Step(setup.net, setup.device), Progress()
    loaders = (setup.data.train_loader, setup.data.val_loader)
    parts = {"optimizer": setup.optimizer, "scheduler": setup.scheduler, "progress": progress}
    record = RunRecord({}, [], setup.data.class_names, {})
    hooks = [CheckpointHook(str(run_dir), setup.net, parts, record, unchanging_state_names),
             MetricsCsv(str(run_dir / "metrics.csv"))]
    fit(setup.net, step, setup.optimizer, setup.scheduler, loaders, epochs, progress, hooks)
    return progress


@pytest.mark.slow
def test_fit_writes_metrics_and_loadable_checkpoints(tmp_path):
    setup = build(make_config(*FAST, "trainer.max_epochs=2"))
    progress = fit_with_checkpoints(setup, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                             "seconds", "val_balanced_acc", "val_macro_f1", "val_map", "val_micro_f1",
                             "val_top5_acc"]
    assert all(row["val_map"] == "nan" for row in rows)  # multi-label data's only
    assert all(0 <= float(row["val_macro_f1"]) <= 1 for row in rows)
    assert float(rows[0]["lr"]) == 0.05 and float(rows[1]["lr"]) < 0.05  # cosine over 2 epochs
    last = read_run_checkpoint(str(tmp_path / "checkpoints" / "last.pt"))
    best = read_run_checkpoint(str(tmp_path / "checkpoints" / "best.pt"))
    assert last["state"]["progress"]["epoch"] == 2
    assert best["state"]["progress"]["epoch"] == progress.best_epoch
    assert last["run"]["class_names"] == [str(i) for i in range(10)]
    for name, value in setup.net.state_dict().items():
        assert torch.equal(last["model"][name], value)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_frozen_tensors_are_written_once_not_every_epoch(tmp_path):
    setup = build(make_config(*FAST, "trainer.max_epochs=2"))  # freezes @stem and @stage1
    fit_with_checkpoints(setup, tmp_path)
    last_only = load_safe(str(tmp_path / "checkpoints" / "last.pt"))["model"]
    frozen = load_safe(str(tmp_path / "checkpoints" / "frozen.pt"))["tensors"]
    frozen_params = {name for name, param in setup.net.named_parameters() if not param.requires_grad}
    assert frozen_params <= set(frozen) and not frozen_params & set(last_only)
    # stage 1 is kept in eval mode, so its BatchNorm statistics are unchanging too; stage 2's move
    assert "pretrained.layer1.0.bn1.running_mean" in frozen
    assert "pretrained.layer2.0.bn1.running_mean" in last_only
    assert set(frozen) | set(last_only) == set(setup.net.state_dict())


def test_monitor_direction():
    assert Monitor("val_acc", True).improved(0.5, 0.4)
    assert not Monitor("val_loss", False).improved(0.5, 0.4)
    assert Monitor().improved(0.0, None)
    assert Monitor.for_metric("best_val_loss") == Monitor("val_loss", False)
    assert Monitor.for_metric("last_val_acc") == Monitor("val_acc", True)


def test_device_auto_is_available_and_unknown_devices_are_refused():
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="trainer.device='gpu0'"):
        resolve_device("gpu0")


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    from finetune.errors import TrainingFailed
    from finetune.run import run
    from finetune.train import trainer

    calls = {"count": 0}
    cross_entropy = trainer.F.cross_entropy

    def failing_at_epoch_two(logits, labels, *args, **kwargs):  # 4 train + 2 val steps/epoch
        calls["count"] += 1
        loss = cross_entropy(logits, labels, *args, **kwargs)
        return loss * float("nan") if calls["count"] == 8 else loss

    monkeypatch.setattr(trainer.F, "cross_entropy", failing_at_epoch_two)
    with pytest.raises(TrainingFailed, match="not finite at epoch 2, step 2 of 4"):
        run(make_config(*FAST, "trainer.max_epochs=3"), str(tmp_path))
    last = read_run_checkpoint(str(tmp_path / "checkpoints" / "last.pt"))
    assert last["state"]["progress"]["epoch"] == 1
    summary = __import__("json").loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "epoch 2, step 2" in summary["error"]
    assert summary["epochs_completed"] == 1


def test_grad_clip_bounds_the_update():
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    before = [param.detach().clone() for param in net.parameters()]
    step = Step(net, torch.device("cpu"), grad_clip=0.5)
    loss = 1000 * net(torch.randn(8, 4)).pow(2).mean()  # a gradient norm far above 0.5
    step.backward(loss)
    step.optimizer_step(optimizer)
    moved = torch.cat([(param - old).flatten() for param, old in zip(net.parameters(), before,
                                                                     strict=True)])
    assert moved.norm().item() == pytest.approx(0.5, rel=1e-4)
