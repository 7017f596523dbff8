"""freeze=auto and freeze=auto:select (finetune/train/rgn.py): relative gradient norms, the
scales they give the optimizer's groups, the stages they freeze, and a measurement that
leaves the run as it was."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from finetune.config.validation import validate
from finetune.errors import ConfigError
from finetune.model.net import Net
from finetune.model.stages import resolve_aliases
from finetune.run import build, run
from finetune.state.checkpoint import read_run_checkpoint
from finetune.train import rgn
from finetune.train.optim import group_rules
from finetune.train.rgn import (
    RelativeGradientScale,
    StageChoice,
    checked_choice,
    choose_stages,
    relative_gradient_norms,
    scales_from,
)

from conftest import FAST, RESNET, make_config

ALIAS_PREFIXES = {"@stem": ("pretrained.conv1.", "pretrained.bn1."),
                  **{f"@stage{k}": (f"pretrained.layer{k}.",) for k in range(1, 5)}}


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
    assert scales_from({"@stem": 0.5, "@stage1": 2.0}) == {"@stem": 0.25, "@stage1": 1.0}
    assert scales_from({"@stem": 0.0, "@head": 0.0}) == {"@stem": 1.0, "@head": 1.0}


def test_the_new_head_and_an_all_zero_tensor_train_at_the_full_rate_and_are_not_compared():
    norms = {"@stem": 0.5, "@stage1": 1.0, "@head": 40.0, "bias": math.nan}
    assert scales_from(norms, fresh=["@head"]) == {"@stem": 0.5, "@stage1": 1.0, "@head": 1.0,
                                                   "bias": 1.0}


def test_select_freezes_the_stages_below_keep_times_the_largest_but_never_the_head():
    norms = {"@stem": 0.9, "@stage1": 0.5, "@stage2": 0.3, "@stage3": 1.0, "@head": 50.0}
    assert StageChoice.measured(norms, keep=0.9).frozen == ["@stage1", "@stage2"]
    assert StageChoice.measured(norms, keep=0.4).frozen == ["@stage2"]
    assert "@stage2 0.3 (0.30)" in StageChoice.measured(norms, keep=0.4).describe()


def test_a_checkpoints_choice_must_name_this_backbones_stages():
    units = {"@stem": [], "@stage1": [], "@head": []}
    assert checked_choice(["@stem"], units) == ["@stem"]
    for bad in (["@head"], ["pretrained"], "@stem", [1]):
        with pytest.raises(ConfigError, match="freeze=auto:select choice"):
            checked_choice(bad, units)


@pytest.mark.parametrize("overrides, message", [
    (["freeze=sometimes"], "freeze='sometimes'"),
    (["freeze=auto", "auto.batches=0"], "auto.batches=0"),
    (["freeze=auto", "auto.granularity=layer"], "auto.granularity='layer'"),
    (["freeze=auto:select", "auto.keep=0"], "auto.keep=0"),
    (["freeze=auto:select", "auto.keep=1.5"], "auto.keep=1.5"),
    (["freeze=auto:select", "auto.granularity=tensor"], "auto:select freezes whole stages"),
    (["freeze=auto", "unfreeze=[{epoch: 2, patterns: [@stage-1]}]"], "drop the unfreeze"),
    (["freeze=auto", "adapter=lora"], "adapter.name='lora'"),
])
def test_a_bad_auto_value_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_config(*FAST, *overrides))


def test_a_backbone_without_stages_is_refused_for_auto():
    net = Net(nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 2)))
    cfg = make_config(*FAST, "freeze=auto")
    with pytest.raises(ConfigError, match=r"freeze=auto .* backbone \(Sequential\) has no "
                                          "stage mapping; use auto.granularity=tensor"):
        group_rules(cfg, net, resolve_aliases(net.pretrained))
    with pytest.raises(ConfigError, match=r"freeze=auto:select freezes whole stages"):
        choose_stages(net, resolve_aliases(net.pretrained), [], None, 0.9)


def test_tensor_granularity_gives_each_parameter_tensor_a_group_at_its_stage_rate():
    net = Net(resnet18(num_classes=10), nn.Sequential(nn.Linear(512, 3)))
    aliases = resolve_aliases(net.pretrained)
    cfg = make_config(*FAST, RESNET, "freeze=auto", "auto.granularity=tensor", "lr_decay=0.5")
    rules = group_rules(cfg, net, aliases)
    names = [name for name, _ in net.named_parameters()]
    assert [rule.name for rule in rules] == names
    by_name = {rule.name: rule for rule in rules}
    assert by_name["pretrained.conv1.weight"].lr_mult == 0.5 ** 5  # the stem, under 4 stages
    assert by_name["add_layers.0.weight"].lr_mult == 1.0


@pytest.mark.slow
def test_with_every_scale_1_a_run_is_bit_identical_to_a_plain_one(tmp_path, monkeypatch):
    """The measurement (forward and backward on 4 batches, every epoch) changes nothing a
    run keeps: forced to scales of 1, the auto run trains the plain run's weights exactly,
    though its optimizer holds one group per stage (or per tensor)."""
    common = [*FAST, RESNET, "head=mlp", "trainer.max_epochs=2"]
    run(make_config(*common, "freeze=[]"), str(tmp_path / "plain"))
    plain = read_run_checkpoint(str(tmp_path / "plain" / "checkpoints" / "last.pt"))["model"]
    monkeypatch.setattr(rgn, "scales_from", lambda norms, fresh=(): dict.fromkeys(norms, 1.0))
    for granularity in ("stage", "tensor"):
        run_dir = tmp_path / granularity
        run(make_config(*common, "freeze=auto", f"auto.granularity={granularity}"), str(run_dir))
        auto = read_run_checkpoint(str(run_dir / "checkpoints" / "last.pt"))["model"]
        assert plain.keys() == auto.keys()
        assert all(torch.equal(plain[name], auto[name]) for name in plain), granularity
        rows = list(csv.DictReader(open(run_dir / "rgn.csv")))
        metrics = list(csv.DictReader(open(run_dir / "metrics.csv")))
        if granularity == "stage":
            units = ["@stem", "@stage1", "@stage2", "@stage3", "@stage4", "@head"]
            assert {row["group"] for row in rows} == {"'" + unit for unit in units}  # text
        else:  # every parameter tensor of the model, by its name
            units = [row["group"] for row in rows if row["epoch"] == "1"]
            assert len(units) > 62 and set(units) <= set(plain) and "pretrained.conv1.weight" in units
        assert [row["epoch"] for row in rows].count("2") == len(units)
        assert all(row["scale"] == "1" for row in rows)
        assert [key for key in metrics[0] if key.startswith("lr_scale/")] == [
            f"lr_scale/{unit}" for unit in units]
        assert all(float(row[f"lr_scale/{unit}"]) == 1.0 for row in metrics for unit in units)


@pytest.mark.slow
def test_auto_select_freezes_what_it_chose_and_trains_as_that_freeze_list(tmp_path, caplog):
    """freeze=auto:select measures once, freezes the stages below auto.keep, and then trains
    exactly as `freeze=<those stages>` would: the chosen stages bit-identical to their start
    (BatchNorm statistics included), and the measurement leaves no trace in the result."""
    caplog.set_level("INFO")
    common = [*FAST, RESNET, "trainer.max_epochs=2", "auto.keep=0.95"]
    run(make_config(*common, "freeze=auto:select"), str(tmp_path / "select"))
    checkpoint = read_run_checkpoint(str(tmp_path / "select" / "checkpoints" / "last.pt"))
    frozen = checkpoint["run"]["auto_frozen"]
    assert frozen and "@head" not in frozen and len(frozen) < 5  # the largest stage trains
    assert f"freeze=auto:select -> {frozen}" in caplog.text and "relative gradient norms" in caplog.text
    run(make_config(*common, f"freeze=[{','.join(frozen)}]"), str(tmp_path / "listed"))
    listed = read_run_checkpoint(str(tmp_path / "listed" / "checkpoints" / "last.pt"))["model"]
    assert all(torch.equal(value, listed[name]) for name, value in checkpoint["model"].items())
    start = build(make_config(*common, f"freeze=[{','.join(frozen)}]")).net.state_dict()
    prefixes = tuple(prefix for alias in frozen for prefix in ALIAS_PREFIXES[alias])
    kept = [name for name in start if name.startswith(prefixes)]
    assert kept and all(torch.equal(start[name], checkpoint["model"][name]) for name in kept)


@pytest.mark.slow
def test_auto_select_that_freezes_the_whole_backbone_caches_its_features(tmp_path, monkeypatch,
                                                                          caplog):
    caplog.set_level("INFO")
    every_stage = ["@stem", "@stage1", "@stage2", "@stage3", "@stage4"]
    monkeypatch.setattr(StageChoice, "measured",
                        classmethod(lambda cls, norms, keep: cls(every_stage, keep, norms)))
    run(make_config(*FAST, RESNET, "trainer.max_epochs=1", "freeze=auto:select"),
        str(tmp_path / "run"))
    assert "feature cache: on" in caplog.text
