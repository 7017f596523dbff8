"""Export stage (mode=export): a checkpoint -> a model file other runtimes serve, checked.

`export.format` is onnx (run by ONNX Runtime), torchscript or exported_program (torch.export).
The file holds the Net, images in and logits out, with a batch size chosen at run time;
beside it, model.json says what using it needs: the class names, the input size and
normalization, single- or multi-label, and the versions that wrote it.

Parity is checked, not assumed: before the file takes its name, the exported model runs on
a batch of the checkpoint's own validation images, and on one image alone (a different
batch size), and its logits are compared with the PyTorch model's. The largest difference
is printed; one above `export.tolerance` fails the export and leaves no file behind.

A run trained with LoRA adapters (adapter=lora) is exported with them folded into the
base weights (export.merge_adapters=true), and compared with the model as trained.

An exported ONNX model is also a `checkpoint=` for mode=evaluate and mode=predict
(`load_exported`): its model.json is untrusted input, read as data and checked.
"""


import copy
import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from finetune.errors import ConfigError, TrainingFailed
from finetune.model.adapters import fold_adapters, is_adapter_parameter
from finetune.state.files import write_json
from finetune.use.exported import onnx_session

log = logging.getLogger(__name__)


FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported_program": "model.pt2"}


DESCRIPTION_FORMAT = 1  # model.json's layout


def run_export(cfg: DictConfig, run_dir: str, overrides: list[str]) -> float:
    """Write the exported model and model.json into run_dir; the largest logit difference."""
    from finetune.use.load import load_model

    model = load_model(os.path.expanduser(cfg.checkpoint), "cpu", trust=cfg.trust,
                       merge_adapters=False)
    images = parity_images(cfg, model, overrides)
    net = net_to_export(model.net, cfg.export.merge_adapters)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, FILES[cfg.export.format])
    temporary = path + ".incomplete"
    try:
        export_to(cfg.export.format, net, images, temporary)
        # against the model as trained: a merge's difference counts too
        difference = parity(cfg.export.format, model.net, images, temporary)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    if difference > cfg.export.tolerance:
        os.remove(temporary)
        raise TrainingFailed(f"export.format={cfg.export.format}: the exported model's logits differ "
                             f"from the checkpoint's by up to {difference:.3g}, over "
                             f"export.tolerance={cfg.export.tolerance:g}; nothing was written.")
    os.replace(temporary, path)
    description = describe(cfg, model, os.path.basename(path))
    write_json(description, os.path.join(run_dir, "model.json"))
    log.info("exported %s to %s (and model.json beside it): the largest logit difference from "
             "the checkpoint is %.3g on %d validation images and on 1 alone (export.tolerance=%g)",
             cfg.checkpoint, path, difference, len(images), cfg.export.tolerance)
    return difference


def net_to_export(net: nn.Module, merge_adapters: bool) -> nn.Module:
    """The Net, or with export.merge_adapters a copy whose LoRA adapters are folded into the
    base weights (plain layers: smaller, faster, any runtime)."""
    if not merge_adapters or not any(is_adapter_parameter(name) for name, _ in net.named_parameters()):
        return net
    merged = copy.deepcopy(net)
    log.info("export.merge_adapters=true: %d LoRA layers folded into their base weights",
             fold_adapters(merged))
    return merged


def parity_images(cfg: DictConfig, model: Any, overrides: list[str]) -> torch.Tensor:
    """Up to export.parity_images of the checkpoint's validation images, prepared as
    validation prepares them."""
    from finetune.use.evaluate import checkpoint_data

    loader, _, data_cfg = checkpoint_data(cfg, model, overrides)
    batches, count = [], 0
    for batch in loader:
        if batch is None:
            continue
        batches.append(batch[0])
        count += len(batch[0])
        if count >= cfg.export.parity_images:
            break
    if not batches:
        raise ConfigError(f"data={data_cfg.name}: no readable validation image to check the "
                          "export on.")
    return torch.cat(batches)[:cfg.export.parity_images]


class Logits(nn.Module):
    """The Net as exported: float32 logits, whatever the training precision."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).float()


def export_to(format_name: str, net: nn.Module, images: torch.Tensor, path: str) -> None:
    module = Logits(net).eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        if format_name == "onnx":
            for name in ("onnxscript", "onnx_ir"):  # their graph passes, one line each
                logging.getLogger(name).setLevel(logging.WARNING)
            program = torch.onnx.export(module, (images,), dynamo=True, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},),
                                        verbose=False)
            program.save(path)
        elif format_name == "torchscript":
            torch.jit.save(torch.jit.trace(module, images), path)
        else:
            torch.export.save(torch.export.export(module, (images,), dynamic_shapes=({0: batch},)),
                              path)


def exported_runner(format_name: str, path: str):
    """A function images -> logits running the exported file."""
    if format_name == "onnx":
        session = onnx_session(path)
        return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    if format_name == "torchscript":
        return torch.jit.load(path)
    return torch.export.load(path).module()


def parity(format_name: str, net: nn.Module, images: torch.Tensor, path: str) -> float:
    """The largest |logit difference| between the checkpoint and the exported file, on the
    batch and on its first image alone."""
    run = exported_runner(format_name, path)
    with torch.no_grad():
        difference = 0.0
        for batch in (images, images[:1]):
            expected, exported = Logits(net).eval()(batch), run(batch)
            if exported.shape != expected.shape:
                raise TrainingFailed(f"export.format={format_name}: the exported model gave logits "
                                     f"of shape {tuple(exported.shape)} for {len(batch)} images, "
                                     f"not {tuple(expected.shape)}; nothing was written.")
            difference = max(difference, (exported - expected).abs().max().item())
    return difference


def describe(cfg: DictConfig, model: Any, file_name: str) -> dict[str, Any]:
    """model.json: what serving the exported file needs, and the run's data settings."""
    from importlib.metadata import version

    import torchvision

    return {"description_format": DESCRIPTION_FORMAT, "file": file_name,
            "format": cfg.export.format, "input": "images: float32 [batch, 3, size, size], "
            "normalized with mean and std", "output": "logits: float32 [batch, classes]",
            "class_names": model.class_names, "input_spec": model.input_spec.to_dict(),
            "labels": "multi-label (a sigmoid per class)" if model.multi_label
            else "single-label (softmax over the classes)",
            "multi_label": model.multi_label,
            "temperature": model.temperature,  # divide the logits by it (mode=calibrate)
            "checkpoint": os.path.abspath(os.path.expanduser(cfg.checkpoint)),
            "data": model.config["data"], "versions": {
                "finetune": version("finetune"), "torch": torch.__version__,
                "torchvision": torchvision.__version__}}
