"""Freeze stage: Net + cfg.freeze -> requires_grad set, a report, and the frozen-module mode.

Patterns are applied in order to the names of `Net.named_parameters()`:
  pretrained.features   a dotted name: matches when its components appear in a parameter's
                        name in a row (the seed's `'pretrained' in name.split('.')`)
  pretrained.layer[12].*  a glob (has * ? or [) over the full name
  re:<expr>             a regular expression searched in the full name
  !<pattern>            makes trainable again what earlier patterns froze
"""

import csv
import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from finetune.errors import ConfigError, closest

SEED_TABLE_MAX_ROWS = 60  # above this the report summarizes per module instead


@dataclass
class ParamRow:
    name: str
    shape: tuple[int, ...]
    numel: int
    trainable: bool


@dataclass
class FreezeReport:
    rows: list[ParamRow]
    eval_modules: list[str]  # fully frozen modules kept in eval mode while training

    @property
    def trainable_params(self) -> int:
        return sum(row.numel for row in self.rows if row.trainable)

    @property
    def total_params(self) -> int:
        return sum(row.numel for row in self.rows)


def pattern_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate over parameter names for one pattern (without its leading '!')."""
    if pattern.startswith("re:"):
        try:
            expression = re.compile(pattern[3:])
        except re.error as error:
            raise ConfigError(f"freeze pattern {pattern!r} is not a valid regular expression: "
                              f"{error}.") from error
        return lambda name: expression.search(name) is not None
    if any(char in pattern for char in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    wanted = pattern.split(".")

    def contains_components(name: str) -> bool:
        parts = name.split(".")
        return any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))

    return contains_components


def module_names(parameter_names: Sequence[str]) -> set[str]:
    return {name.rsplit(".", i)[0] for name in parameter_names for i in range(1, name.count(".") + 1)}


def no_match_error(pattern: str, names: Sequence[str]) -> ConfigError:
    body = pattern.removeprefix("!").removeprefix("re:")
    hints = closest(body, sorted(module_names(names)) + list(names), n=5)
    hint = f" Closest names: {', '.join(hints)}." if hints else f" The first name is {names[0]}."
    return ConfigError(f"freeze pattern {pattern!r} matches no parameter.{hint} To list every "
                       "parameter name: python train.py dry_run=true 'freeze=[]' (plus your "
                       "backbone overrides).")


def trainable_flags(names: Sequence[str], patterns: Sequence[str]) -> dict[str, bool]:
    """Apply the patterns in order; every parameter starts trainable."""
    trainable = dict.fromkeys(names, True)
    for pattern in patterns:
        unfreeze = pattern.startswith("!")
        body = pattern[1:] if unfreeze else pattern
        if not body:
            raise ConfigError(f"freeze pattern {pattern!r} is empty.")
        matches = pattern_matcher(body)
        hits = [name for name in names if matches(name)]
        if not hits:
            raise no_match_error(pattern, names)
        for name in hits:
            trainable[name] = unfreeze
    if names and not any(trainable.values()):
        raise ConfigError(f"freeze={list(patterns)} freezes all {len(names)} parameters, leaving "
                          "nothing to train: narrow the patterns or add '!<pattern>' entries.")
    return trainable


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


def apply_freeze(net: nn.Module, patterns: Sequence[str], frozen_modules: str) -> FreezeReport:
    """Set requires_grad from the patterns and the eval-mode policy for frozen modules."""
    named = list(net.named_parameters())
    flags = trainable_flags([name for name, _ in named], patterns)
    for name, param in named:
        param.requires_grad_(flags[name])
    eval_modules = fully_frozen_modules(net) if frozen_modules == "eval" else []
    net.frozen_eval_modules = eval_modules
    rows = [ParamRow(name, tuple(param.shape), param.numel(), flags[name]) for name, param in named]
    return FreezeReport(rows, eval_modules)


def seed_table(rows: Sequence[ParamRow]) -> list[str]:
    """The seed recipe's printout: one line per parameter with its gradient flag."""
    return [f"params: \t{row.name}, \tgradient: {row.trainable}" for row in rows]


def module_summary(rows: Sequence[ParamRow], depth: int = 2) -> list[str]:
    """One line per module `depth` components deep: parameters and how many are trainable."""
    groups: dict[str, list[ParamRow]] = {}
    for row in rows:
        groups.setdefault(".".join(row.name.split(".")[:depth]), []).append(row)
    width = max(len(name) for name in groups)
    lines = []
    for name, members in groups.items():
        total = sum(row.numel for row in members)
        trainable = sum(row.numel for row in members if row.trainable)
        state = "trainable" if trainable == total else "frozen" if trainable == 0 else "partly frozen"
        lines.append(f"{name:<{width}}  {total:>12,d} params  {state}")
    return lines


def format_report(report: FreezeReport) -> str:
    rows = report.rows
    lines = seed_table(rows) if len(rows) <= SEED_TABLE_MAX_ROWS else module_summary(rows)
    share = 100.0 * report.trainable_params / report.total_params
    lines.append(f"trainable: {report.trainable_params:,d} / {report.total_params:,d} "
                 f"parameters ({share:.1f}%)")
    if report.eval_modules:
        lines.append("kept in eval mode while training (fully frozen): "
                     + ", ".join(report.eval_modules))
    return "\n".join(lines)


def write_params_tsv(report: FreezeReport, path: str) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["name", "shape", "numel", "trainable"])
        for row in report.rows:
            writer.writerow([row.name, "x".join(map(str, row.shape)), row.numel, row.trainable])
