"""Model stage: cfg.backbone and cfg.head -> Net(pretrained, add_layers).

`Net` is the seed recipe's wrapper, so parameter names read `pretrained.features.0.weight`
and `add_layers.0.weight`; those names are the language of freeze patterns.
"""

import inspect
import logging
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode

from finetune.errors import ConfigError, did_you_mean
from finetune.model.timm_backbone import (
    build_timm_backbone,
    check_timm_name,
    data_config,
    is_timm,
    timm_weights,
)
from finetune.state.checkpoint import read_state_dict
from finetune.state.trust import load_class

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_SECONDS = 30  # per blocking socket operation
TORCHVISION_NUM_CLASSES = 1000  # every torchvision classifier is built for ImageNet-1k


class Net(nn.Module):
    """A backbone (`pretrained`) followed by the added head layers (`add_layers`).

    `frozen_eval_modules` names submodules that stay in eval mode whenever the net is put in
    training mode (set by the freeze stage), so frozen BatchNorm statistics and dropout stay
    as loaded no matter who calls `train()`.
    """

    def __init__(self, pretrained: nn.Module, add_layers: nn.Sequential):
        super().__init__()
        self.pretrained = pretrained
        self.add_layers = add_layers
        self.frozen_eval_modules: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_layers(self.pretrained(x))

    def train(self, mode: bool = True) -> "Net":
        super().train(mode)
        if mode:
            for name in self.frozen_eval_modules:
                self.get_submodule(name).eval()
        return self


@dataclass
class Weights:
    """What the backbone is initialized from, decided before anything is built."""

    enum: WeightsEnum | None  # None: random initialization underneath
    description: str  # for the start-up log and summary.json
    checkpoint: str | None = None  # a local state dict loaded over it
    file: str | None = None  # a timm model's pretrained weights, from the Hugging Face cache

    @property
    def pretrained(self) -> bool:
        return self.enum is not None or self.checkpoint is not None or self.file is not None

    def __str__(self) -> str:
        if self.checkpoint is None:
            return self.description
        return f"checkpoint {self.checkpoint} (over {self.description})"


@dataclass
class InputSpec:
    """The input the backbone expects; the data stage builds its transforms from it."""

    image_size: int
    resize_size: int
    mean: Sequence[float]
    std: Sequence[float]
    interpolation: InterpolationMode

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for a checkpoint (loadable with weights_only=True)."""
        return {"image_size": self.image_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation.value}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "input_spec") -> "InputSpec":
        """The spec a checkpoint saved, checked: a file's values, not ours until then."""
        try:
            spec = cls(**{**values, "interpolation": InterpolationMode(values["interpolation"])})
            check_spec_values(spec)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{source}: its saved input spec {values!r} is not valid "
                              f"({error}); the file is damaged or not this tool's.") from error
        return spec


MAX_IMAGE_SIZE = 4096  # a file's input spec: what one image may cost (4096^2 x 3 floats: 200 MB)


def check_spec_values(spec: InputSpec) -> None:
    """Sizes whole numbers in 1..MAX_IMAGE_SIZE (resizing before a center crop: up to twice
    that), mean and std three finite numbers each, std positive (a ValueError)."""
    sizes = ((spec.image_size, MAX_IMAGE_SIZE), (spec.resize_size, 2 * MAX_IMAGE_SIZE))
    if not all(type(size) is int and 1 <= size <= limit for size, limit in sizes):
        raise ValueError(f"image_size must be a whole number from 1 to {MAX_IMAGE_SIZE}, "
                         "resize_size from 1 to twice that")
    channels = [*spec.mean, *spec.std]
    if (len(spec.mean) != 3 or len(spec.std) != 3
            or not all(type(value) in (int, float) and math.isfinite(value) for value in channels)
            or min(spec.std) <= 0):
        raise ValueError("mean and std must be 3 finite numbers each, std positive")


def classification_model_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_backbone_name(name: str) -> None:
    if is_timm(name):
        return check_timm_name(name)
    names = classification_model_names()
    if name not in names:
        raise ConfigError(
            f"backbone.name={name!r} is not a torchvision classification model.{did_you_mean(name, names)} "
            f"Valid names ({len(names)}): {', '.join(names)}."
        )


