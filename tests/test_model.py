import os

import pytest
import torch
import torchvision
from torch import nn

from finetune.errors import ConfigError
from finetune.model.freeze import apply_freeze
from finetune.model.net import Net, build_backbone, build_net, input_spec, resolve_weights, weights_cache_path
from finetune.model.stages import resolve_aliases

from conftest import make_config, parameters_on_meta

# Features each shipped backbone hands the head once its classifier is replaced.
SHIPPED_WIDTHS = {"alexnet": 4096, "resnet18": 512, "resnet50": 2048, "mobilenet_v3_small": 1024,
                  "efficientnet_b0": 1280, "convnext_tiny": 768, "vit_b_16": 768}


def build_on_meta(*overrides, num_classes=10, config=None):
    cfg = config or make_config("backbone.weights=null", *overrides)
    weights = resolve_weights(cfg.backbone)
    with parameters_on_meta():
        backbone = build_backbone(cfg.backbone, weights)
        spec = input_spec(backbone, weights, cfg.backbone.name, cfg.data.image_size, False)
        net = build_net(backbone, cfg.head, num_classes, spec.image_size)
    return net, spec


@pytest.mark.parametrize("name, width", SHIPPED_WIDTHS.items())
@pytest.mark.slow
def test_head_input_size_is_inferred_for_shipped_backbones(name, width):
    net, spec = build_on_meta(f"backbone={name}", "head=mlp")
    first, last = net.add_layers[0], net.add_layers[-1]
    assert (first.in_features, first.out_features) == (width, 256)
    assert (last.in_features, last.out_features) == (256, 10)
    out = net.eval()(torch.zeros(2, 3, spec.image_size, spec.image_size, device="meta"))
    assert tuple(out.shape) == (2, 10)


@pytest.mark.parametrize("name", SHIPPED_WIDTHS)
@pytest.mark.slow
def test_each_shipped_backbone_has_a_default_freeze_list_that_fits_it(name):
    cfg = make_config(f"backbone={name}", "backbone.weights=null")
    net, _ = build_on_meta(config=cfg)
    eval_modules = apply_freeze(net, cfg.freeze, "eval", resolve_aliases(net.pretrained))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in net.parameters())
    assert eval_modules and all(module.startswith("pretrained.") for module in eval_modules)


def test_kept_classifier_feeds_its_logits_to_the_head():
    net, _ = build_on_meta("backbone=alexnet", "backbone.keep_classifier=true", "head=seed",
                           num_classes=2)
    assert [(layer.in_features, layer.out_features) for layer in net.add_layers
            if isinstance(layer, nn.Linear)] == [(1000, 100), (100, 2)]


# One model per family builds the whole Net (its head sized by a sample forward, the slow
# part even on the meta device); every model is checked for its stage aliases.
ONE_PER_FAMILY = {"resnet18", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf",
                  "convnext_tiny", "swin_t", "swin_v2_t", "efficientnet_b0", "efficientnet_v2_s",
                  "mobilenet_v2", "mobilenet_v3_small", "densenet121", "vgg11_bn", "alexnet",
                  "squeezenet1_1", "vit_b_16", "shufflenet_v2_x0_5", "googlenet", "inception_v3",
                  "maxvit_t", "mnasnet0_5"}


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classification_model_has_stage_aliases(name):
    cfg = make_config("backbone.weights=null")  # composed once (cached), then named
    cfg.backbone.name = name
    if name in ONE_PER_FAMILY:
        net, spec = build_on_meta(config=cfg)
        if hasattr(net.pretrained, "aux_logits"):  # googlenet, inception_v3: tuples in training
            net.train()
            out = net(torch.zeros(2, 3, spec.image_size, spec.image_size, device="meta"))
            assert tuple(out.shape) == (2, 10)
    else:
        with parameters_on_meta():
            net = Net(build_backbone(cfg.backbone, resolve_weights(cfg.backbone)), nn.Sequential())
    # stem, stages and classifier hold every backbone parameter exactly once
    aliases = resolve_aliases(net.pretrained)
    parts = ["@stem", "@classifier"] + [f"@stage{i}" for i in range(1, aliases.stage_count + 1)]
    assert aliases.stage_count >= 2
    for param_name, _ in net.pretrained.named_parameters():
        full = "pretrained." + param_name
        owners = [alias for alias in parts
                  if any(full == path or full.startswith(path + ".") for path in aliases.paths[alias])]
        assert len(owners) == 1, f"{full}: {owners}"
    apply_freeze(net, cfg.freeze, "eval", aliases)  # the default freeze list fits every model


