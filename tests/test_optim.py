import pytest
import torch

from finetune.errors import ConfigError
from finetune.run import build

from conftest import FAST, make_config


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
