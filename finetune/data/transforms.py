"""An image's preparation: the fixed part (resize, center crop: what the image cache keeps)
and the varying part (augmentation, scaling, normalization), and MixUp/CutMix on batches."""

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from finetune.config.schemas import augment_policy
from finetune.model.net import InputSpec


def normalize(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (images - mean) / std


class Prepared:
    """An image's preparation in two parts: `fixed` turns an image (a uint8 tensor; a PIL
    image is made one first) into a uint8 tensor the same way every epoch (resize, perhaps
    a center crop: what the decoded-image cache keeps,
    finetune/data/image_cache.py), then `varying` does the rest on that tensor (random
    augmentation, scaling to [0, 1], normalization). With or without the cache an image
    goes through the same steps, so both give the same batches."""

    def __init__(self, fixed: v2.Compose, varying: v2.Compose):
        self.fixed, self.varying = fixed, varying

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        return self.varying(self.fixed(image))

    def __repr__(self) -> str:
        return f"Prepared(fixed={self.fixed!r}, varying={self.varying!r})"


def image_transforms(spec: InputSpec, augment: str = "none") -> tuple[Prepared, Prepared]:
    """(training, evaluation) preparations; `augment` (data.augment) changes training only.
    Evaluation: resize, center crop. Random-crop policies crop from the image resized to its
    short side (spec.resize_size), on uint8 tensors, as FFCV-style pipelines do."""
    # a PIL image (load_model's callers pass them) becomes a tensor first, so every image is
    # resized by the same code as the files read with read_image
    resize = [v2.PILToTensor(), v2.Resize(spec.resize_size, interpolation=spec.interpolation)]
    center = [*resize, v2.CenterCrop(spec.image_size)]
    scale = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    evaluation = Prepared(v2.Compose(center), v2.Compose(scale))
    policy = augment_policy(augment)
    if policy == "none":
        return evaluation, evaluation
    if policy == "flip":
        return Prepared(v2.Compose(center), v2.Compose([v2.RandomHorizontalFlip(), *scale])), evaluation
    crop = v2.RandomResizedCrop(spec.image_size, interpolation=spec.interpolation)
    training = Prepared(v2.Compose(resize),
                        v2.Compose([crop, v2.RandomHorizontalFlip(), *POLICIES.get(policy, []),
                                    *scale]))
    return training, evaluation


# data.augment's policies on top of a random resized crop and a flip
POLICIES = {"randaugment": [v2.RandAugment()], "trivialaugment": [v2.TrivialAugmentWide()],
            "autoaugment": [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)]}


def batch_mixing(mixup_alpha: float, cutmix_alpha: float, classes: int) -> Callable | None:
    """MixUp and/or CutMix (one of the two per batch when both are on), or None. They draw
    from torch's generator, which checkpoints save, so a resumed run mixes as an unbroken
    one; the targets they return are class probabilities, each row summing to 1."""
    chosen = [mix(alpha=alpha, num_classes=classes) for mix, alpha in
              ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)
