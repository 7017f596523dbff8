"""`load_model`: a checkpoint (or an exported model) -> a LoadedModel, on any device.

A checkpoint carries its resolved config, class names, input spec (size, normalization)
and the full model state, so nothing else is needed: no Hydra, no config files, no
download (the backbone is built from random init and the saved weights loaded over it).
The file is untrusted: its config comes through trust.config_from_file."""

from collections.abc import Sequence

import torch
from omegaconf import OmegaConf

from finetune.errors import ConfigError
from finetune.model.adapters import adapted, fold_adapters
from finetune.model.net import InputSpec, Weights, build_backbone, build_net
from finetune.model.stages import resolve_aliases
from finetune.state.checkpoint import inference_weights, read_run_checkpoint
from finetune.state.trust import config_from_file
from finetune.use.calibration import stored_temperature
from finetune.use.loaded_model import LoadedModel

NO_DOWNLOAD = Weights(enum=None, description="the checkpoint's weights")


def load_model(path: str, device: str | torch.device = "cpu", key: str = "checkpoint",
               trust: Sequence[str] = (), merge_adapters: bool = True) -> LoadedModel:
    """The model a run saved in `path` (last.pt or best.pt, or an exported model.onnx with
    its model.json), in eval mode, on `device`; a run's LoRA adapters folded into the base
    weights unless `merge_adapters` is false.

    The file is untrusted: its saved head may name torch.nn layers only, unless `trust`
    allows more (finetune/state/trust.py); nothing is downloaded (the backbone is built from
    random init and the saved weights loaded over it).
    """
    if str(path).endswith(".onnx"):  # mode=export's file, with its model.json
        from finetune.use.exported import load_exported

        model = load_exported(path)
        model.net.to(device)
        return model
    checkpoint = read_run_checkpoint(path, key)
    record, source = checkpoint["run"], f"{key}={path!r}"
    cfg = config_from_file(record["config"], source, trust)
    spec = InputSpec.from_dict(record["input_spec"], source)
    temperature = stored_temperature(checkpoint, source)
    net = build_net(build_backbone(cfg.backbone, NO_DOWNLOAD), cfg.head,
                    len(record["class_names"]), spec.image_size, list(trust))
    # the run's adapter layers first, so its state dict's names fit
    adapters = adapted(net, cfg.get("adapter"), resolve_aliases(net.pretrained), spec.image_size)
    try:
        net.load_state_dict(inference_weights(checkpoint, source))
    except RuntimeError as error:
        raise ConfigError(f"{source}: its weights do not fit the model its config describes: "
                          f"{error}") from error
    if adapters is not None and merge_adapters:
        fold_adapters(net)
    return LoadedModel(net.to(device).eval(), list(record["class_names"]), spec, OmegaConf.to_container(cfg),
                       temperature)
