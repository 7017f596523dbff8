"""Optimizer stage: trainable parameters + param_groups / lr_decay / cfg.optimizer / cfg.scheduler.

Every trainable parameter lands in exactly one group: the first `param_groups` entry whose
patterns match it, else its layer-wise decay group (`lr_decay`), else `default`. A group's
learning rate is `lr_mult` x optimizer.lr. Its weight decay is the entry's own when given;
otherwise optimizer.weight_decay, with 1-d parameters (biases, norm weights) split off into
a `<name>/no_decay` group unless optimizer.decay_bias_and_norm is true.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from finetune.config.schemas import auto_freeze
from finetune.errors import ConfigError
from finetune.model.freeze import trainable_names
from finetune.model.patterns import matching, under_any
from finetune.model.stages import Aliases
from finetune.state.trust import load_class

OWN_KEYS = ("_target_", "decay_bias_and_norm")  # read here, not passed to the optimizer
RESERVED_NAME = re.compile(r"default|@.*|unfreeze\d+")  # names the tool gives groups itself


@dataclass
class GroupRule:
    name: str
    matches: Callable[[str], bool]
    lr_mult: float = 1.0
    weight_decay: float | None = None  # None: optimizer.weight_decay, 1-d params exempt


def explicit_rules(entries: Sequence[DictConfig], names: Sequence[str], trainable: set[str],
                   aliases: Aliases) -> list[GroupRule]:
    """param_groups entries; each pattern must match some parameter, each entry a trainable one."""
    rules: list[GroupRule] = []
    for index, entry in enumerate(entries):
        name = entry.name or f"group{index}"
        if name in [rule.name for rule in rules] or RESERVED_NAME.fullmatch(name):
            raise ConfigError(f"param_groups[{index}].name={name!r} is taken: give each entry its "
                              "own name, not default, @<alias> (lr_decay) or unfreeze<N> (phases).")
        members = set()
        for position, pattern in enumerate(entry.patterns):
            members.update(matching(names, pattern, aliases,
                                    f"param_groups[{index}].patterns[{position}]"))
        if not members & trainable:
            raise ConfigError(f"param_groups[{index}] ({list(entry.patterns)}) matches only frozen "
                              "parameters; parameters that an unfreeze phase makes trainable "
                              "get that phase's lr_mult and weight_decay instead.")
        rules.append(GroupRule(name, members.__contains__, entry.lr_mult, entry.weight_decay))
    return rules


def layer_decay_rules(lr_decay: float, aliases: Aliases) -> list[GroupRule]:
    """Head and classifier at the full rate, then x lr_decay per stage down to the stem."""
    count = aliases.stage_count
    if count == 0:
        raise ConfigError(f"lr_decay={lr_decay} needs the backbone's stages, but the backbone "
                          f"({aliases.family}) has no stage mapping; use param_groups instead.")
    depths = [("@head", 0), ("@classifier", 0)]
    depths += [(f"@stage{stage}", count - stage + 1) for stage in range(count, 0, -1)]
    depths.append(("@stem", count + 1))
    return [GroupRule(alias, under_any(aliases.lookup(alias)), lr_decay ** depth)
            for alias, depth in depths]


def group_rules(cfg: DictConfig, net: nn.Module, aliases: Aliases) -> list[GroupRule]:
    """The rules from cfg.param_groups and cfg.lr_decay (and, for freeze=auto, a group per
    stage or per tensor for its scales to act on), first match wins."""
    names = [name for name, _ in net.named_parameters()]
    trainable = set(trainable_names(net))
    rules = explicit_rules(cfg.param_groups, names, trainable, aliases)
    if cfg.lr_decay is not None:
        if cfg.unfreeze:
            raise ConfigError(f"lr_decay={cfg.lr_decay} and unfreeze phases both set learning "
                              "rates per stage: phases give their parameters their own lr_mult, "
                              "so use one or the other.")
    if auto_freeze(cfg.freeze) == "scale" and cfg.auto.granularity == "tensor":
        return rules + tensor_rules(names, rules, cfg.lr_decay, aliases)
    if cfg.lr_decay is not None:
        return rules + layer_decay_rules(cfg.lr_decay, aliases)
    if auto_freeze(cfg.freeze) == "scale":  # a group per stage
        if aliases.stage_count == 0:
            raise ConfigError(f"freeze=auto scales each stage's learning rate, but the backbone "
                              f"({aliases.family}) has no stage mapping; use "
                              "auto.granularity=tensor (a rate per parameter tensor).")
        return rules + layer_decay_rules(1.0, aliases)
    return rules


def tensor_rules(names: Sequence[str], rules: Sequence[GroupRule], lr_decay: float | None,
                 aliases: Aliases) -> list[GroupRule]:
    """A group per parameter tensor not in a param_groups entry, named after it, at its
    lr_decay stage's rate when lr_decay is set."""
    stages = layer_decay_rules(lr_decay, aliases) if lr_decay is not None else []
    taken = {rule.name for rule in rules}
    tensors = []
    for name in names:
        if any(rule.matches(name) for rule in rules):
            continue
        if name in taken:
            raise ConfigError(f"param_groups has a group named {name!r}, the name of a parameter "
                              "that auto.granularity=tensor gives a group of its own; rename it.")
        stage = next((rule for rule in stages if rule.matches(name)), None)
        tensors.append(GroupRule(name, name.__eq__, stage.lr_mult if stage else 1.0))
    return tensors


