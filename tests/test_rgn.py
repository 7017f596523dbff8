"""auto.mode=scale (finetune/train/rgn.py): relative gradient norms, the scales they give
the optimizer's groups, and a measurement that leaves the run as it was."""

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.config.validation import validate
from finetune.errors import ConfigError
from finetune.model.net import Net
from finetune.model.stages import resolve_aliases
from finetune.run import run
from finetune.state.files import load_safe
from finetune.train import rgn
from finetune.train.optim import group_rules
from finetune.train.rgn import RelativeGradientScale, relative_gradient_norms, scales_from

from conftest import FAST, RESNET, make_config


def test_the_relative_gradient_norm_of_a_linear_model_is_the_hand_computed_one():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    batches = [(torch.randn(4, 5), torch.tensor([0, 1, 2, 1])),
               (torch.randn(4, 5), torch.tensor([2, 2, 0, 1]))]
    units = {"weight": [model.weight], "bias": [model.bias]}
    norms = relative_gradient_norms(model, batches, lambda x, y: F.cross_entropy(model(x), y),
                                    units)
    # by hand: d(mean cross-entropy)/d(logits) = (softmax - one-hot) / n, summed over batches
    weight_grad, bias_grad = torch.zeros(3, 5), torch.zeros(3)
    with torch.no_grad():
        for images, labels in batches:
            delta = (torch.softmax(images @ model.weight.T + model.bias, 1)
                     - F.one_hot(labels, 3)) / len(labels)
            weight_grad += delta.T @ images
            bias_grad += delta.sum(0)
    assert norms["weight"] == pytest.approx((weight_grad.norm() / model.weight.norm()).item(), rel=1e-5)
    assert norms["bias"] == pytest.approx((bias_grad.norm() / model.bias.norm()).item(), rel=1e-5)
    assert model.weight.grad is None and model.bias.grad is None


def test_measuring_changes_no_statistic_gradient_flag_or_random_stream():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)  # frozen: measured all the same, frozen after
    model[3].weight.grad = torch.ones_like(model[3].weight)  # a gradient already there stays
    batch = [(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0]))]
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    state = torch.get_rng_state()
    units = {"all": list(model.parameters())}
    norms = relative_gradient_norms(model, batch, lambda x, y: F.cross_entropy(model(x), y), units)
    assert norms["all"] > 0
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), state)
    assert not model[0].weight.requires_grad and model[0].weight.grad is None
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))


def test_the_scales_reach_the_groups_for_one_epoch_and_are_taken_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD([
        {"params": [model[0].weight], "name": "@stage1", "lr": 0.1, "lr_mult": 1.0},
        {"params": [model[0].bias], "name": "@stage1/no_decay", "lr": 0.1, "lr_mult": 1.0},
        {"params": list(model[2].parameters()), "name": "@head", "lr": 0.5, "lr_mult": 5.0}])
    batch = [(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0]))]
    hook = RelativeGradientScale(model, optimizer, lambda epoch: batch,
                                 lambda x, y: F.cross_entropy(model(x), y))
    hook.on_epoch_start(1)
    scale = hook.history[0]["scale"]
    assert set(scale) == {"@stage1", "@head"} and max(scale.values()) == 1.0
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == [0.1 * scale["@stage1"], 0.1 * scale["@stage1"], 0.5 * scale["@head"]]
    assert optimizer.param_groups[2]["lr_mult"] == 5.0 * scale["@head"]
    hook.on_validation_end()  # before the schedule steps: the rates it set back exactly
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.1, 0.5]
    assert [group["lr_mult"] for group in optimizer.param_groups] == [1.0, 1.0, 5.0]


def test_scales_are_each_groups_norm_over_the_largest():
    assert scales_from({"@stem": 0.5, "@head": 2.0}) == {"@stem": 0.25, "@head": 1.0}
    assert scales_from({"@stem": 0.0, "@head": 0.0}) == {"@stem": 1.0, "@head": 1.0}


@pytest.mark.parametrize("key, value, message", [
    ("auto.mode", "sometimes", "auto.mode='sometimes'"),
    ("auto.batches", "0", "auto.batches=0"),
])
def test_a_bad_auto_value_is_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_config(*FAST, f"{key}={value}"))


def test_a_backbone_without_stages_is_refused_for_auto():
    net = Net(nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 2)))
    cfg = make_config(*FAST, "experiment=auto_rgn")
    with pytest.raises(ConfigError, match=r"auto.mode=scale .* backbone \(Sequential\) has no "
                                          "stage mapping"):
        group_rules(cfg, net, resolve_aliases(net.pretrained))


@pytest.mark.slow
def test_with_every_scale_1_a_run_is_bit_identical_to_a_plain_one(tmp_path, monkeypatch):
    """The measurement (forward and backward on 4 batches, every epoch) changes nothing a
    run keeps: forced to scales of 1, the auto run trains the plain run's weights exactly,
    though its optimizer holds one group per stage."""
    common = [*FAST, RESNET, "freeze=[]", "head=mlp", "trainer.max_epochs=2"]
    run(make_config(*common), str(tmp_path / "plain"))
    monkeypatch.setattr(rgn, "scales_from", lambda norms: dict.fromkeys(norms, 1.0))
    run(make_config(*common, "auto.mode=scale"), str(tmp_path / "auto"))
    plain, auto = (load_safe(str(tmp_path / name / "checkpoints" / "last.pt"))["model"]
                   for name in ("plain", "auto"))
    assert plain.keys() == auto.keys()
    assert all(torch.equal(plain[name], auto[name]) for name in plain)
    rows = list(csv.DictReader(open(tmp_path / "auto" / "rgn.csv")))
    assert {row["group"] for row in rows} == {"'@stage1", "'@stage2", "'@stage3", "'@stage4",
                                               "'@stem", "'@head"}  # text in a spreadsheet
    assert [row["epoch"] for row in rows].count("2") == 6 and all(row["scale"] == "1" for row in rows)