def test_vit_gets_the_one_image_size_it_accepts():
    _, spec = build_on_meta("backbone=vit_b_16")
    assert spec.image_size == 224
    for built_for_32 in ("backbone=vit_b_16", "+backbone.kwargs.image_size=32"), (
            "backbone.name=timm/test_vit", "+backbone.kwargs.img_size=32"):  # not the weights' size
        assert build_on_meta(*built_for_32)[1].image_size == 32


def test_parameter_names_follow_the_seed():
    cfg = make_config("backbone.weights=null")
    backbone = build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    net = build_net(backbone, cfg.head, 10, 32)
    names = [name for name, _ in net.named_parameters()]
    assert isinstance(net, Net) and isinstance(net.add_layers, nn.Sequential)
    assert names[0] == "pretrained.conv1.weight"
    assert names[-2:] == ["add_layers.0.weight", "add_layers.0.bias"]
    assert not any(name.startswith("pretrained.fc.") for name in names)  # replaced by Identity


def test_unknown_backbone_names_the_closest():
    cfg = make_config("backbone.name=resnet_18")
    with pytest.raises(ConfigError, match="backbone.name='resnet_18'.*'resnet18'"):
        resolve_weights(cfg.backbone)


def test_unknown_weights_name_lists_the_valid_ones():
    cfg = make_config("backbone.weights=IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="Valid: DEFAULT, IMAGENET1K_V1"):
        resolve_weights(cfg.backbone)


def test_named_weights_not_cached_fail_with_file_and_cache_path():
    cfg = make_config("backbone.weights=IMAGENET1K_V1")
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(ConfigError) as info:
        resolve_weights(cfg.backbone)
    assert "resnet18-f37072fd.pth" in str(info.value)
    assert weights_cache_path(enum) in str(info.value)
    assert enum.url in str(info.value)


def test_auto_weights_fall_back_to_random_init_when_unavailable():
    weights = resolve_weights(make_config().backbone)
    assert weights.enum is None
    assert "random init" in weights.description


def place_in_torch_cache(enum, seed=1):
    """A stand-in for a downloaded torchvision weights file, where torch.hub looks for it."""
    torch.manual_seed(seed)
    state = torchvision.models.get_model(enum.url.split("/")[-1].split("-")[0]).state_dict()
    os.makedirs(os.path.dirname(weights_cache_path(enum)), exist_ok=True)
    torch.save(state, weights_cache_path(enum))
    return state


@pytest.mark.parametrize("weights", ["auto", "DEFAULT", "IMAGENET1K_V1"])
@pytest.mark.slow
def test_cached_torchvision_weights_are_loaded(weights):
    state = place_in_torch_cache(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    cfg = make_config(f"backbone.weights={weights}", "backbone.keep_classifier=true")
    resolved = resolve_weights(cfg.backbone)
    assert resolved.enum == torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    loaded = build_backbone(cfg.backbone, resolved).state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_pretrained_weights_bring_their_normalization():
    place_in_torch_cache(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    cfg = make_config()
    weights = resolve_weights(cfg.backbone)
    backbone = build_backbone(cfg.backbone, weights)
    spec = input_spec(backbone, weights, "resnet18", 64, use_weights_size=True)
    assert (spec.image_size, spec.resize_size) == (224, 256)
    assert tuple(spec.mean) == (0.485, 0.456, 0.406)


def save_checkpoint_file(tmp_path, state, name="backbone.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_plain_torchvision_state_dict_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    cfg = make_config("backbone.weights=null",
                      f"backbone.checkpoint={save_checkpoint_file(tmp_path, state)}")
    backbone = build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    loaded = backbone.state_dict()
    assert isinstance(backbone.fc, nn.Identity)
    assert all(torch.equal(loaded[key], state[key]) for key in loaded)


def test_checkpoint_is_what_the_weights_description_says(tmp_path):
    path = save_checkpoint_file(tmp_path, torchvision.models.resnet18().state_dict())
    weights = resolve_weights(make_config("backbone.weights=null", f"backbone.checkpoint={path}").backbone)
    assert weights.pretrained and str(weights) == f"checkpoint {path} (over random init " \
        "(backbone.weights=null))"


def test_checkpoint_saved_by_this_tool_is_loaded(tmp_path):
    cfg = make_config("backbone.weights=null")
    net = build_net(build_backbone(cfg.backbone, resolve_weights(cfg.backbone)), cfg.head, 10, 32)
    path = save_checkpoint_file(tmp_path, {"model": net.state_dict(), "epoch": 3})
    cfg = make_config("backbone.weights=null", f"backbone.checkpoint={path}")
    torch.manual_seed(99)  # a different random init underneath
    backbone = build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, net.pretrained.state_dict()[name])


@pytest.mark.slow
def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    path = save_checkpoint_file(tmp_path, torchvision.models.alexnet().state_dict())
    cfg = make_config("backbone.weights=null", f"backbone.checkpoint={path}")
    with pytest.raises(ConfigError) as info:
        build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    message = str(info.value)
    assert "missing keys" in message and "conv1.weight" in message
    assert "unexpected keys" in message and "features.0.weight" in message


def test_checkpoint_with_another_class_count_names_the_shapes(tmp_path):
    path = save_checkpoint_file(tmp_path, torchvision.models.resnet18(num_classes=10).state_dict())
    cfg = make_config("backbone.weights=null", f"backbone.checkpoint={path}",
                      "backbone.keep_classifier=true")
    with pytest.raises(ConfigError, match=r"fc.weight: file \(10, 512\), model \(1000, 512\)"
                                          r".*backbone.kwargs.num_classes"):
        build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    fitted = make_config("backbone.weights=null", f"backbone.checkpoint={path}",
                         "backbone.keep_classifier=true", "+backbone.kwargs.num_classes=10")
    assert build_backbone(fitted.backbone, resolve_weights(fitted.backbone)).fc.out_features == 10


def test_missing_checkpoint_file_is_named(tmp_path):
    cfg = make_config("backbone.weights=null", f"backbone.checkpoint={tmp_path}/nope.pt")
    with pytest.raises(ConfigError, match="backbone.checkpoint=.*nope.pt.*does not exist"):
        build_backbone(cfg.backbone, resolve_weights(cfg.backbone))


def test_head_in_features_that_contradict_the_backbone_are_refused():
    cfg = make_config("backbone.weights=null", "head.layers=[{_target_: torch.nn.Linear, "
                      "in_features: 1000}]")
    backbone = build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    with pytest.raises(ConfigError, match=r"head.layers\[0\].in_features=1000.*512"):
        build_net(backbone, cfg.head, 10, 32)


def test_head_output_must_match_the_class_count():
    cfg = make_config("backbone.weights=null", "head.layers=[{_target_: torch.nn.Linear, "
                      "out_features: 7}]")
    backbone = build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    with pytest.raises(ConfigError, match="head outputs 7 values but the data has 10 classes"):
        build_net(backbone, cfg.head, 10, 32)


def test_head_layer_that_fails_to_build_is_named():
    cfg = make_config("backbone.weights=null", "head.layers=[{_target_: torch.nn.Linear, size: 3}]")
    backbone = build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    with pytest.raises(ConfigError, match=r"head.layers\[0\].*size"):
        build_net(backbone, cfg.head, 10, 32)


def test_head_target_that_is_not_a_class_is_named():
    cfg = make_config("backbone.weights=null", "head.layers=[{_target_: torch.nn.Lineer}]")
    backbone = build_backbone(cfg.backbone, resolve_weights(cfg.backbone))
    with pytest.raises(ConfigError, match=r"head.layers\[0\]._target_='torch.nn.Lineer'"):
        build_net(backbone, cfg.head, 10, 32)
