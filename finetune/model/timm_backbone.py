"""timm backbones: `backbone.name=timm/<model>` builds any timm model without its
classifier (num_classes=0), so the declared head sits on its pooled features as on a
torchvision backbone's. timm is an optional extra (`pip install -e ".[timm]"`).

Weights: `auto` takes the model's pretrained weights (the file timm itself would download,
model.safetensors or pytorch_model.bin) from the local Hugging Face cache, else downloads
them there from the hub (unless backbone.allow_download=false or HF_HUB_OFFLINE=1), else
starts from random init; start-up says which and why. `backbone.checkpoint` loads a local
timm state dict (.pt/.pth, or .safetensors) over either. Preprocessing follows timm's data
config for the model (mean, std, interpolation, crop share); stage aliases come from timm's
own grouping of the model (`group_matcher`).
"""

import logging
import os
from typing import Any

from torch import nn

from finetune.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

PREFIX = "timm/"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's own order of preference
HUB_TIMEOUT_SECONDS = 30  # per request, as for torchvision's downloads (model.py)


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


def hub_repository(name: str) -> str | None:
    """The Hugging Face repository timm takes the model's pretrained weights from."""
    pretrained = timm_library().models.get_pretrained_cfg(model_name(name))
    return getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None


def cached_weights(repository: str) -> str | None:
    """The repository's weights file in the local Hugging Face cache, None if absent."""
    from huggingface_hub import try_to_load_from_cache

    for filename in WEIGHTS_FILES:
        path = try_to_load_from_cache(repository, filename, cache_dir=hugging_face_cache())
        if isinstance(path, str):
            return path
    return None


def hub_offline() -> bool:
    """huggingface_hub's offline mode: HF_HUB_OFFLINE set when it was imported, or since."""
    from huggingface_hub import constants

    return (constants.HF_HUB_OFFLINE
            or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES)


def download_weights(repository: str) -> str | None:
    """The repository's weights file, downloaded now into the cache; None if it cannot be
    had. One request without retries first: offline, hf_hub_download retries for ~25 s per
    file before giving up."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        for filename in WEIGHTS_FILES:
            url = huggingface_hub.hf_hub_url(repository, filename)
            try:
                huggingface_hub.get_hf_file_metadata(url, timeout=HUB_TIMEOUT_SECONDS)
            except EntryNotFoundError:
                continue  # not in the repository: timm's other file name
            return huggingface_hub.hf_hub_download(repository, filename, cache_dir=hugging_face_cache(),
                                                   etag_timeout=HUB_TIMEOUT_SECONDS)
    except Exception as error:  # no network, a proxy, a gated repository: all mean "not available"
        log.debug("download of %s from the Hugging Face hub failed: %s", repository, error)
    return None


def timm_weights(cfg: Any) -> tuple[str | None, str]:
    """(the weights file to load or None, what the backbone starts from, for the log)."""
    if cfg.weights is None:
        return None, "random init (backbone.weights=null)"
    if cfg.weights != "auto":
        raise ConfigError(f"backbone.weights={cfg.weights!r}: a timm backbone takes auto (its "
                          "pretrained weights from the Hugging Face cache or hub, else random "
                          "init) or null; or load a local file with backbone.checkpoint=PATH.")
    repository = hub_repository(cfg.name)
    if not repository:
        return None, f"random init: timm names no Hugging Face weights for {model_name(cfg.name)}"
    path = cached_weights(repository)
    if path is not None:
        return path, f"timm {repository} from the Hugging Face cache ({path})"
    if cfg.allow_download and not hub_offline():
        path = download_weights(repository)
        if path is not None:
            return path, f"timm {repository}, downloaded now ({path})"
    return None, random_init_reason(repository, cfg.allow_download)


def random_init_reason(repository: str, allow_download: bool) -> str:
    """Why the weights could not be had, and how to place them by hand."""
    if not allow_download:
        why = "backbone.allow_download=false"
    elif hub_offline():
        why = "HF_HUB_OFFLINE=1"
    else:
        why = f"could not be downloaded from https://huggingface.co/{repository}"
    return (f"random init: the weights of {repository} are not in the Hugging Face cache "
            f"({hugging_face_cache()}) and {why} (backbone.weights=auto). Download "
            f"https://huggingface.co/{repository}/resolve/main/{WEIGHTS_FILES[0]} on a "
            "machine with network and load it with backbone.checkpoint=PATH")


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
