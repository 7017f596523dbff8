"""Gradual unfreezing: cfg.unfreeze phases, checked at start-up and applied at their epochs.

At the start of a phase's epoch its parameters become trainable, join the optimizer as
group `unfreeze<N>` (lr = lr_mult x optimizer.lr under the schedule, see optim.add_groups)
with the configured weight decay, and their modules leave eval mode.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from finetune.errors import ConfigError
from finetune.hooks import Hook
from finetune.model.freeze import trainable_names, update_eval_modules
from finetune.model.patterns import matching
from finetune.model.stages import Aliases
from finetune.train.optim import add_groups, optimizer_groups

log = logging.getLogger(__name__)


@dataclass
class Phase:
    number: int  # 1-based, in epoch order
    epoch: int
    patterns: list[str]
    lr_mult: float
    weight_decay: float | None
    names: list[str]  # the parameters it makes trainable

    @property
    def group(self) -> str:
        return f"unfreeze{self.number}"


def plan_phases(net: nn.Module, phases: Sequence[DictConfig], aliases: Aliases,
                max_epochs: int) -> list[Phase]:
    """Check every phase now, not at its epoch: it must unfreeze something still frozen."""
    names = [name for name, _ in net.named_parameters()]
    trainable = set(trainable_names(net))
    plan = []
    for index, phase in sorted(enumerate(phases), key=lambda item: item[1].epoch):
        key = f"unfreeze[{index}]"
        if not 2 <= phase.epoch <= max_epochs:
            raise ConfigError(f"{key}.epoch={phase.epoch} is not valid: use an epoch from 2 to "
                              f"trainer.max_epochs={max_epochs} (parameters trainable from epoch "
                              "1 on belong out of the freeze list instead).")
        hits: set[str] = set()
        for position, pattern in enumerate(phase.patterns):
            hits.update(matching(names, pattern, aliases, f"{key}.patterns[{position}]"))
        new = [name for name in names if name in hits and name not in trainable]
        if not new:
            raise ConfigError(f"{key} (epoch {phase.epoch}, patterns {list(phase.patterns)}) "
                              "matches only parameters that are already trainable by then; "
                              "freeze them first or drop the phase.")
        trainable.update(new)
        plan.append(Phase(len(plan) + 1, phase.epoch, list(phase.patterns), phase.lr_mult,
                          phase.weight_decay, new))
    return plan


class UnfreezeSchedule(Hook):
    """A trainer hook that applies the planned phases to the net, the optimizer and the
    scheduler at the start of their epochs. Its state: how many phases are applied, and the
    trainable set they left (checked on restore: the code or the backbone may differ)."""

    def __init__(self, plan: list[Phase], net: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, optimizer_cfg: DictConfig, frozen_modules: str):
        self.plan = plan
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler
        self.optimizer_cfg, self.frozen_modules = optimizer_cfg, frozen_modules
        self.active = 0  # phases applied so far

    def on_epoch_start(self, epoch: int) -> None:
        for phase in self.start_epoch(epoch):
            log.info("epoch %d: unfreeze phase %d: %s (%d tensors) join the optimizer as group %s",
                     epoch, phase.number, ", ".join(phase.patterns), len(phase.names), phase.group)

    def start_epoch(self, epoch: int) -> list[Phase]:
        """Apply the phases that start at `epoch`; return them."""
        started = [phase for phase in self.plan if phase.epoch == epoch]
        for phase in started:
            self.apply(phase)
        return started

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.active, "trainable": trainable_names(self.net)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply the phases the checkpoint had applied, in order, before the optimizer's
        state is loaded (it has their groups)."""
        for phase in self.plan[self.active:state["applied"]]:
            self.apply(phase)
        if trainable_names(self.net) != list(state["trainable"]):
            raise ConfigError("the checkpoint trained other parameters than this build does "
                              "(the code, the backbone or the unfreeze phases changed?); start "
                              "a new run.")

    def apply(self, phase: Phase) -> None:
        params = dict(self.net.named_parameters())
        for name in phase.names:
            params[name].requires_grad_(True)
        update_eval_modules(self.net, self.frozen_modules)
        named = [(name, params[name]) for name in phase.names]
        add_groups(self.optimizer, self.scheduler,
                   optimizer_groups(named, phase.group, phase.lr_mult, phase.weight_decay,
                                    self.optimizer_cfg))
        self.active = phase.number

    def describe(self) -> list[str]:
        return [f"epoch {phase.epoch}: unfreeze {', '.join(phase.patterns)} "
                f"({len(phase.names)} tensors) as group {phase.group}, lr x{phase.lr_mult:g}"
                for phase in self.plan]
