import csv

import pytest
import torch
from torch import nn

from finetune.errors import ConfigError
from finetune.model.freeze import apply_freeze, fully_frozen_modules, trainable_flags
from finetune.model.net import Net
from finetune.model.stages import resolve_aliases
from finetune.run import build
from finetune.show.report import format_report, parameter_rows, write_params_tsv

from conftest import make_config

# The seed recipe's printout, copied from shared/seed: 16 frozen alexnet tensors, 4 head ones.
SEED_NAMES = [
    "pretrained.features.0.weight", "pretrained.features.0.bias",
    "pretrained.features.3.weight", "pretrained.features.3.bias",
    "pretrained.features.6.weight", "pretrained.features.6.bias",
    "pretrained.features.8.weight", "pretrained.features.8.bias",
    "pretrained.features.10.weight", "pretrained.features.10.bias",
    "pretrained.classifier.1.weight", "pretrained.classifier.1.bias",
    "pretrained.classifier.4.weight", "pretrained.classifier.4.bias",
    "pretrained.classifier.6.weight", "pretrained.classifier.6.bias",
    "add_layers.0.weight", "add_layers.0.bias", "add_layers.2.weight", "add_layers.2.bias",
]


def small_net() -> Net:
    """An alexnet-shaped toy: features 0..10 with a BatchNorm at 1, classifier, 2-layer head."""
    features = nn.Sequential(*[nn.Conv2d(3, 3, 1) if i != 1 else nn.BatchNorm2d(3)
                               for i in range(11)])
    pretrained = nn.Sequential()
    pretrained.add_module("features", features)
    pretrained.add_module("pool", nn.AdaptiveAvgPool2d(1))
    pretrained.add_module("flatten", nn.Flatten())
    pretrained.add_module("classifier", nn.Sequential(nn.Dropout(), nn.Linear(3, 4)))
    return Net(pretrained, nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)))


NAMES = [name for name, _ in small_net().named_parameters()]
ALIASES = resolve_aliases(small_net().pretrained)  # a plain Sequential: @backbone and @head only


def freeze(net, patterns, mode="eval"):
    return apply_freeze(net, patterns, mode, resolve_aliases(net.pretrained))


def frozen(patterns):
    flags = trainable_flags(NAMES, patterns, ALIASES)
    return sorted(name for name, trainable in flags.items() if not trainable)


def test_seed_component_pattern_freezes_the_whole_backbone():
    assert frozen(["pretrained"]) == sorted(n for n in NAMES if n.startswith("pretrained."))


def test_dotted_path_matches_whole_components_only():
    # features.1 must not catch features.10
    assert frozen(["pretrained.features.1"]) == ["pretrained.features.1.bias",
                                                 "pretrained.features.1.weight"]
    assert frozen(["classifier"]) == ["pretrained.classifier.1.bias",
                                      "pretrained.classifier.1.weight"]


def test_glob_over_the_full_name():
    assert frozen(["pretrained.features.1*.weight"]) == ["pretrained.features.1.weight",
                                                         "pretrained.features.10.weight"]
    assert frozen(["*.bias"]) == sorted(n for n in NAMES if n.endswith(".bias"))
    assert frozen(["pretrained.features.[02].*"]) == [
        "pretrained.features.0.bias", "pretrained.features.0.weight",
        "pretrained.features.2.bias", "pretrained.features.2.weight"]


def test_regular_expression():
    assert frozen([r"re:^pretrained\.features\.(0|10)\."]) == [
        "pretrained.features.0.bias", "pretrained.features.0.weight",
        "pretrained.features.10.bias", "pretrained.features.10.weight"]


def test_negation_makes_trainable_again_in_order():
    assert frozen(["pretrained", "!pretrained.classifier"]) == sorted(
        n for n in NAMES if n.startswith("pretrained.features."))
    # order matters: a later pattern wins
    assert frozen(["pretrained", "!pretrained.classifier", "pretrained.classifier.1.bias"]) == sorted(
        n for n in NAMES if n.startswith("pretrained.features.") or n.endswith("classifier.1.bias"))


@pytest.mark.parametrize("patterns", [["!pretrained.classifier", "pretrained"],
                                      ["pretrained.features", "!add_layers"]])
def test_negation_that_undoes_nothing_is_an_error(patterns):
    with pytest.raises(ConfigError, match=r"freeze\[\d\]='!.*' makes nothing trainable again"):
        trainable_flags(NAMES, patterns, ALIASES)


def test_pattern_matching_nothing_names_it_and_the_closest_names():
    with pytest.raises(ConfigError) as info:
        trainable_flags(NAMES, ["pretrained", "pretrained.clasifier"], ALIASES)
    assert "freeze[1]='pretrained.clasifier' matches no parameter" in str(info.value)
    assert "pretrained.classifier" in str(info.value)


@pytest.mark.parametrize("pattern", ["!layer9", "re:^nothing", "*.gamma"])
def test_every_pattern_form_must_match(pattern):
    with pytest.raises(ConfigError, match="matches no parameter"):
        trainable_flags(NAMES, [pattern], ALIASES)


