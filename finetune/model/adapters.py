"""Adapter stage: LoRA layers (the peft library) added to the backbone after the freeze stage.

The freeze list decides what of the base model trains (`adapter=lora` freezes @backbone by
default, so the head and the adapters train); the adapters always train. Targets are
patterns (finetune/model/patterns.py) over the backbone's Linear and Conv2d layers; each family
has defaults. A layer whose parent uses its weight directly instead of calling it
(torchvision's nn.MultiheadAttention and Swin attention pass `.weight` to F.linear) would
never run its adapter, so such targets are refused: peft's own MultiheadAttention support
merges into the frozen weights at every step, which changes them.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn
from torchvision import models

from finetune.errors import ConfigError, closest
from finetune.model.patterns import matcher
from finetune.model.stages import Aliases

ADAPTABLE = (nn.Linear, nn.Conv2d)
# Per family: the attention and MLP linears a family's blocks call (torchvision ViT and Swin
# call their attention weights through F.linear, so only their MLPs can be adapted).
DEFAULT_TARGETS: dict[type, list[str]] = {
    models.VisionTransformer: ["mlp.0", "mlp.3"],
    models.SwinTransformer: ["mlp.0", "mlp.3"],
    models.ConvNeXt: ["block.3", "block.5"],
}
TIMM_DEFAULT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # ViT, Swin, ConvNeXt, ...


@dataclass
class AdapterSummary:
    """What was added: for the start-up report."""

    layers: list[str]
    parameters: int
    settings: str

    def describe(self) -> str:
        return (f"LoRA adapters ({self.settings}) on {len(self.layers)} layers: "
                f"{self.parameters:,d} parameters, all trainable")


def enabled(adapter: DictConfig | None) -> bool:
    """adapter=lora; a checkpoint's config (untrusted) may hold anything there."""
    return isinstance(adapter, DictConfig) and adapter.get("name") == "lora"


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def default_targets(backbone: nn.Module, family: str) -> list[str]:
    for kind, targets in DEFAULT_TARGETS.items():
        if isinstance(backbone, kind):
            return targets
    if type(backbone).__module__.startswith("timm."):
        return TIMM_DEFAULT_TARGETS
    raise ConfigError(
        f"adapter.targets=null: there are no default LoRA targets for {family} backbones "
        "(defaults exist for ViT, Swin and ConvNeXt, torchvision's and timm's). Name the layers "
        "with patterns, e.g. adapter.targets='[layer4]'; python train.py dry_run=true 'freeze=[]' "
        "lists the parameter names.")


def adaptable_layers(backbone: nn.Module) -> list[str]:
    """The Net names of Linear and Conv2d layers, except those inside nn.MultiheadAttention
    (which reads out_proj.weight without calling out_proj)."""
    inside_attention = [name for name, module in backbone.named_modules(prefix="pretrained")
                        if isinstance(module, nn.MultiheadAttention)]
    return [name for name, module in backbone.named_modules(prefix="pretrained")
            if isinstance(module, ADAPTABLE)
            and not any(name.startswith(parent + ".") for parent in inside_attention)]


def resolve_targets(backbone: nn.Module, adapter: DictConfig, aliases: Aliases) -> list[str]:
    """The Net names of the layers the adapter's patterns (or the family's defaults) select."""
    layers = adaptable_layers(backbone)
    given = adapter.targets is not None
    patterns = list(adapter.targets) if given else default_targets(backbone, aliases.family)
    chosen: set[str] = set()
    for index, pattern in enumerate(patterns):
        selects = matcher(pattern, aliases, f"adapter.targets[{index}]")
        hits = [name for name in layers if selects(name)]
        if given and not hits:
            hint = closest(pattern, layers, n=5) or layers[:5]
            raise ConfigError(
                f"adapter.targets[{index}]={pattern!r} matches no Linear or Conv2d layer of the "
                f"backbone that calls it (layers inside nn.MultiheadAttention do not run "
                f"adapters). Layers it could name: {', '.join(hint)}.")
        chosen.update(hits)
    if not chosen:
        raise ConfigError(f"adapter.targets: the defaults {patterns} match no layer of this "
                          f"{aliases.family}; name the layers with adapter.targets.")
    return [name for name in layers if name in chosen]


def check_called(backbone: nn.Module, targets: Sequence[str], image_size: int) -> None:
    """Refuse targets the forward pass never calls: their adapters would never train."""
    called: set[str] = set()
    modules = dict(backbone.named_modules(prefix="pretrained"))
    handles = [modules[name].register_forward_hook(lambda *_, name=name: called.add(name))
               for name in targets]
    device = next(backbone.parameters()).device
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        backbone.train(was_training)
        for handle in handles:
            handle.remove()
    unused = [name for name in targets if name not in called]
    if unused:
        raise ConfigError(
            f"adapter.targets: {len(unused)} selected layers are never called by the forward "
            f"pass ({', '.join(unused[:5])}): their parent uses the weights directly (as "
            "torchvision's Swin attention does with F.linear), so an adapter there would never "
            "run. Choose other layers, e.g. the MLP linears.")


def peft_library():
    try:
        import peft
    except ImportError as error:
        raise ConfigError(f"adapter=lora needs the peft library ({error}): pip install -e "
                          "'.[peft]'") from error
    return peft


def add_adapters(backbone: nn.Module, adapter: DictConfig, targets: Sequence[str]) -> AdapterSummary:
    """Wrap the target layers with LoRA in place. peft marks everything else frozen; the
    freeze stage's flags are put back, so the freeze list keeps deciding the rest."""
    peft = peft_library()
    flags = {param: param.requires_grad for param in backbone.parameters()}
    config = peft.LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                             target_modules=[name.removeprefix("pretrained.") for name in targets])
    try:
        peft.inject_adapter_in_model(config, backbone)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"adapter.targets: peft could not add LoRA to {list(targets)[:5]}: "
                          f"{error}") from error
    for param, trainable in flags.items():
        param.requires_grad_(trainable)
    added = [param for name, param in backbone.named_parameters() if is_adapter_parameter(name)]
    for param in added:
        param.requires_grad_(True)
    return AdapterSummary(list(targets), sum(param.numel() for param in added),
                          f"r={adapter.r}, alpha={adapter.alpha:g}, dropout={adapter.dropout:g}")


def fold_adapters(net: nn.Module) -> int:
    """Fold every LoRA layer into its base weight and put the plain layer back (the names
    are the base model's again); the number merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [name for name, module in net.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in wrapped:
        layer = net.get_submodule(name)
        layer.merge()
        net.set_submodule(name, layer.get_base_layer())
    return len(wrapped)


def adapted(net: nn.Module, adapter: DictConfig | None, aliases: Aliases,
            image_size: int) -> AdapterSummary | None:
    """The adapter stage on a built Net (after freezing): None when adapter is off."""
    if not enabled(adapter):
        return None
    targets = resolve_targets(net.pretrained, adapter, aliases)
    check_called(net.pretrained, targets, image_size)
    return add_adapters(net.pretrained, adapter, targets)
