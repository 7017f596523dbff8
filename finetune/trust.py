"""What a file may make the tool build: the rule that keeps a file from choosing code to run.

A config the user writes (conf/ files, the command line) may name any class in `_target_`.
A config read from a file (a checkpoint's saved config and overrides, used by load_model,
mode=evaluate|predict and resume=) is data: its `_target_`s may name only the classes this
tool builds there by design, checked by name before anything is imported:

  head.layers[i]._target_   torch.nn layers (torch.nn.*, subclasses of torch.nn.Module)
  optimizer._target_        torch.optim optimizers (torch.optim.*)
  scheduler._target_        torch.optim.lr_scheduler schedules
  logger.<name>._target_    this tool's loggers (finetune.loggers.*)

Anything else, and a `_target_` anywhere else, is refused with the key and the class named,
unless the user's own command line trusts it: `trust=[mypkg.MyLayer]` (one class),
`trust=[mypkg.*]` (a package), `trust=['*']` (any class: for files you made yourself). A
file's own `trust` is never read. Interpolations (`${...}`) in a file are refused too: they
would read environment variables or call resolvers when the config is resolved.
"""

import importlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from finetune.errors import ConfigError

DOTTED = re.compile(r"[A-Za-z]\w*(\.[A-Za-z]\w*)+")  # no _private or __dunder__ parts

# key pattern -> (the package a file may name classes of there, what they are, their base)
BUILT_IN = (
    (re.compile(r"head\.layers\[\d+\]\._target_"), "torch.nn", "a torch.nn layer",
     "torch.nn.Module"),
    (re.compile(r"optimizer\._target_"), "torch.optim", "a torch.optim optimizer",
     "torch.optim.Optimizer"),
    (re.compile(r"scheduler\._target_"), "torch.optim.lr_scheduler",
     "a torch.optim.lr_scheduler schedule", "torch.optim.lr_scheduler.LRScheduler"),
    (re.compile(r"logger\.\w+\._target_"), "finetune.loggers", "a logger of finetune.loggers",
     "finetune.loggers.TensorBoardLogger"),  # the loggers it ships: add new ones here
)


def targets(config: Any, key: str = "") -> list[tuple[str, Any]]:
    """Every `_target_` in a plain config, as (its full key, its value)."""
    found = []
    if isinstance(config, dict):
        for name, value in config.items():
            here = f"{key}.{name}" if key else str(name)
            found += [(here, value)] if name == "_target_" else targets(value, here)
    elif isinstance(config, list | tuple):
        for index, item in enumerate(config):
            found += targets(item, f"{key}[{index}]")
    return found


def strings(config: Any, key: str = "") -> Iterable[tuple[str, str]]:
    """Every string in a plain config (keys too), with where it is."""
    if isinstance(config, dict):
        for name, value in config.items():
            here = f"{key}.{name}" if key else str(name)
            yield here, str(name)
            yield from strings(value, here)
    elif isinstance(config, list | tuple):
        for index, item in enumerate(config):
            yield from strings(item, f"{key}[{index}]")
    elif isinstance(config, str):
        yield key, config


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def defined_in(path: str, package: str, base: str | None = None) -> bool:
    """Whether `path` names a class defined in `package` (not one it merely imports: the
    attribute walk of get_class would reach those too), of `base` if given. Only a path
    already known to lie under `package` gets here, so the import is of that package."""
    module, _, name = path.rpartition(".")
    try:  # the module part, then one attribute: no walk through what the module imports
        cls = getattr(importlib.import_module(module), name, None)
    except Exception:
        return False
    return (isinstance(cls, type) and under(cls.__module__, package)
            and (base is None or issubclass(cls, class_at(base))))


def class_at(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def trusted(path: str, trust: Sequence[str]) -> bool:
    """Whether the user's `trust` entries name `path`: the class itself, its package
    (`pkg.*`, for classes defined there) or anything (`*`)."""
    if "*" in trust or path in trust:
        return True
    packages = [entry[:-2] for entry in trust if entry.endswith(".*")]
    return any(under(path, package) and defined_in(path, package) for package in packages)


def built_in(key: str, path: str) -> tuple[bool, str]:
    """Whether `path` is a class this tool builds at `key` by design, and what would be."""
    for pattern, package, what, base in BUILT_IN:
        if pattern.fullmatch(key):
            return under(path, package) and defined_in(path, package, base), what
    return False, "built from a file's config (no class is)"


def check_plain(value: Any, source: str, key: str = "config") -> None:
    """What a run saves is JSON-like data; anything else (a tuple, say, which the checks
    above would have to foresee) is not this tool's."""
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"{source}: its saved {key} has a key {name!r} that is not a "
                                  "string. Refusing the file.")
            check_plain(item, source, f"{key}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_plain(item, source, f"{key}[{index}]")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise ConfigError(f"{source}: its saved {key} is a {type(value).__name__}, not plain "
                          "data. Refusing the file.")


def refuse_interpolations(config: Any, source: str) -> None:
    """A saved config is resolved before it is saved: an interpolation in it is a crafted
    file's, which would read the environment or call resolvers when resolved."""
    for key, value in strings(config):
        if "${" in value:
            raise ConfigError(f"{source}: its saved config has an interpolation at {key} "
                              f"({value!r}); this tool never saves one, and a file may not make "
                              "it read the environment or call resolvers. Refusing the file.")


def check_targets(config: dict, source: str, trust: Sequence[str] = (),
                  sections: Sequence[str] | None = None) -> None:
    """Refuse a config from a file whose `_target_`s (in the top-level `sections`, or
    anywhere) name other classes than this tool builds there, unless `trust` allows them."""
    for key, path in targets(config):
        if path is None or (sections is not None and key.split(".")[0] not in sections):
            continue
        if not isinstance(path, str) or not DOTTED.fullmatch(path):
            raise ConfigError(f"{source}: its saved config sets {key}={path!r}, which is not "
                              "a class path. Refusing the file.")
        allowed, what = built_in(key, path)
        if not (allowed or trusted(path, trust)):
            raise ConfigError(
                f"{source}: its saved config sets {key}={path!r}, which is not {what}. A file "
                "may not choose code to run, so nothing was imported or built. If you trust "
                f"this file, allow the class on your command line: trust=[{path}] (or "
                f"trust=[{path.rsplit('.', 1)[0]}.*] for its module).")


def check_file_overrides(overrides: Any, source: str, groups: Sequence[str]) -> None:
    """Refuse saved command-line overrides that could reach past conf/ when composed: a
    hydra key (search path, launcher), a package or group path (`group@pkg=`, `a/b=`), a
    config group option that is not a plain name, an interpolation, a control character.
    What they compose to is checked by check_targets after."""
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise ConfigError(f"{source}: its saved overrides are not a list of strings. Refusing "
                          "the file.")
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        group_option = key in groups and not re.fullmatch(r"[\w\-\[\], ]*", value)
        if ("${" in item or key.startswith("hydra") or group_option or "@" in key or "/" in key
                or any(ord(char) < 32 for char in item)):
            raise ConfigError(f"{source}: its saved override {item!r} is not one a run of "
                              "this tool saves (hydra keys, package or group paths, "
                              "interpolations and control characters are refused). Refusing "
                              "the file.")