def test_freezing_everything_is_an_error():
    with pytest.raises(ConfigError, match="freezes all 28 parameters"):
        trainable_flags(NAMES, ["pretrained", "add_layers"], ALIASES)


def test_bad_regular_expression_is_named():
    with pytest.raises(ConfigError, match="freeze\\[0\\]='re:layer\\(' is not a valid regular expression"):
        trainable_flags(NAMES, ["re:layer("], ALIASES)


def test_fully_frozen_modules_are_the_outermost_ones():
    net = small_net()
    freeze(net, ["pretrained.features", "pretrained.classifier.1.weight"])
    # classifier.1 is only partly frozen; the features block is chosen, not its children
    assert fully_frozen_modules(net) == ["pretrained.features"]
    assert net.frozen_eval_modules == ["pretrained.features"]


def test_net_train_keeps_fully_frozen_modules_in_eval_mode():
    net = small_net()
    freeze(net, ["pretrained"])
    net.train()
    assert not any(module.training for module in net.pretrained.modules())
    # a parameter-free layer in the trainable head keeps training behaviour
    assert net.add_layers.training and net.add_layers[1].training
    net.eval()
    assert not any(module.training for module in net.modules())


def test_frozen_modules_train_gives_plain_pytorch_behaviour():
    net = small_net()
    freeze(net, ["pretrained"], "train")
    net.train()
    assert all(module.training for module in net.modules())


def test_negation_sets_requires_grad_on_the_net():
    net = small_net()
    freeze(net, ["pretrained", "!pretrained.classifier"])
    trainable = {name for name, param in net.named_parameters() if param.requires_grad}
    assert trainable == {n for n in NAMES if "classifier" in n or n.startswith("add_layers")}


def test_report_and_params_tsv(tmp_path):
    net = small_net()
    eval_modules = freeze(net, ["pretrained.features"])
    optimizer = torch.optim.SGD([{"params": [p for p in net.parameters() if p.requires_grad],
                                  "name": "default", "weight_decay": 0.01}], lr=0.5)
    rows = parameter_rows(net, optimizer)
    text = "\n".join(format_report(rows, optimizer, eval_modules))
    assert "params: \tpretrained.features.0.weight, \tgradient: False\t[eval]" in text
    assert "params: \tadd_layers.2.bias, \tgradient: True\t[default lr=0.5 wd=0.01 train]" in text
    total = sum(p.numel() for p in net.parameters())
    frozen_count = sum(p.numel() for n, p in net.named_parameters() if n.startswith("pretrained.f"))
    assert f"trainable: {total - frozen_count:,d} / {total:,d}" in text
    assert "kept in eval mode while training (fully frozen): pretrained.features" in text
    write_params_tsv(rows, tmp_path / "params.tsv")
    table = list(csv.DictReader(open(tmp_path / "params.tsv"), delimiter="\t"))
    assert [row["name"] for row in table] == NAMES
    assert table[0] == {"name": "pretrained.features.0.weight", "shape": "3x3x1x1", "numel": "9",
                        "trainable": "False", "group": "-", "lr": "", "weight_decay": "",
                        "mode": "eval"}
    assert table[-1] == {"name": "add_layers.2.bias", "shape": "2", "numel": "2",
                         "trainable": "True", "group": "default", "lr": "0.5",
                         "weight_decay": "0.01", "mode": "train"}


def test_large_models_get_a_per_module_summary():
    setup = build(make_config("backbone.weights=null", "data=fake", "data.train_size=8",
                              "data.val_size=8", "freeze=[pretrained.layer1]"))
    lines = format_report(setup.rows(), setup.optimizer, setup.net.frozen_eval_modules)
    assert not any(line.startswith("params:") for line in lines)
    modules = {line.split()[0]: line.split()[1:] for line in lines[:7]}
    assert list(modules) == ["pretrained.conv1", "pretrained.bn1", "pretrained.layer1",
                             "pretrained.layer2", "pretrained.layer3", "pretrained.layer4",
                             "add_layers.0"]
    assert modules["pretrained.layer1"] == ["147,968", "params", "frozen", "eval"]
    assert modules["pretrained.layer2"] == ["525,568", "params", "trainable", "train", "default,",
                                            "default/no_decay"]


def test_seed_table_is_reproduced():
    setup = build(make_config("experiment=seed", "backbone.allow_download=false"))
    lines = format_report(setup.rows(), setup.optimizer, setup.net.frozen_eval_modules)
    flags = [False] * 16 + [True] * 4
    assert [line.split("\t[")[0] for line in lines[:20]] == [
        f"params: \t{name}, \tgradient: {flag}" for name, flag in zip(SEED_NAMES, flags, strict=True)]
    assert setup.net.frozen_eval_modules == ["pretrained"]
    head = [layer for layer in setup.net.add_layers if isinstance(layer, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in head] == [(1000, 100), (100, 2)]
    assert setup.net(torch.zeros(2, 3, 64, 64)).shape == (2, 2)
