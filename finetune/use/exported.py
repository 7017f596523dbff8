"""An exported model read back: an ONNX file and its model.json -> a LoadedModel that runs
on ONNX Runtime, so an exported model is also a `checkpoint=` for mode=evaluate and
mode=predict (`load_exported`). model.json is untrusted input, read as data and checked
against the file's own inputs and outputs."""

import json
import math
import os
from typing import Any

import torch
from torch import nn

from finetune.errors import ConfigError


def onnx_session(path: str):
    try:
        import onnxruntime
    except ImportError as error:
        raise ConfigError("ONNX needs the export extra: pip install -e '.[export]'") from error
    try:
        return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for a bad file
        raise ConfigError(f"{path} is not an ONNX model ONNX Runtime can run: {error}") from error


class OnnxNet(nn.Module):
    """An exported ONNX model as a module: images in, logits out (run on the CPU)."""

    def __init__(self, path: str):
        super().__init__()
        self.session = onnx_session(path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {"images": images.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(images.device)


def description_path(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), "model.json")


def read_description(path: str) -> dict[str, Any]:
    """model.json beside an exported model, checked: JSON data of the kinds this tool
    writes, or a ConfigError naming the file."""
    from finetune.state.trust import check_plain, refuse_interpolations

    source = description_path(path)
    try:
        with open(source, encoding="utf-8") as handle:
            description = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"checkpoint={path!r}: an exported model needs the model.json written "
                          f"beside it, and {source} cannot be read: {error}") from error
    kinds = {"class_names": list, "input_spec": dict, "multi_label": bool, "data": dict,
             "temperature": float}
    entries = description if isinstance(description, dict) else {}  # a list, a number: all wrong
    wrong = [key for key, kind in kinds.items() if not isinstance(entries.get(key), kind)
             or key == "class_names" and not all(isinstance(name, str) for name in entries[key])]
    if wrong:
        raise ConfigError(f"{source}: its entries {', '.join(wrong)} are not what "
                          "mode=export writes; the file is damaged or not this tool's.")
    check_plain(description, source, "model.json")
    refuse_interpolations(description["data"], source)
    return description


def load_exported(path: str) -> Any:
    """An exported ONNX model as a LoadedModel (mode=evaluate, mode=predict)."""
    from finetune.model.net import InputSpec
    from finetune.use.loaded_model import LoadedModel

    description = read_description(path)
    # InputSpec's own checks: sizes, mean and std (the ranges a file may give)
    spec = InputSpec.from_dict(description["input_spec"], description_path(path))
    config = {"data": description["data"], "backbone": {"name": f"(exported: {os.path.basename(path)})"}}
    if not (math.isfinite(description["temperature"]) and description["temperature"] > 0):
        raise ConfigError(f"checkpoint={path!r}: the temperature in its model.json is not positive.")
    net = OnnxNet(path).eval()
    check_fits(net.session, description, spec, path)
    return LoadedModel(net, list(description["class_names"]), spec, config, description["temperature"])


def check_fits(session: Any, description: dict[str, Any], spec: Any, path: str) -> None:
    """model.json against the ONNX model it describes, before any batch runs: the shapes the
    session declares (a dimension given as a name or None is left to run time)."""
    source, model = description_path(path), os.path.basename(path)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if (len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(float)"
            or len(inputs[0].shape) != 4 or len(outputs) != 1 or len(outputs[0].shape) != 2):
        raise ConfigError(f"{path}: the ONNX model takes {ports(inputs)} and gives {ports(outputs)}, "
                          "not images: float32 [batch, 3, size, size] in and logits [batch, classes] "
                          "out (what mode=export writes).")
    shape, logits = inputs[0].shape, outputs[0].shape[1]
    if isinstance(shape[1], int) and shape[1] != 3:
        raise ConfigError(f"{path}: the ONNX model takes images of {shape[1]} channels ({shape}); "
                          "this tool gives it RGB images, 3 channels.")
    if any(isinstance(side, int) and side != spec.image_size for side in shape[2:]):
        raise ConfigError(f"{source}: input_spec.image_size={spec.image_size}, but {model} takes "
                          f"images of {shape[2]}x{shape[3]} ({shape}); the two files do not belong "
                          "together. Export the checkpoint again (mode=export) to write both.")
    names = len(description["class_names"])
    if isinstance(logits, int) and logits != names:
        raise ConfigError(f"{source}: class_names has {names} names, but {model} gives {logits} "
                          f"logits per image ({outputs[0].shape}); the two files do not belong "
                          "together. Export the checkpoint again (mode=export) to write both.")


def ports(arguments: list[Any]) -> str:
    """An ONNX model's inputs or outputs, as its errors name them."""
    return ", ".join(f"{item.name}: {item.type} {item.shape}" for item in arguments) or "nothing"
