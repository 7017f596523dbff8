import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from finetune.config.validation import validate
from finetune.errors import ConfigError

from conftest import CONF_DIR, make_config

GROUPS = ("backbone", "head", "data", "optimizer", "scheduler", "adapter", "experiment",
          "hparams_search")


def test_default_config_has_every_section():
    cfg = make_config()
    assert cfg.backbone.name == "resnet18"
    assert cfg.backbone.weights == "auto"
    assert cfg.data.name == "digits"
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.scheduler.T_max == cfg.trainer.max_epochs == 10
    assert cfg.optimized_metric == "best_val_acc"
    assert list(cfg.freeze) == ["@stem", "@stage1"]
    assert list(cfg.unfreeze) == [] and list(cfg.param_groups) == [] and cfg.lr_decay is None
    validate(cfg)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.slow
def test_every_shipped_group_option_composes_and_validates(group):
    options = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
    assert options, f"no options in conf/{group}"
    for option in options:
        cfg = make_config(f"{group}={option}")
        validate(cfg)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_shipped_backbones_include_the_required_ones():
    shipped = {path.stem for path in (CONF_DIR / "backbone").glob("*.yaml")}
    assert {"alexnet", "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0",
            "convnext_tiny", "vit_b_16"} <= shipped


def test_scheduler_length_follows_max_epochs():
    assert make_config("trainer.max_epochs=3").scheduler.T_max == 3


def test_seed_experiment_sets_the_seed_recipe():
    cfg = make_config("experiment=seed")
    assert cfg.backbone.name == "alexnet"
    assert cfg.backbone.keep_classifier is True
    assert list(cfg.freeze) == ["pretrained"]
    assert list(cfg.data.classes) == [0, 1]
    assert [layer._target_ for layer in cfg.head.layers] == [
        "torch.nn.Linear", "torch.nn.ReLU", "torch.nn.Linear"]


@pytest.mark.parametrize("override, key", [
    ("backbone.nmae=resnet18", "nmae"),
    ("optimizer.momentun=0.8", "momentun"),
    ("trainer.max_epoch=3", "max_epoch"),
    ("data.rooot=/tmp", "rooot"),
])
def test_misspelled_key_fails_naming_it(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        make_config(override)
    assert key in str(info.value) + str(info.value.__cause__)


def test_key_of_another_option_is_refused():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        make_config("optimizer=adamw", "optimizer.momentum=0.5")
    assert "momentum" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("override", ["optimizer.lr=fast", "trainer.max_epochs=ten",
                                      "dry_run=maybe"])
@pytest.mark.slow
def test_wrong_type_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make_config(override)


def test_a_freeze_pattern_without_its_list_is_named_with_the_list_it_meant():
    # freeze takes a list, or auto / auto:select: a bare pattern composes, and is refused here
    with pytest.raises(ConfigError, match=r"freeze='pretrained'.*'freeze=\[pretrained\]'"):
        validate(make_config("freeze=pretrained"))


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as info:
        make_config("backbone=resnet99")
    assert "resnet18" in str(info.value) and "alexnet" in str(info.value)


def test_validate_reports_every_problem_at_once():
    cfg = make_config("frozen_modules=sometimes", "optimizer.lr=-1", "data.batch_size=0")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    for fragment in ("frozen_modules='sometimes'", "optimizer.lr=-1", "data.batch_size=0"):
        assert fragment in message


def test_head_layer_without_target_is_refused():
    cfg = make_config("head.layers=[{_target_: torch.nn.ReLU},{out_features: 3}]")
    with pytest.raises(ConfigError, match=r"head.layers\[1\]"):
        validate(cfg)


@pytest.mark.parametrize("overrides, key", [
    (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size=0"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["lr_decay=1.5"], "lr_decay=1.5"),
    (["unfreeze=[{epoch: 2, patterns: [x], lr_mult: 0}]"], "unfreeze[0].lr_mult=0"),
    (["optimizer.lr=0"], "optimizer.lr=0.0"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1.0"),
    (["mode=serve"], "mode='serve'"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["trainer.early_stopping.patience=0"], "trainer.early_stopping.patience=0"),
    (["trainer.early_stopping.monitor=acc"], "trainer.early_stopping.monitor='acc'"),
    (["loss.label_smoothing=1"], "loss.label_smoothing=1.0"),
    (["loss.class_weights=[1,-2]"], "loss.class_weights=[1, -2]"),
    (["loss.class_weights=even"], "loss.class_weights='even'"),
    (["data=imagefolder", "data.augment=strong"], "data.augment='strong'"),
    (["adapter=lora", "adapter.r=0"], "adapter.r=0"),
    (["adapter.name=dora"], "adapter.name='dora'"),
])
@pytest.mark.slow
def test_values_out_of_range_are_named(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(make_config(*overrides))
