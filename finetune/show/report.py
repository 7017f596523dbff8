"""What is trained, and how: the start-up report and params.tsv (one row per parameter)."""

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from finetune.hooks import Hook
from finetune.model.adapters import is_adapter_parameter
from finetune.model.freeze import trainable_names
from finetune.model.patterns import under_any
from finetune.state.files import atomic_write, spreadsheet_cell

SEED_TABLE_MAX_ROWS = 60  # above this the report summarizes per module instead
EVAL_MODULES_SHOWN = 12
TSV_COLUMNS = ["name", "shape", "numel", "trainable", "group", "lr", "weight_decay", "mode"]


@dataclass
class ParamRow:
    name: str
    shape: tuple[int, ...]
    numel: int
    trainable: bool
    group: str  # optimizer group name; "-" when frozen
    lr: float | None
    weight_decay: float | None
    mode: str  # the module's mode while training: train | eval


def parameter_rows(net: nn.Module, optimizer: torch.optim.Optimizer) -> list[ParamRow]:
    groups = {id(param): group for group in optimizer.param_groups for param in group["params"]}
    in_eval = under_any(getattr(net, "frozen_eval_modules", []))
    rows = []
    for name, param in net.named_parameters():
        group = groups.get(id(param))
        rows.append(ParamRow(
            name, tuple(param.shape), param.numel(), param.requires_grad,
            group["name"] if group else "-", group["lr"] if group else None,
            group["weight_decay"] if group else None, "eval" if in_eval(name) else "train"))
    return rows


def trainable_count(rows: Sequence[ParamRow]) -> int:
    return sum(row.numel for row in rows if row.trainable)


def total_count(rows: Sequence[ParamRow]) -> int:
    return sum(row.numel for row in rows)


def seed_table(rows: Sequence[ParamRow]) -> list[str]:
    """The seed recipe's printout (name, gradient flag), then the group or mode in brackets."""
    lines = []
    for row in rows:
        how = (f"{row.group} lr={row.lr:.3g} wd={row.weight_decay:g} {row.mode}" if row.trainable
               else row.mode)
        lines.append(f"params: \t{row.name}, \tgradient: {row.trainable}\t[{how}]")
    return lines


def module_summary(rows: Sequence[ParamRow], depth: int = 2) -> list[str]:
    """One line per module `depth` components deep: size, frozen or not, groups, mode."""
    modules: dict[str, list[ParamRow]] = {}
    for row in rows:  # LoRA adapters (adapter=lora) get rows of their own
        module = ".".join(row.name.split(".")[:depth])
        modules.setdefault(module + " LoRA" if is_adapter_parameter(row.name) else module,
                           []).append(row)
    width = max(len(name) for name in modules)
    lines = []
    for name, members in modules.items():
        total, trainable = total_count(members), trainable_count(members)
        state = "trainable" if trainable == total else "frozen" if trainable == 0 else "partly frozen"
        groups = sorted({row.group for row in members if row.trainable})
        modes = "/".join(sorted({row.mode for row in members}))
        lines.append(f"{name:<{width}}  {total:>12,d} params  {state:<13}  {modes:<10}  "
                     f"{', '.join(groups)}".rstrip())
    return lines


def group_summary(optimizer: torch.optim.Optimizer) -> list[str]:
    lines = ["optimizer groups:"]
    for group in optimizer.param_groups:
        count = sum(param.numel() for param in group["params"])
        lines.append(f"  {group['name']:<24} {count:>12,d} params  lr {group['lr']:<10.4g} "
                     f"weight_decay {group['weight_decay']:g}")
    return lines


def format_report(rows: Sequence[ParamRow], optimizer: torch.optim.Optimizer,
                  eval_modules: Sequence[str]) -> list[str]:
    lines = seed_table(rows) if len(rows) <= SEED_TABLE_MAX_ROWS else module_summary(rows)
    trainable, total = trainable_count(rows), total_count(rows)
    lines.append(f"trainable: {trainable:,d} / {total:,d} parameters ({100.0 * trainable / total:.1f}%)")
    if eval_modules:  # a long list (each LoRA layer's base, say) shortened: params.tsv has all
        shown = ", ".join(eval_modules[:EVAL_MODULES_SHOWN])
        more = len(eval_modules) - EVAL_MODULES_SHOWN
        lines.append("kept in eval mode while training (fully frozen): " + shown
                     + (f" and {more} more (params.tsv's mode column)" if more > 0 else ""))
    return lines + group_summary(optimizer)


def write_params_tsv(rows: Sequence[ParamRow], path: str) -> None:
    with atomic_write(path) as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for row in rows:  # a group's name is the user's: kept text in a spreadsheet; the
            # mark for no group, "-" alone, holds no formula and stays as it is
            cells = [row.name, "x".join(map(str, row.shape)), row.numel, row.trainable, row.group,
                     "" if row.lr is None else f"{row.lr:.6g}",
                     "" if row.weight_decay is None else f"{row.weight_decay:g}", row.mode]
            writer.writerow([cell if cell == "-" else spreadsheet_cell(cell) for cell in cells])


class ParamsTsv(Hook):
    """A trainer hook that writes params_epoch<N>.tsv when epoch N starts with another
    trainable set than the last one written (an unfreeze phase ran before it)."""

    def __init__(self, run_dir: str, net: nn.Module, optimizer: torch.optim.Optimizer):
        self.run_dir, self.net, self.optimizer = run_dir, net, optimizer
        self.written: list[str] = []

    def on_fit_start(self, progress) -> None:
        self.written = trainable_names(self.net)  # params.tsv, or the resumed run's last one

    def on_epoch_start(self, epoch: int) -> None:
        if trainable_names(self.net) != self.written:
            write_params_tsv(parameter_rows(self.net, self.optimizer),
                             os.path.join(self.run_dir, f"params_epoch{epoch}.tsv"))
            self.written = trainable_names(self.net)
