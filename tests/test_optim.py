import pytest
import torch

from finetune.errors import ConfigError
from finetune.run import build

from conftest import FAST, RESNET, make_config

FAST = (*FAST, RESNET)  # these tests name resnet18's parameters, stages and BatchNorm layers


def optimizer_params(optimizer):
    return [param for group in optimizer.param_groups for param in group["params"]]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_holds_exactly_the_trainable_tensors(optimizer):
    setup = build(make_config(*FAST, f"optimizer={optimizer}",
                              "freeze=[pretrained, '!pretrained.layer4']"))
    held = optimizer_params(setup.optimizer)
    trainable = [param for param in setup.net.parameters() if param.requires_grad]
    assert len(held) == len({id(param) for param in held})  # no tensor twice
    assert {id(param) for param in held} == {id(param) for param in trainable}  # same objects
    assert all(param.requires_grad for param in held)


def test_biases_and_norm_weights_get_no_weight_decay():
    setup = build(make_config(*FAST))
    decay = {group["weight_decay"] for group in setup.optimizer.param_groups}
    assert decay == {5e-4, 0.0}
    for group in setup.optimizer.param_groups:
        expected_1d = group["weight_decay"] == 0.0
        assert all((param.ndim <= 1) == expected_1d for param in group["params"])


def test_decay_bias_and_norm_puts_everything_in_one_group():
    setup = build(make_config(*FAST, "optimizer.decay_bias_and_norm=true"))
    assert [group["weight_decay"] for group in setup.optimizer.param_groups] == [5e-4]


def test_optimizer_settings_reach_the_optimizer():
    setup = build(make_config(*FAST, "optimizer=adamw", "optimizer.lr=3e-4",
                              "optimizer.betas=[0.8,0.9]"))
    assert isinstance(setup.optimizer, torch.optim.AdamW)
    group = setup.optimizer.param_groups[0]
    assert group["lr"] == 3e-4 and tuple(group["betas"]) == (0.8, 0.9)


@pytest.mark.parametrize("scheduler, kind", [
    ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
    ("step", torch.optim.lr_scheduler.StepLR),
    ("none", type(None)),
])
def test_scheduler_choices(scheduler, kind):
    setup = build(make_config(*FAST, f"scheduler={scheduler}", "trainer.max_epochs=4"))
    assert isinstance(setup.scheduler, kind)
    if scheduler == "cosine":
        assert setup.scheduler.T_max == 4


def test_unimportable_optimizer_is_named():
    with pytest.raises(ConfigError, match="optimizer._target_='torch.optim.Sgd'"):
        build(make_config(*FAST, "optimizer._target_=torch.optim.Sgd"))


def groups_by_name(optimizer):
    return {group["name"]: group for group in optimizer.param_groups}


def names_in(setup, group):
    ids = {id(param) for param in group["params"]}
    return {name for name, param in setup.net.named_parameters() if id(param) in ids}


def test_param_groups_first_match_wins_and_the_rest_go_to_default():
    setup = build(make_config(*FAST, "freeze=[]", "optimizer.weight_decay=0.01",
                              "param_groups=[{name: top, patterns: [@stage4, '*.bias'], lr_mult: 0.5},"
                              "{patterns: [@backbone], lr_mult: 0.1, weight_decay: 0.2}]"))
    groups = groups_by_name(setup.optimizer)
    # every bias matched "top", so the default group has no 1-d parameters left to split off
    assert set(groups) == {"default", "top", "top/no_decay", "group1"}
    assert names_in(setup, groups["default"]) == {"add_layers.0.weight"}
    top = names_in(setup, groups["top"]) | names_in(setup, groups["top/no_decay"])
    assert top == {n for n, _ in setup.net.named_parameters()
                   if n.startswith("pretrained.layer4.") or n.endswith(".bias")}
    rest = names_in(setup, groups["group1"])
    assert rest == {n for n, _ in setup.net.named_parameters()
                    if n.startswith("pretrained.") and n not in top}
    assert groups["top"]["lr"] == pytest.approx(0.025) and groups["top"]["weight_decay"] == 0.01
    assert groups["top/no_decay"]["weight_decay"] == 0.0
    assert groups["group1"]["lr"] == pytest.approx(0.005)
    assert groups["group1"]["weight_decay"] == 0.2  # its own decay, 1-d params included
    held = optimizer_params(setup.optimizer)
    assert len(held) == len({id(p) for p in held}) == len(list(setup.net.parameters()))


def test_param_group_pattern_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"param_groups\[0\].patterns\[1\]='layer9'"):
        build(make_config(*FAST, "param_groups=[{patterns: [@stage4, layer9]}]"))


@pytest.mark.slow
def test_frozen_parameters_are_never_in_the_optimizer_even_if_a_group_names_them():
    setup = build(make_config(*FAST, "freeze=[@stem,@stage1,@stage2,@stage3]",
                              "param_groups=[{name: bb, patterns: [@backbone], lr_mult: 0.1}]"))
    held = {id(param) for param in optimizer_params(setup.optimizer)}
    assert held == {id(param) for param in setup.net.parameters() if param.requires_grad}
    bb = [group for group in setup.optimizer.param_groups if group["name"].startswith("bb")]
    assert {id(p) for group in bb for p in group["params"]} == {
        id(p) for p in setup.net.pretrained.layer4.parameters()}


def test_param_group_of_only_frozen_parameters_is_an_error():
    with pytest.raises(ConfigError, match=r"param_groups\[0\] .* matches only frozen parameters"):
        build(make_config(*FAST, "freeze=[@backbone]",
                          "param_groups=[{patterns: [@stage4], lr_mult: 0.1}]"))


@pytest.mark.parametrize("name", ["default", "@head", "@stage3", "unfreeze1"])
def test_param_group_names_the_tool_uses_are_reserved(name):
    with pytest.raises(ConfigError, match=f"param_groups\\[0\\].name='{name}' is taken"):
        build(make_config(*FAST, f"param_groups=[{{name: '{name}', patterns: [@stage4]}}]"))


def test_lr_decay_and_unfreeze_phases_do_not_mix():
    with pytest.raises(ConfigError, match="lr_decay=0.5 and unfreeze phases"):
        build(make_config(*FAST, "freeze=[@backbone]", "lr_decay=0.5", "trainer.max_epochs=3",
                          "unfreeze=[{epoch: 2, patterns: [@stage4]}]"))


@pytest.mark.parametrize("target, extra, message", [
    ("torch.optim.lr_scheduler.ReduceLROnPlateau", [], "needs a metric"),
    ("torch.optim.lr_scheduler.OneCycleLR", ["+scheduler.max_lr=0.1", "+scheduler.total_steps=4"],
     "cannot take the groups that unfreeze phases add"),
])
def test_schedulers_that_cannot_work_are_refused_at_start_up(target, extra, message):
    with pytest.raises(ConfigError, match=message):
        build(make_config(*FAST, "scheduler=none", f"scheduler._target_={target}", *extra,
                          "freeze=[@backbone]", "trainer.max_epochs=3",
                          "unfreeze=[{epoch: 2, patterns: [@stage4]}]"))


def test_layer_wise_lr_decay_from_the_head_down():
    setup = build(make_config(*FAST, "freeze=[]", "lr_decay=0.5"))
    lr = {name: group["lr"] for name, group in groups_by_name(setup.optimizer).items()}
    assert lr["@head"] == pytest.approx(0.05)
    for stage, depth in (("@stage4", 1), ("@stage3", 2), ("@stage2", 3), ("@stage1", 4)):
        assert lr[stage] == pytest.approx(0.05 * 0.5 ** depth), stage
    assert lr["@stem"] == pytest.approx(0.05 * 0.5 ** 5)
    assert "default" not in lr  # every resnet parameter has a stage
    rows = {row.name: row for row in setup.rows()}
    assert rows["pretrained.layer2.0.conv1.weight"].group == "@stage2"
    assert rows["pretrained.layer2.0.conv1.weight"].lr == pytest.approx(0.05 * 0.5 ** 3)


def test_explicit_param_groups_come_before_lr_decay():
    setup = build(make_config(*FAST, "freeze=[]", "lr_decay=0.5",
                              "param_groups=[{name: fast, patterns: [@stage1], lr_mult: 2.0}]"))
    groups = groups_by_name(setup.optimizer)
    assert "@stage1" not in groups and groups["fast"]["lr"] == pytest.approx(0.1)


def test_param_group_names_must_be_unique():
    with pytest.raises(ConfigError, match=r"param_groups\[1\].name='a' is taken"):
        build(make_config(*FAST, "param_groups=[{name: a, patterns: [@stage4]},"
                                 "{name: a, patterns: [@stage3]}]"))
