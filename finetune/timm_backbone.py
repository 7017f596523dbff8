"""timm backbones: `backbone.name=timm/<model>` builds any timm model without its
classifier (num_classes=0), so the declared head sits on its pooled features as on a
torchvision backbone's. timm is an optional extra (`pip install -e ".[timm]"`).

What this version does and does not do yet (issue 15): weights come from a local file
(`backbone.checkpoint`, a timm state dict saved with torch.save) or random init;
timm's pretrained weights in the Hugging Face cache are not read yet. Preprocessing follows
timm's data config for the model (mean, std, interpolation, crop share); stage aliases come
from timm's own grouping of the model (`group_matcher`).
"""

from typing import Any

from torch import nn

from finetune.errors import ConfigError, did_you_mean

PREFIX = "timm/"


def is_timm(name: str) -> bool:
    return str(name).startswith(PREFIX)


def timm_library():
    try:
        import timm
    except ImportError as error:
        raise ConfigError("backbone.name=timm/...: timm is not installed; pip install -e "
                          "'.[timm]' (or pip install timm).") from error
    return timm


def model_name(name: str) -> str:
    return name.removeprefix(PREFIX)


def check_timm_name(name: str) -> None:
    timm = timm_library()
    model = model_name(name)
    if not timm.is_model(model):
        names = timm.list_models()
        listing = f"python -c \"import timm; print(timm.list_models('*{model[:4]}*'))\""
        raise ConfigError(f"backbone.name={name!r} is not a timm model."
                          f"{did_you_mean(model, names)} List them with: {listing}.")


def random_init_note(cfg: Any) -> str:
    """What a timm backbone starts from, short of a checkpoint file: random init, said why."""
    if cfg.weights is None:
        return "random init (backbone.weights=null)"
    if cfg.weights != "auto":
        raise ConfigError(f"backbone.weights={cfg.weights!r}: a timm backbone takes auto or null "
                          "here; load its pretrained weights from a local file with "
                          "backbone.checkpoint=PATH (a timm state dict saved with torch.save).")
    return ("random init: timm's pretrained weights are not read from the Hugging Face cache "
            "by this version; load a local file with backbone.checkpoint=PATH")


def build_timm_backbone(cfg: Any, kwargs: dict[str, Any]) -> tuple[nn.Module, str | None]:
    """The model, and the prefix of its classifier in a full state dict (left out when a
    checkpoint is loaded, since the model is built without it), or None if kept."""
    timm = timm_library()
    if not cfg.keep_classifier:
        kwargs = {**kwargs, "num_classes": 0}
    try:
        backbone = timm.create_model(model_name(cfg.name), pretrained=False, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"backbone.kwargs={kwargs} is not valid for {cfg.name}: {error}") from error
    classifier = None if cfg.keep_classifier else backbone.pretrained_cfg.get("classifier")
    return backbone, classifier


def data_config(backbone: nn.Module) -> dict[str, Any]:
    """timm's preprocessing for the model: input_size, mean, std, interpolation, crop_pct."""
    return timm_library().data.resolve_data_config({}, model=backbone)


def timm_stages(backbone: nn.Module):
    """Stem, stages and classifier from timm's own coarse grouping of the parameters: the
    first group is the stem, each later one a stage; a last group of shallow parameters only
    (a final norm or 1x1 conv, as after ConvNeXt's and Swin's last stage) joins the last
    stage, as it does for torchvision models."""
    from timm.models._manipulate import group_parameters

    from finetune.stages import Stages

    if not hasattr(backbone, "group_matcher"):
        return None
    groups = list(group_parameters(backbone, backbone.group_matcher(coarse=True)).values())
    if len(groups) < 2:
        return None
    stem, stages = groups[0], groups[1:]
    if len(stages) > 1 and all(name.count(".") <= 2 for name in stages[-1]):
        stages = [*stages[:-2], stages[-2] + stages[-1]]
    return Stages(stem=stem, stages=stages, classifier=[])
