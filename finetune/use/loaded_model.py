"""A trained model with what using it needs (`LoadedModel`): its class names, input spec
and temperature, and `predict` for paths, PIL images or tensors.

A model trained on multi-label data gives a probability per class (a sigmoid each, not a
softmax over them) and predicts every label at the threshold or above."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from finetune.config.schemas import TTA_SETTINGS, is_multi_label
from finetune.data.images import read_image
from finetune.data.transforms import image_transforms
from finetune.errors import ConfigError
from finetune.model.net import InputSpec, Net
from finetune.train.trainer import Step


@dataclass
class LoadedModel:
    """A trained model with what using it needs: the class of each output index, and the
    input it expects (image size and normalization)."""

    net: Net  # in eval mode
    class_names: list[str]  # output index -> class name
    input_spec: InputSpec
    config: dict[str, Any]  # the run's resolved config
    temperature: float = 1.0  # mode=calibrate's: logits are divided by it

    def wrap(self, tta: str = "none") -> Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
        """What a Step runs the model through: test-time augmentation, then the temperature."""
        augment = augmented(tta)
        if self.temperature == 1.0:
            return augment

        def scaled(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            forward = augment(module)
            return lambda images: forward(images) / self.temperature

        return scaled

    @property
    def multi_label(self) -> bool:
        return is_multi_label(self.config["data"])

    def transform(self):
        """The preprocessing for a PIL image, as validation used it: a callable (PIL image or
        uint8 tensor -> normalized tensor) holding two torchvision v2.Compose pipelines,
        `.fixed` (resize, center crop) and `.varying` (scaling, normalization)."""
        return image_transforms(self.input_spec)[1]

    def predict(self, images: Any, batch_size: int = 64, tta: str = "none",
                threshold: float = 0.5) -> tuple[list, torch.Tensor]:
        """The predicted class names and the probabilities (a row per image, a column per
        class, in `class_names` order) for one image or a list of them: file paths, PIL
        images, or a tensor batch already preprocessed with `transform()`. `tta="hflip"`
        averages the logits of each image and its mirror image. A multi-label model
        predicts a list of names per image: those at `threshold` or above. One image (a path
        or a PIL image) gives its label and its row of probabilities alone."""
        single = isinstance(images, str | os.PathLike | Image.Image)
        if not isinstance(images, torch.Tensor):
            transform = self.transform()
            images = torch.stack([transform(as_rgb(item)) for item in
                                  ([images] if single else images)])
        device = next(self.net.parameters(), torch.zeros(0)).device  # an ONNX model: the CPU
        step = Step(self.net, device, wrap=self.wrap(tta),
                    multi_label=self.multi_label)
        with torch.inference_mode():
            probabilities = torch.cat([class_probabilities(step, chunk)
                                       for chunk in images.split(batch_size)])
        if self.multi_label:
            labels = [[self.class_names[i] for i in row.nonzero().flatten().tolist()]
                      for row in probabilities >= threshold]
        else:
            labels = [self.class_names[index] for index in probabilities.argmax(dim=1).tolist()]
        return (labels[0], probabilities[0]) if single else (labels, probabilities)


def augmented(tta: str) -> Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
    """Test-time augmentation as a Step's `wrap`: `hflip` averages the logits of a batch
    and of its mirror image (one more forward pass); `none` is the model itself."""
    if tta not in TTA_SETTINGS:
        raise ConfigError(f"tta={tta!r} is not valid: use {' or '.join(TTA_SETTINGS)}.")
    if tta == "none":
        return lambda module: module
    return lambda module: lambda images: (module(images) + module(images.flip(-1))) / 2


def as_rgb(image: Any) -> Image.Image | torch.Tensor:
    """A PIL image as RGB; a path read as training read its images."""
    return image.convert("RGB") if isinstance(image, Image.Image) else read_image(str(image))


def class_probabilities(step: Step, images: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes (a sigmoid per class for multi-label data), on the CPU, for
    a preprocessed batch."""
    logits = step.logits(images.to(step.device))
    return (logits.sigmoid() if step.multi_label else logits.softmax(dim=1)).cpu()
