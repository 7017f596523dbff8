import pytest
import torchvision
from torch import nn

from finetune.errors import ConfigError
from finetune.model.freeze import trainable_flags
from finetune.model.net import Net
from finetune.model.stages import Aliases, resolve_aliases
from finetune.run import build, run

from conftest import make_config, parameters_on_meta


def aliases_of(name: str, **kwargs) -> dict[str, list[str]]:
    with parameters_on_meta():
        backbone = torchvision.models.get_model(name, **kwargs)
    return resolve_aliases(backbone, prefix="p").paths


def p(*paths):
    return [f"p.{path}" for path in paths]


# One model of every family the README documents, with the modules each alias stands for.
DOCUMENTED = {
    "resnet18": {"@stem": p("conv1", "bn1"), "@stage1": p("layer1"), "@stage4": p("layer4"),
                 "@classifier": p("fc")},
    "resnext50_32x4d": {"@stem": p("conv1", "bn1"), "@stage2": p("layer2"), "@stage-1": p("layer4")},
    "wide_resnet50_2": {"@stage3": p("layer3")},
    "convnext_tiny": {"@stem": p("features.0"), "@stage1": p("features.1"),
                      "@stage2": p("features.2", "features.3"),
                      "@stage4": p("features.6", "features.7"), "@classifier": p("classifier")},
    "efficientnet_b0": {"@stem": p("features.0"), "@stage1": p("features.1"),
                        "@stage7": p("features.7", "features.8"), "@classifier": p("classifier")},
    "efficientnet_v2_s": {"@stem": p("features.0"), "@stage6": p("features.6", "features.7")},
    "mobilenet_v2": {"@stem": p("features.0"), "@stage1": p("features.1"),
                     "@stage2": p("features.2", "features.3"),
                     "@stage7": p("features.17", "features.18"), "@classifier": p("classifier")},
    "mobilenet_v3_small": {"@stem": p("features.0"), "@stage3": p("features.4", "features.5",
                                                                  "features.6"),
                           "@stage5": p("features.9", "features.10", "features.11", "features.12")},
    "regnet_y_400mf": {"@stem": p("stem"), "@stage1": p("trunk_output.block1"),
                       "@stage4": p("trunk_output.block4"), "@classifier": p("fc")},
    "densenet121": {"@stem": p("features.conv0", "features.norm0"),
                    "@stage1": p("features.denseblock1"),
                    "@stage2": p("features.transition1", "features.denseblock2"),
                    "@stage4": p("features.transition3", "features.denseblock4", "features.norm5"),
                    "@classifier": p("classifier")},
    "vgg11_bn": {"@stem": p("features.0", "features.1", "features.2", "features.3"),
                 "@stage1": p("features.4", "features.5", "features.6", "features.7"),
                 "@stage-1": p(*[f"features.{i}" for i in range(22, 29)]),
                 "@classifier": p("classifier")},
    "alexnet": {"@stem": p("features.0", "features.1", "features.2"),
                "@stage1": p("features.3", "features.4", "features.5"),
                "@stage2": p(*[f"features.{i}" for i in range(6, 13)]), "@classifier": p("classifier")},
    "vit_b_16": {"@stem": p("conv_proj", "class_token", "encoder.pos_embedding"),
                 "@stage1": p("encoder.layers.encoder_layer_0"),
                 "@stage12": p("encoder.layers.encoder_layer_11", "encoder.ln"),
                 "@classifier": p("heads")},
    "swin_t": {"@stem": p("features.0"), "@stage1": p("features.1"),
               "@stage2": p("features.2", "features.3"),
               "@stage4": p("features.6", "features.7", "norm"), "@classifier": p("head")},
    "swin_v2_t": {"@stage3": p("features.4", "features.5")},
}
STAGE_COUNTS = {"resnet18": 4, "resnext50_32x4d": 4, "wide_resnet50_2": 4, "swin_v2_t": 4,
                "convnext_tiny": 4, "efficientnet_b0": 7, "efficientnet_v2_s": 6,
                "mobilenet_v2": 7, "mobilenet_v3_small": 5, "regnet_y_400mf": 4, "densenet121": 4,
                "vgg11_bn": 4, "alexnet": 2, "vit_b_16": 12, "swin_t": 4}


@pytest.mark.parametrize("name", DOCUMENTED)
def test_aliases_resolve_to_the_documented_modules(name):
    paths = aliases_of(name)
    for alias, expected in DOCUMENTED[name].items():
        assert paths[alias] == expected, alias
    assert paths["@backbone"] == ["p"] and paths["@head"] == ["add_layers"]
    if name in STAGE_COUNTS:
        count = STAGE_COUNTS[name]
        assert f"@stage{count}" in paths and f"@stage{count + 1}" not in paths
        assert paths["@stage-1"] == paths[f"@stage{count}"]


def test_negative_stage_aliases_count_from_the_last():
    paths = aliases_of("resnet50")
    assert paths["@stage-1"] == p("layer4") and paths["@stage-4"] == p("layer1")
    assert "@stage-5" not in paths


def test_unknown_alias_lists_the_valid_ones():
    cfg = make_config("backbone.weights=null", "data=fake", "freeze=[@stage5]")
    with pytest.raises(ConfigError, match=r"'@stage5' does not exist .*ResNet.*@stage1..@stage4"):
        build(cfg)


def test_alias_on_a_backbone_without_a_mapping_is_a_clear_error():
    net = Net(nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 2)))
    aliases = resolve_aliases(net.pretrained)
    names = [name for name, _ in net.named_parameters()]
    assert trainable_flags(names, ["@backbone"], aliases) == {
        "pretrained.0.weight": False, "pretrained.0.bias": False,
        "add_layers.0.weight": True, "add_layers.0.bias": True}
    with pytest.raises(ConfigError, match="'@stem'.*Sequential.*no stage mapping"):
        trainable_flags(names, ["@stem"], aliases)


def test_classifier_alias_explains_a_replaced_classifier():
    with pytest.raises(ConfigError, match="'@classifier' matches no parameter.*keep_classifier"):
        build(make_config("backbone.weights=null", "data=fake", "freeze=[@classifier]"))


def test_aliases_work_in_freeze_lists_with_negation():
    setup = build(make_config("backbone.weights=null", "data=fake", "freeze=[@backbone,'!@stage4']"))
    trainable = {name for name, param in setup.net.named_parameters() if param.requires_grad}
    assert trainable == {name for name, _ in setup.net.named_parameters()
                         if name.startswith(("pretrained.layer4.", "add_layers."))}


def test_dry_run_shows_what_each_alias_resolved_to(tmp_path, caplog):
    caplog.set_level("INFO")
    run(make_config("backbone=convnext_tiny", "backbone.weights=null", "data=fake",
                    "dry_run=true"), str(tmp_path))
    assert "@stem        = pretrained.features.0" in caplog.text
    assert "@stage2      = pretrained.features.2, pretrained.features.3" in caplog.text
    assert "@classifier  = pretrained.classifier" in caplog.text


def test_aliases_describe_skips_negative_duplicates():
    aliases = Aliases("X", {"@stage1": ["a"], "@stage-1": ["a"]})
    assert aliases.describe() == ["@stage1      = a"]
    assert aliases.stage_count == 1
