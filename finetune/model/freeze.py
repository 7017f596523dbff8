"""Freeze stage: Net + cfg.freeze -> requires_grad set and the frozen-module mode policy.

Patterns (finetune/model/patterns.py) are applied in order to the names of `Net.named_parameters()`;
`!<pattern>` makes trainable again what earlier patterns froze.
"""

from collections.abc import Sequence

from torch import nn

from finetune.errors import ConfigError
from finetune.model.patterns import matching
from finetune.model.stages import Aliases


def trainable_flags(names: Sequence[str], patterns: Sequence[str],
                    aliases: Aliases) -> dict[str, bool]:
    """Apply the patterns in order; every parameter starts trainable."""
    trainable = dict.fromkeys(names, True)
    for index, pattern in enumerate(patterns):
        unfreeze = pattern.startswith("!")
        body = pattern[1:] if unfreeze else pattern
        hits = matching(names, body, aliases, f"freeze[{index}]")
        if unfreeze and all(trainable[name] for name in hits):
            raise ConfigError(f"freeze[{index}]={pattern!r} makes nothing trainable again: none of "
                              f"the {len(hits)} parameters it matches is frozen by the patterns "
                              "before it. Drop it, or put it after the pattern it should undo.")
        for name in hits:
            trainable[name] = unfreeze
    if names and not any(trainable.values()):
        raise ConfigError(f"freeze={list(patterns)} freezes all {len(names)} parameters, leaving "
                          "nothing to train: narrow the patterns or add '!<pattern>' entries.")
    return trainable


def trainable_names(net: nn.Module) -> list[str]:
    """The parameters that train now, in named_parameters() order."""
    return [name for name, param in net.named_parameters() if param.requires_grad]


def fully_frozen_modules(net: nn.Module) -> list[str]:
    """The outermost submodules that hold parameters, all of them frozen."""
    chosen: list[str] = []
    for name, module in net.named_modules():
        if not name or any(name.startswith(parent + ".") for parent in chosen):
            continue
        params = list(module.parameters())
        if params and not any(param.requires_grad for param in params):
            chosen.append(name)
    return chosen


def update_eval_modules(net: nn.Module, frozen_modules: str) -> list[str]:
    """Apply the mode policy to the current requires_grad flags (again after an unfreeze).

    `eval`: fully frozen modules, with everything inside them, stay in eval mode whenever
    the net trains (Net.train re-applies it), so their BatchNorm statistics and dropout stay
    as loaded. `train`: plain PyTorch behaviour.
    """
    net.frozen_eval_modules = fully_frozen_modules(net) if frozen_modules == "eval" else []
    return net.frozen_eval_modules


def apply_freeze(net: nn.Module, patterns: Sequence[str], frozen_modules: str,
                 aliases: Aliases) -> list[str]:
    """Set requires_grad from the patterns; return the modules kept in eval mode."""
    named = list(net.named_parameters())
    flags = trainable_flags([name for name, _ in named], patterns, aliases)
    for name, param in named:
        param.requires_grad_(flags[name])
    return update_eval_modules(net, frozen_modules)


def unchanging_state_names(net: nn.Module) -> set[str]:
    """State-dict entries training cannot change: frozen parameters, and the buffers of the
    modules kept in eval mode (their BatchNorm statistics stay as loaded)."""
    names = {name for name, _ in net.named_parameters()} - set(trainable_names(net))
    for module_name in getattr(net, "frozen_eval_modules", []):
        names.update(f"{module_name}.{name}"
                     for name, _ in net.get_submodule(module_name).named_buffers())
    return names