def weights_enum_for(backbone_name: str, weights_name: str) -> WeightsEnum:
    weights_class = torchvision.models.get_model_weights(backbone_name)
    members = [name for name in weights_class.__members__ if name != "DEFAULT"]
    if weights_name == "DEFAULT":
        return weights_class.DEFAULT
    if weights_name not in members:
        raise ConfigError(
            f"backbone.weights={weights_name!r} is not a weights name of {backbone_name}."
            f"{did_you_mean(weights_name, members)} Valid: DEFAULT, {', '.join(members)}, "
            "auto (DEFAULT when available, else random init) or null (random init)."
        )
    return weights_class[weights_name]


def weights_cache_path(weights: WeightsEnum) -> str:
    """Where torch.hub (and so torchvision) looks for a weights file before downloading it."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def fetch_weights_file(weights: WeightsEnum, allow_download: bool) -> str | None:
    """The cached weights file, downloading it first if allowed; None if it cannot be had."""
    path = weights_cache_path(weights)
    if os.path.isfile(path):
        return path
    if not allow_download:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    hash_prefix = re.search(r"-([a-f0-9]+)\.", os.path.basename(path))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)  # a network that drops packets must not hang us
    try:
        torch.hub.download_url_to_file(weights.url, path, hash_prefix and hash_prefix.group(1))
    except Exception as error:  # no network, a proxy, a bad hash: all mean "not available"
        log.debug("download of %s failed: %s", weights.url, error)
        return None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return path


def resolve_weights(cfg: DictConfig) -> Weights:
    """Decide what the backbone starts from: torchvision weights or random init, and a
    local checkpoint loaded over either."""
    if is_timm(cfg.name):
        check_timm_name(cfg.name)
        path, description = timm_weights(cfg)
        weights = Weights(None, description, file=path)
    else:
        weights = resolve_torchvision_weights(cfg)
    if cfg.checkpoint:
        weights.checkpoint = os.path.abspath(os.path.expanduser(cfg.checkpoint))
    return weights


def resolve_torchvision_weights(cfg: DictConfig) -> Weights:
    check_backbone_name(cfg.name)
    if cfg.weights is None:
        return Weights(None, "random init (backbone.weights=null)")
    auto = cfg.weights == "auto"
    enum = weights_enum_for(cfg.name, "DEFAULT" if auto else cfg.weights)
    path = fetch_weights_file(enum, cfg.allow_download)
    if path is not None:
        return Weights(enum, f"torchvision {enum} ({path})")
    if auto:
        return Weights(None, f"random init: {enum} is not cached at {weights_cache_path(enum)}"
                       f" and could not be downloaded from {enum.url} (backbone.weights=auto)")
    raise ConfigError(
        f"backbone.weights={cfg.weights!r}: the weights file {os.path.basename(enum.url)} is not "
        f"in the torch cache ({weights_cache_path(enum)})"
        + (" and could not be downloaded" if cfg.allow_download else " and backbone.allow_download=false")
        + f". Download {enum.url} on a machine with network and copy it to that path (or set "
        "TORCH_HOME to a folder whose hub/checkpoints holds it), or use backbone.weights=null "
        "for random init."
    )


def find_classifier(backbone: nn.Module, num_classes: int) -> str:
    """The name of the last Linear/Conv2d producing the class logits (fc, classifier.6, heads.head)."""
    found = None
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_classes:
            found = name
    if found is None:
        raise ConfigError(f"could not find the classifier layer of the backbone (no Linear or Conv2d "
                          f"with {num_classes} outputs); set backbone.keep_classifier=true.")
    return found


def drop_auxiliary_classifiers(backbone: nn.Module) -> None:
    """googlenet / inception_v3 return (logits, aux) tuples in training mode; the head wants logits."""
    if getattr(backbone, "aux_logits", False):
        backbone.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(backbone, name):
                setattr(backbone, name, None)


def load_backbone_checkpoint(backbone: nn.Module, path: str, dropped_prefix: str | None) -> None:
    """Load `path` strictly, except for the classifier that is about to be replaced."""
    state = read_state_dict(path)

    def dropped(key: str) -> bool:
        return dropped_prefix is not None and key.startswith(dropped_prefix + ".")

    state = {key: value for key, value in state.items() if not dropped(key)}
    own = backbone.state_dict()
    mismatched = [f"{key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}"
                  for key, value in state.items() if key in own and value.shape != own[key].shape]
    if mismatched:
        raise ConfigError(
            f"backbone.checkpoint={path!r} does not fit the backbone: {len(mismatched)} tensors "
            f"differ in shape ({'; '.join(mismatched[:5])}). A classifier for another class "
            "count? Leave backbone.keep_classifier=false (the head replaces it) or set "
            "backbone.kwargs.num_classes to the file's; otherwise check backbone.name.")
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [key for key in missing if not dropped(key)]
    if missing or unexpected:
        raise ConfigError(
            f"backbone.checkpoint={path!r} does not match the backbone: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}. Check backbone.name and that the file is a state dict of it."
        )


def build_backbone(cfg: DictConfig, weights: Weights) -> nn.Module:
    """The torchvision (or timm) model with its weights, checkpoint and (unless kept) no
    classifier."""
    kwargs = OmegaConf.to_container(cfg.kwargs)
    if is_timm(cfg.name):
        backbone, classifier = build_timm_backbone(cfg, kwargs)
        for path in (weights.file, weights.checkpoint):  # the checkpoint last: over the weights
            if path:
                load_backbone_checkpoint(backbone, path, classifier)
        return backbone
    try:
        backbone = torchvision.models.get_model(cfg.name, weights=weights.enum, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"backbone.kwargs={kwargs} is not valid for {cfg.name}: {error}") from error
    except Exception as error:  # a corrupt file in the torch cache
        raise ConfigError(f"loading {weights.description} failed: {error}. Delete the file "
                          "and run again, or use backbone.weights=null.") from error
    drop_auxiliary_classifiers(backbone)
    classifier = None
    if not cfg.keep_classifier:
        classifier = find_classifier(backbone, kwargs.get("num_classes", TORCHVISION_NUM_CLASSES))
    if weights.checkpoint:
        load_backbone_checkpoint(backbone, weights.checkpoint, classifier)
    if classifier is not None:
        backbone.set_submodule(classifier, nn.Identity())
    return backbone


def input_spec(backbone: nn.Module, weights: Weights, backbone_name: str,
               requested_size: int, use_weights_size: bool) -> InputSpec:
    """Image size and normalization: the weights' own, adjusted to what the model accepts."""
    if is_timm(backbone_name):
        return timm_input_spec(backbone, requested_size, weights.file is not None and use_weights_size)
    reference = weights.enum or torchvision.models.get_model_weights(backbone_name).DEFAULT
    preset = reference.transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    size = crop if (weights.enum is not None and use_weights_size) else requested_size
    fixed = getattr(backbone, "image_size", None)  # ViT accepts exactly one size
    min_size = reference.meta.get("min_size", (1, 1))[0]
    if isinstance(fixed, int):  # its own size, even below the weights' min_size (kwargs)
        if size != fixed:
            log.info("%s takes %dx%d images only: resizing the data to that.", backbone_name,
                     fixed, fixed)
        size = fixed
    elif size < min_size:
        log.info("%s needs images of at least %dx%d: resizing the data to that.",
                 backbone_name, min_size, min_size)
        size = min_size
    if weights.enum is None:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = preset.mean, preset.std
    return InputSpec(size, round(size * resize / crop), mean, std, preset.interpolation)