def optimizer_groups(named: Sequence[tuple[str, nn.Parameter]], name: str, lr_mult: float,
                     weight_decay: float | None, cfg: DictConfig) -> list[dict[str, Any]]:
    """One logical group as optimizer param groups: split off 1-d params from weight decay."""
    params = [param for _, param in named]

    def group(suffix: str, members: list, decay: float) -> dict[str, Any]:
        return {"params": members, "name": name + suffix, "lr": cfg.lr * lr_mult,
                "lr_mult": lr_mult, "weight_decay": decay}

    if weight_decay is not None or cfg.decay_bias_and_norm:
        return [group("", params, cfg.weight_decay if weight_decay is None else weight_decay)]
    decayed = [param for param in params if param.ndim > 1]
    exempt = [param for param in params if param.ndim <= 1]
    groups = [group("", decayed, cfg.weight_decay), group("/no_decay", exempt, 0.0)]
    return [entry for entry in groups if entry["params"]]


def parameter_groups(net: nn.Module, rules: Sequence[GroupRule],
                     cfg: DictConfig) -> list[dict[str, Any]]:
    """Every trainable parameter (the same tensor objects) in exactly one group."""
    assigned: dict[str, list] = {}
    chosen: dict[str, GroupRule] = {}
    default = GroupRule("default", lambda name: True)
    for name, param in net.named_parameters():
        if param.requires_grad:
            rule = next((rule for rule in rules if rule.matches(name)), default)
            assigned.setdefault(rule.name, []).append((name, param))
            chosen[rule.name] = rule
    order = ["default"] + [rule.name for rule in rules]  # the default group first
    return [group for key in order if key in assigned
            for group in optimizer_groups(assigned[key], key, chosen[key].lr_mult,
                                          chosen[key].weight_decay, cfg)]


def target_class(cfg: DictConfig, key: str, trust: Sequence[str] | None) -> type:
    """`trust` not None: the config is a file's (trust.load_class)."""
    try:
        return load_class(f"{key}._target_", cfg._target_, trust)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"{key}._target_={cfg._target_!r} is not an importable class: "
                          f"{error}") from error


def build_optimizer(net: nn.Module, cfg: DictConfig, rules: Sequence[GroupRule] = (),
                    trust: Sequence[str] | None = None) -> torch.optim.Optimizer:
    arguments = {key: value for key, value in OmegaConf.to_container(cfg, resolve=True).items()
                 if key not in OWN_KEYS}
    groups = parameter_groups(net, rules, cfg)
    try:
        return target_class(cfg, "optimizer", trust)(groups, **arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer={arguments} is not valid for {cfg._target_}: {error}") from error


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, adds_groups: bool,
                    trust: Sequence[str] | None = None):
    """The epoch-wise learning-rate scheduler, or None for a constant rate."""
    if cfg._target_ is None:
        return None
    arguments = {key: value for key, value in OmegaConf.to_container(cfg, resolve=True).items()
                 if key != "_target_"}
    try:
        scheduler = target_class(cfg, "scheduler", trust)(optimizer, **arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"scheduler={arguments} is not valid for {cfg._target_}: {error}") from error
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(f"scheduler._target_={cfg._target_} needs a metric at every step; "
                          "use an epoch-wise schedule such as scheduler=cosine or step.")
    if adds_groups and not hasattr(scheduler, "_get_closed_form_lr"):
        raise ConfigError(f"scheduler._target_={cfg._target_} cannot take the groups that unfreeze "
                          "phases add (it keeps per-group state); use scheduler=cosine, step or "
                          "none, or another scheduler with a closed form (MultiStepLR, "
                          "ExponentialLR, LinearLR, PolynomialLR).")
    return scheduler


