"""Stage aliases: names that mean the same part of the network in every torchvision family
(and in timm's models, from timm's own coarse grouping of their parameters).

  @stem          the layers before the first stage
  @stage1..N     the backbone's stages, input side first; @stage-1 is the last one
  @classifier    the backbone's own classifier (replaced by an identity unless kept)
  @backbone      all of Net.pretrained          @head   all of Net.add_layers

Each family's stages follow its paper's structure (ResNet's layer1-4, ConvNeXt's four
stages with the downsampling layer in front of each, ...); layers after the last stage (a
final 1x1 conv or norm) belong to the last stage, so stem + stages + classifier hold every
backbone parameter exactly once. `python train.py dry_run=true` prints the resolution.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision import models

from finetune.errors import ConfigError


@dataclass
class Stages:
    """Module (or parameter) paths inside the backbone for each part."""

    stem: list[str]
    stages: list[list[str]]
    classifier: list[str]


def children(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{name}", child) for name, child in module.named_children()]


def split_after_pools(blocks: list[tuple[str, nn.Module]]) -> list[list[str]]:
    """VGG / AlexNet / SqueezeNet: a block ends at each max-pool."""
    groups, current = [], []
    for path, module in blocks:
        current.append(path)
        if isinstance(module, nn.MaxPool2d):
            groups.append(current)
            current = []
    if current:  # SqueezeNet's last fire modules come after its last pool
        groups.append(current)
    return groups


def group_by_out_channels(blocks: list[tuple[str, nn.Module]]) -> list[list[str]]:
    """MobileNet: consecutive inverted-residual blocks with the same width form a stage."""
    groups: list[list[str]] = []
    width = None
    for path, block in blocks:
        if block.out_channels != width:
            groups.append([])
            width = block.out_channels
        groups[-1].append(path)
    return groups


def with_downsampling(layers: list[tuple[str, nn.Module]]) -> list[list[str]]:
    """ConvNeXt / Swin: features 1, 3, 5, 7 are stages, 2, 4, 6 the downsampling in front."""
    paths = [path for path, _ in layers]
    return [paths[max(i - 1, 1):i + 1] for i in range(1, len(paths), 2)]


def resnet(m):
    return Stages(["conv1", "bn1"], [["layer1"], ["layer2"], ["layer3"], ["layer4"]], ["fc"])


def regnet(m):
    return Stages(["stem"], [[path] for path, _ in children(m.trunk_output, "trunk_output")], ["fc"])


def convnext(m):
    return Stages(["features.0"], with_downsampling(children(m.features, "features")),
                  ["classifier"])


def swin(m):
    stages = with_downsampling(children(m.features, "features"))
    stages[-1].append("norm")
    return Stages(["features.0"], stages, ["head"])


def efficientnet(m):
    blocks = [path for path, _ in children(m.features, "features")]
    stages = [[path] for path in blocks[1:-1]]
    stages[-1].append(blocks[-1])  # the final 1x1 conv
    return Stages([blocks[0]], stages, ["classifier"])


def mobilenet(m):
    blocks = children(m.features, "features")
    stages = group_by_out_channels(blocks[1:-1])
    stages[-1].append(blocks[-1][0])  # the final 1x1 conv
    return Stages([blocks[0][0]], stages, ["classifier"])


def densenet(m):
    names = [name for name, _ in m.features.named_children()]
    blocks = [name for name in names if name.startswith("denseblock")]
    stages = [[f"features.{name}"] for name in blocks]
    for index in range(1, len(blocks)):  # the transition in front of each later block
        stages[index].insert(0, f"features.transition{index}")
    stages[-1].append("features.norm5")
    return Stages(["features.conv0", "features.norm0"], stages, ["classifier"])


def pooled_features(m):
    blocks = split_after_pools(children(m.features, "features"))
    return Stages(blocks[0], blocks[1:], ["classifier"])


def vision_transformer(m):
    stages = [[path] for path, _ in children(m.encoder.layers, "encoder.layers")]
    stages[-1].append("encoder.ln")
    return Stages(["conv_proj", "class_token", "encoder.pos_embedding"], stages, ["heads"])


def shufflenet(m):
    return Stages(["conv1"], [["stage2"], ["stage3"], ["stage4", "conv5"]], ["fc"])


def googlenet(m):
    return Stages(["conv1", "conv2", "conv3"],
                  [["inception3a", "inception3b"],
                   ["inception4a", "inception4b", "inception4c", "inception4d", "inception4e"],
                   ["inception5a", "inception5b"]], ["fc"])


def inception(m):
    return Stages(["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
                   "Conv2d_4a_3x3"],
                  [["Mixed_5b", "Mixed_5c", "Mixed_5d"],
                   ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
                   ["Mixed_7a", "Mixed_7b", "Mixed_7c"]], ["fc"])


def maxvit(m):
    return Stages(["stem"], [[path] for path, _ in children(m.blocks, "blocks")], ["classifier"])


def mnasnet(m):
    layers = [path for path, _ in children(m.layers, "layers")]
    stages = [[path] for path in layers[8:14]]  # layers 0-7: stem; 8-13: the six stacks
    stages[-1].extend(layers[14:])  # the final 1x1 conv
    return Stages(layers[:8], stages, ["classifier"])


FAMILIES: dict[type, Callable[[nn.Module], Stages]] = {
    models.ResNet: resnet,  # also ResNeXt and Wide-ResNet
    models.RegNet: regnet,
    models.ConvNeXt: convnext,
    models.SwinTransformer: swin,  # v1 and v2
    models.EfficientNet: efficientnet,  # v1 and v2
    models.MobileNetV2: mobilenet,
    models.MobileNetV3: mobilenet,
    models.DenseNet: densenet,
    models.VGG: pooled_features,
    models.AlexNet: pooled_features,
    models.SqueezeNet: pooled_features,
    models.VisionTransformer: vision_transformer,
    models.ShuffleNetV2: shufflenet,
    models.GoogLeNet: googlenet,
    models.Inception3: inception,
    models.MaxVit: maxvit,
    models.MNASNet: mnasnet,
}


def timm_stages(backbone: nn.Module) -> Stages | None:
    """Stem, stages and classifier from timm's own coarse grouping of the parameters: the
    first group is the stem, each later one a stage; a last group of shallow parameters only
    (a final norm or 1x1 conv, as after ConvNeXt's and Swin's last stage) joins the last
    stage, as it does for torchvision models. A kept classifier is @classifier."""
    from timm.models import group_parameters

    if not hasattr(backbone, "group_matcher"):
        return None
    prefix = f"{backbone.pretrained_cfg.get('classifier') or '-'}."
    classifier = [name for name, _ in backbone.named_parameters() if name.startswith(prefix)]
    groups = [[name for name in group if not name.startswith(prefix)] for group in
              group_parameters(backbone, backbone.group_matcher(coarse=True)).values()]
    groups = [group for group in groups if group]
    if len(groups) < 2:
        return None
    stem, stages = groups[0], groups[1:]
    if len(stages) > 1 and all(name.count(".") <= 2 for name in stages[-1]):
        stages = [*stages[:-2], stages[-2] + stages[-1]]
    return Stages(stem=stem, stages=stages, classifier=classifier)


def backbone_stages(backbone: nn.Module) -> Stages | None:
    for family, describe in FAMILIES.items():
        if isinstance(backbone, family):
            return describe(backbone)
    if type(backbone).__module__.startswith("timm."):
        return timm_stages(backbone)
    return None


@dataclass
class Aliases:
    """The aliases one backbone has, each mapped to dotted paths inside the Net."""

    family: str
    paths: dict[str, list[str]]

    @property
    def stage_count(self) -> int:
        return sum(1 for alias in self.paths if alias.startswith("@stage") and "-" not in alias)

    def lookup(self, alias: str) -> list[str]:
        if alias in self.paths:
            return self.paths[alias]
        if self.stage_count == 0:
            raise ConfigError(
                f"alias {alias!r}: the backbone ({self.family}) has no stage mapping; only "
                "@backbone and @head work for it. Use parameter names instead (list them with: "
                "python train.py dry_run=true 'freeze=[]').")
        raise ConfigError(
            f"alias {alias!r} does not exist for this backbone ({self.family}): use @stem, "
            f"@stage1..@stage{self.stage_count} (@stage-1 is the last), @classifier, "
            "@backbone or @head.")

    def describe(self) -> list[str]:
        """One line per alias for the report (the negative stage aliases left out)."""
        return [f"{alias:<12} = {', '.join(paths)}" for alias, paths in self.paths.items()
                if not alias.startswith("@stage-")]


def resolve_aliases(backbone: nn.Module, prefix: str = "pretrained") -> Aliases:
    paths = {"@backbone": [prefix], "@head": ["add_layers"]}
    stages = backbone_stages(backbone)
    if stages is not None:
        parts = {"@stem": stages.stem, "@classifier": stages.classifier}
        count = len(stages.stages)
        for index, members in enumerate(stages.stages, start=1):
            parts[f"@stage{index}"] = members
            parts[f"@stage-{count - index + 1}"] = members
        paths.update({alias: [f"{prefix}.{path}" for path in members]
                      for alias, members in parts.items()})
    return Aliases(type(backbone).__name__, paths)