def timm_input_spec(backbone: nn.Module, requested_size: int, model_size: bool) -> InputSpec:
    """timm's mean, std, interpolation and crop share for the model, at the requested size;
    at the model's own with its pretrained weights (`model_size`, the weights' own
    preprocessing) or where it takes one size only, as ViTs do."""
    config = data_config(backbone)
    fixed = backbone.pretrained_cfg.get("fixed_input_size", False)
    size = config["input_size"][-1] if fixed or model_size else requested_size
    built = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if fixed and built is not None:  # backbone.kwargs.img_size builds a ViT for another size
        size = built[-1]
    return InputSpec(size, round(size / config["crop_pct"]), tuple(config["mean"]),
                     tuple(config["std"]), InterpolationMode(config["interpolation"]))


def output_width(module: nn.Module, sample: torch.Tensor, what: str) -> int:
    """Run one sample through `module` in eval mode and return its feature count."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(sample)
    module.train(was_training)
    if out.dim() != 2:
        raise ConfigError(f"{what} returns outputs of shape {tuple(out.shape)}, not "
                          "(batch, features); add a torch.nn.Flatten after it.")
    return out.shape[1]


def layer_class(spec: dict[str, Any], index: int, trust: Sequence[str] | None) -> type:
    try:
        return load_class(f"head.layers[{index}]._target_", spec["_target_"], trust)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"head.layers[{index}]._target_={spec['_target_']!r} is not an "
                          f"importable class: {error}") from error


def layer_arguments(spec: dict[str, Any], accepted: Sequence[str], width: int, is_last: bool,
                    num_classes: int | None, index: int) -> dict[str, Any]:
    """Fill in the sizes a head layer can take from its neighbours; check the given ones."""
    filled = {key: value for key, value in spec.items() if key != "_target_"}
    for key in ("in_features", "num_features", "normalized_shape"):
        if key in accepted:
            given = filled.setdefault(key, width)
            if given != width:
                raise ConfigError(f"head.layers[{index}].{key}={given} but the layer before "
                                  f"gives {width} features; leave it out to have it inferred.")
    if is_last:  # a shape-only build (num_classes None) before the data is read: any width
        filled.setdefault("out_features", 2 if num_classes is None else num_classes)
    return filled


def build_head(layer_specs: Sequence[Any], in_width: int, num_classes: int | None,
               device: torch.device, trust: Sequence[str] | None = None) -> nn.Sequential:
    """Net.add_layers from `_target_` specs, sizes inferred from the backbone and the data;
    `trust` not None: the specs are a file's (trust.load_class)."""
    specs = [OmegaConf.to_container(spec) for spec in layer_specs]
    classes = [layer_class(spec, index, trust) for index, spec in enumerate(specs)]
    accepted = [inspect.signature(cls).parameters for cls in classes]
    # The last layer that has an out_features argument produces the class logits.
    last_sized = max((i for i, names in enumerate(accepted) if "out_features" in names), default=-1)
    layers, width = [], in_width
    for index, (spec, cls) in enumerate(zip(specs, classes, strict=True)):
        arguments = layer_arguments(spec, accepted[index], width, index == last_sized,
                                    num_classes, index)
        try:
            layer = cls(**arguments)
        except Exception as error:
            raise ConfigError(f"head.layers[{index}] ({spec['_target_']} with {arguments}) "
                              f"could not be built: {error}") from error
        layer.to(device)
        width = output_width(layer, torch.zeros(2, width, device=device), f"head.layers[{index}]")
        layers.append(layer)
    if num_classes is not None and width != num_classes:
        raise ConfigError(f"the head outputs {width} values but the data has {num_classes} "
                          "classes: end head.layers with a layer whose out_features is left out.")
    return nn.Sequential(*layers)


def build_net(backbone: nn.Module, head_cfg: DictConfig, num_classes: int | None,
              image_size: int, trust: Sequence[str] | None = None) -> Net:
    """The backbone with the head on top; num_classes None: the data's count is not known
    yet (a shape-only build on the meta device, to check patterns early). `trust` not
    None: the head config is a file's, whose classes that trust list rules."""
    device = next(backbone.parameters()).device
    sample = torch.zeros(1, 3, image_size, image_size, device=device)
    width = output_width(backbone, sample, "the backbone")
    add_layers = build_head(head_cfg.layers, width, num_classes, device, trust)
    return Net(pretrained=backbone, add_layers=add_layers)