def add_groups(optimizer: torch.optim.Optimizer, scheduler: Any,
               groups: Sequence[dict[str, Any]]) -> None:
    """Add groups mid-run so the scheduler drives them too.

    PyTorch schedulers zip their base_lrs with the optimizer's groups, so a group added
    without a base_lr is silently never scheduled. Here each new group gets one, and starts
    at the learning rate it would have now had it been there from the start: it joins the
    schedule where it is, rather than restarting it.
    """
    for group in groups:
        group["initial_lr"] = group["lr"]
        optimizer.add_param_group(group)
        if scheduler is not None:
            scheduler.base_lrs.append(group["lr"])
    if scheduler is None or scheduler.last_epoch == 0:
        return
    current = scheduler._get_closed_form_lr()  # build_scheduler checked that it has one
    for group, lr in zip(optimizer.param_groups[-len(groups):], current[-len(groups):], strict=True):
        group["lr"] = lr


# Schedules whose rate depends on the epoch alone, not on the run's length: a resumed run
# with a higher trainer.max_epochs goes on stepping them as a longer run would have.
EPOCH_SCHEDULES = ("StepLR", "MultiStepLR", "ExponentialLR", "ConstantLR",
                   "CosineAnnealingWarmRestarts")


def how_schedule_extends(target: str | None) -> str | None:
    """What raising trainer.max_epochs on a resumed run does to this schedule (by its
    _target_), or None where nothing sensible can be done (so no "train more" is offered)."""
    name = (target or "").rpartition(".")[2]
    if not name:
        return "the learning rate stays constant"
    if name == "CosineAnnealingLR":
        return ("the cosine decay is planned again, from the rate of the last finished epoch "
                "down to eta_min over the added epochs")
    if name in EPOCH_SCHEDULES:
        return f"{name} goes on by epoch, as in a run planned this long"
    return None


def extend_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, target: str | None,
                    done: int, max_epochs: int, pending_phases: Sequence[int]) -> str:
    """A resumed run raised trainer.max_epochs after `done` epochs: fit the schedule to the
    new length (its state, so the checkpoints, hold the new plan) and say how."""
    how = how_schedule_extends(target)
    if how is None:
        raise ConfigError(f"trainer.max_epochs={max_epochs}: scheduler._target_={target} plans "
                          "the run's length, and resuming cannot stretch it sensibly. Start a "
                          "new run with the longer trainer.max_epochs.")
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        if pending_phases:  # their groups would join the old plan's rates
            raise ConfigError(f"trainer.max_epochs={max_epochs}: unfreeze phases at epochs "
                              f"{list(pending_phases)} have not started yet, and the cosine "
                              "plan cannot be redrawn around them. Resume without raising "
                              "max_epochs first; raise it once the run has finished.")
        replan_cosine_tail(scheduler, optimizer, max_epochs - done)
    return how


def replan_cosine_tail(scheduler: torch.optim.lr_scheduler.CosineAnnealingLR,
                       optimizer: torch.optim.Optimizer, epochs_left: int) -> None:
    """Each group decays from the rate its last finished epoch trained at (r) on a new half
    cosine: the k-th of n added epochs trains at eta_min + (r - eta_min)(1 + cos(pi k /
    (n + 1))) / 2, so, as in any cosine run, the last epoch still trains above eta_min."""
    scheduler.last_epoch -= 1  # the rates the last finished epoch trained at
    scheduler.base_lrs = scheduler._get_closed_form_lr()
    scheduler.T_max, scheduler.last_epoch = epochs_left + 1, 1
    rates = scheduler._get_closed_form_lr()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates
