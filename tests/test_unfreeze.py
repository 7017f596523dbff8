import csv
import math

import pytest
import torch

from finetune.errors import ConfigError
from finetune.run import build, run
from finetune.state.checkpoint import read_run_checkpoint
from finetune.train.trainer import Step, train_one_epoch

from conftest import FAST, RESNET, make_config

FAST = (*FAST, RESNET)  # these tests name resnet18's parameters, stages and BatchNorm layers

PHASE = "unfreeze=[{epoch: 3, patterns: [@stage4], lr_mult: 0.5}]"
# epoch 4 checks that the scheduler keeps driving the group added at epoch 3
FROZEN_BACKBONE = ("freeze=[@backbone]", "trainer.max_epochs=4", PHASE)


def snapshot(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def same(before, module):
    return all(torch.equal(value, before[name]) for name, value in module.state_dict().items())


def drive(setup, epochs, each_epoch=lambda epoch: None):
    """What trainer.fit does, with a look inside after the phases of each epoch start."""
    for epoch in range(1, epochs + 1):
        setup.unfreeze.start_epoch(epoch)
        each_epoch(epoch)
        step = Step(setup.net, setup.device)
        train_one_epoch(setup.net, setup.data.train_loader, setup.optimizer, step, 1, 1)
        if setup.scheduler is not None:
            setup.scheduler.step()


@pytest.mark.slow
def test_phase_parameters_stay_bit_identical_until_their_epoch_then_train():
    setup = build(make_config(*FAST, *FROZEN_BACKBONE, "optimizer.weight_decay=0.1"))
    layer3, layer4 = setup.net.pretrained.layer3, setup.net.pretrained.layer4
    start3, start4 = snapshot(layer3), snapshot(layer4)  # weights and BatchNorm statistics
    seen = {}
    drive(setup, 4, lambda epoch: seen.setdefault(epoch, same(start4, layer4)))
    assert seen == {1: True, 2: True, 3: True, 4: False}
    assert not same(start4, layer4)
    # never unfrozen: untouched by momentum and weight decay, statistics included
    assert same(start3, layer3)


@pytest.mark.parametrize("scheduler, expected", [
    ("cosine", lambda epoch: 0.05 * (1 + math.cos(math.pi * (epoch - 1) / 4)) / 2),
    ("step", lambda epoch: 0.05 * 0.1 ** (epoch - 1)),
])
@pytest.mark.slow
def test_every_group_learning_rate_follows_the_config_epoch_by_epoch(scheduler, expected):
    setup = build(make_config(*FAST, *FROZEN_BACKBONE, f"scheduler={scheduler}",
                              "scheduler.step_size=1" if scheduler == "step" else "seed=0",
                              "param_groups=[{name: bias, patterns: ['*.bias'], lr_mult: 2.0}]"))
    seen = {}

    def record(epoch):
        seen[epoch] = {group["name"]: group["lr"] for group in setup.optimizer.param_groups}

    drive(setup, 4, record)
    for epoch, lrs in seen.items():
        assert lrs["default"] == pytest.approx(expected(epoch)), epoch  # the head's weight
        assert lrs["bias/no_decay"] == pytest.approx(2.0 * expected(epoch)), epoch
        if epoch >= 3:
            assert lrs["unfreeze1"] == pytest.approx(0.5 * expected(epoch)), epoch
            assert lrs["unfreeze1/no_decay"] == pytest.approx(0.5 * expected(epoch)), epoch
        else:
            assert "unfreeze1" not in lrs


@pytest.mark.slow
def test_optimizer_holds_exactly_the_trainable_set_after_each_phase():
    setup = build(make_config(*FAST, "freeze=[@backbone]", "trainer.max_epochs=4",
                              "unfreeze=[{epoch: 2, patterns: [@stage4]},"
                              "{epoch: 4, patterns: [@stage3, @stage2], lr_mult: 0.1}]"))

    def check(epoch):
        held = [param for group in setup.optimizer.param_groups for param in group["params"]]
        trainable = [param for param in setup.net.parameters() if param.requires_grad]
        assert len(held) == len({id(param) for param in held}), epoch
        assert {id(param) for param in held} == {id(param) for param in trainable}, epoch

    drive(setup, 4, check)
    assert setup.unfreeze.active == 2


def test_a_phase_can_set_its_own_weight_decay():
    setup = build(make_config(*FAST, "freeze=[@backbone]", "trainer.max_epochs=3",
                              "unfreeze=[{epoch: 2, patterns: [@stage4], weight_decay: 0.3}]"))
    setup.unfreeze.start_epoch(2)
    decay = {group["name"]: group["weight_decay"] for group in setup.optimizer.param_groups}
    assert decay["unfreeze1"] == 0.3 and "unfreeze1/no_decay" not in decay


def test_unfrozen_modules_leave_eval_mode():
    setup = build(make_config(*FAST, *FROZEN_BACKBONE))
    bn3, bn4 = setup.net.pretrained.layer3[0].bn1, setup.net.pretrained.layer4[0].bn1
    setup.net.train()
    assert (bn3.training, bn4.training) == (False, False)
    setup.unfreeze.start_epoch(3)
    setup.net.train()
    assert (bn3.training, bn4.training) == (False, True)


@pytest.mark.parametrize("overrides, message", [
    (["freeze=[@backbone]", "unfreeze=[{epoch: 2, patterns: [layer9]}]"],
     r"unfreeze\[0\].patterns\[0\]='layer9' matches no parameter"),
    (["unfreeze=[{epoch: 2, patterns: [@stage4]}]"],
     r"unfreeze\[0\] .* matches only parameters that are already trainable"),
    (["freeze=[@backbone]", "unfreeze=[{epoch: 2, patterns: [@stage4]}, {epoch: 3, patterns: [layer4]}]"],
     r"unfreeze\[1\] .* already trainable"),
    (["freeze=[@backbone]", "unfreeze=[{epoch: 1, patterns: [@stage4]}]"], r"unfreeze\[0\].epoch=1"),
    (["freeze=[@backbone]", "unfreeze=[{epoch: 9, patterns: [@stage4]}]"], r"unfreeze\[0\].epoch=9"),
])
@pytest.mark.slow
def test_bad_phases_fail_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(make_config(*FAST, "trainer.max_epochs=4", *overrides))


@pytest.mark.slow
def test_checkpoint_and_run_directory_record_the_phases(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = make_config(*FAST, "freeze=[@backbone]", "trainer.max_epochs=2",
                      "unfreeze=[{epoch: 2, patterns: [@stage4], lr_mult: 0.5}]")
    run(cfg, str(tmp_path))
    assert "epoch 2: unfreeze @stage4 (15 tensors) as group unfreeze1, lr x0.5" in caplog.text
    assert "epoch 2: unfreeze phase 1: @stage4 (15 tensors) join the optimizer" in caplog.text
    last = read_run_checkpoint(str(tmp_path / "checkpoints" / "last.pt"))
    assert last["state"]["unfreeze"]["applied"] == 1
    assert "pretrained.layer4.0.conv1.weight" in last["state"]["unfreeze"]["trainable"]
    assert "pretrained.layer3.0.conv1.weight" not in last["state"]["unfreeze"]["trainable"]
    assert [g["name"] for g in last["state"]["optimizer"]["param_groups"]] == [
        "default", "default/no_decay", "unfreeze1", "unfreeze1/no_decay"]
    start = {row["name"]: row for row in csv.DictReader(open(tmp_path / "params.tsv"), delimiter="\t")}
    after = {row["name"]: row for row in csv.DictReader(open(tmp_path / "params_epoch2.tsv"),
                                                        delimiter="\t")}
    name = "pretrained.layer4.0.conv1.weight"
    assert (start[name]["trainable"], start[name]["group"], start[name]["mode"]) == ("False", "-", "eval")
    assert (after[name]["trainable"], after[name]["group"], after[name]["mode"]) == (
        "True", "unfreeze1", "train")
    assert float(after[name]["lr"]) == pytest.approx(0.5 * 0.05 * 0.5)  # cosine at epoch 2 of 2
