"""timm backbones: `backbone.name=timm/<model>` builds any timm model without its
classifier (num_classes=0), so the declared head sits on its pooled features as on a
torchvision backbone's. timm is an optional extra (`pip install -e ".[timm]"`).

Weights: `auto` takes the model's pretrained weights from the local Hugging Face cache (the
file timm itself would download, model.safetensors or pytorch_model.bin), else random
init, said at start-up; nothing is downloaded. `backbone.checkpoint` loads a local timm
state dict (.pt/.pth, or .safetensors) over either. Preprocessing follows timm's data config
for the model (mean, std, interpolation, crop share); stage aliases come from timm's own
grouping of the model (`group_matcher`).
"""

import os
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


def hugging_face_cache() -> str:
    """The hub cache folder huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def cached_weights(name: str) -> tuple[str | None, str]:
    """The model's pretrained weights file in the local Hugging Face cache (None if absent),
    and the hub repository it belongs to."""
    from huggingface_hub import try_to_load_from_cache

    pretrained = timm_library().models.get_pretrained_cfg(model_name(name))
    repository = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
    if not repository:
        return None, "none (timm names no Hugging Face weights for it)"
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repository, filename, cache_dir=hugging_face_cache())
        if isinstance(path, str):
            return path, repository
    return None, repository


def timm_weights(cfg: Any) -> tuple[str | None, str]:
    """(the weights file to load or None, what the backbone starts from, for the log)."""
    if cfg.weights is None:
        return None, "random init (backbone.weights=null)"
    if cfg.weights != "auto":
        raise ConfigError(f"backbone.weights={cfg.weights!r}: a timm backbone takes auto (its "
                          "pretrained weights from the local Hugging Face cache, else random "
                          "init) or null; or load a local file with backbone.checkpoint=PATH.")
    path, repository = cached_weights(cfg.name)
    if path is not None:
        return path, f"timm {repository} ({path})"
    return None, (f"random init: the weights of {repository} are not in the Hugging Face cache "
                  f"({hugging_face_cache()}); this tool does not download them. Load a local "
                  "file with backbone.checkpoint=PATH")


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
    stage, as it does for torchvision models. A kept classifier is @classifier."""
    from timm.models import group_parameters

    from finetune.stages import Stages

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
