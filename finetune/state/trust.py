"""What a file may make the tool build: the rule that keeps a file from choosing code to run.

A config the user writes (conf/ files, the command line) may name any class in `_target_`.
A config read from a file (a checkpoint's saved config and overrides, used by load_model,
mode=evaluate|predict and resume=) is data: its `_target_`s may name only the classes this
tool builds there by design, checked by name before anything is imported:

  head.layers[i]._target_   torch.nn layers (torch.nn.*, subclasses of torch.nn.Module)
  optimizer._target_        torch.optim optimizers (torch.optim.*)
  scheduler._target_        torch.optim.lr_scheduler schedules
  logger.<name>._target_    this tool's loggers (TensorBoard, MLflow, W&B)

Anything else, and a `_target_` anywhere else, is refused with the key and the class named,
unless the user's own command line trusts it: `trust=[mypkg.MyLayer]` (one class),
`trust=[mypkg.*]` (a package), `trust=['*']` (any class: for files you made yourself). A
file's own `trust` is never read. Interpolations (`${...}`) in a file are refused too: they
would read environment variables or call resolvers when the config is resolved; so are
Hydra's other instantiate keys (`_partial_`, `_args_`, ...).

`config_from_file` is the one door for a file's config: every check above on what the
config will be when used (with the command line's settings, before anything resolves),
then this version's schema, value checks and the bounds a file may ask for. Classes are
imported only through `load_class`, which applies the same rule at the point of use.
"""

import importlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.config.schemas import (
    AdamWConfig,
    Config,
    CosineSchedulerConfig,
    OptimizerConfig,
    SchedulerConfig,
    SGDConfig,
    StepSchedulerConfig,
    data_schema,
    dotted_scalars,
)
from finetune.config.validation import validate
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
     ("finetune.loggers.TensorBoardLogger", "finetune.loggers.MLflowLogger",
      "finetune.loggers.WandbLogger")),  # the loggers it ships: add new ones here
)
INSTANTIATE_KEYS = re.compile(r"_\w+_")  # Hydra's _target_, _partial_, _args_, _recursive_, ...
# What a file's config may ask for: the loader's batch and processes, the image size (each
# costs memory in proportion); the user's own config is not bounded
FILE_LIMITS = {"data.batch_size": 65536, "data.num_workers": 32, "data.image_size": 4096,
               "data.max_image_pixels": 89_478_485}  # PIL's own: a file may not raise it


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
            if isinstance(base, tuple):  # these classes exactly
                return path in base, what
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
    """A saved config is resolved before it is saved: an interpolation in it (escaped or
    not) is a crafted file's, which would read the environment or call resolvers when
    resolved. Keys count too: OmegaConf resolves neither, but nothing here needs one."""
    for key, value in strings(config):
        if "${" in value:
            raise ConfigError(f"{source}: its saved config has an interpolation at {key} "
                              f"({value!r}); this tool never saves one, and a file may not make "
                              "it read the environment or call resolvers. Refusing the file.")


def refuse_instantiate_keys(config: Any, source: str) -> None:
    """`_partial_`, `_args_`, `_recursive_`, `_convert_` change what Hydra's instantiate
    builds from a `_target_`: a run saves none of them."""
    for key, _ in strings(config):
        name = re.split(r"[.\[]", key)[-1]
        if INSTANTIATE_KEYS.fullmatch(name) and name != "_target_":
            raise ConfigError(f"{source}: its saved config sets {key}, a key of Hydra's "
                              "instantiate that this tool never saves; a file may not change "
                              "how a class is built. Refusing the file.")


def check_targets(config: dict, source: str, trust: Sequence[str] = (),
                  sections: Sequence[str] | None = None, prefix: str = "") -> None:
    """Refuse a config from a file whose `_target_`s (in the top-level `sections`, or
    anywhere) name other classes than this tool builds there, unless `trust` allows them.
    `prefix`: where `config` sits in the whole config."""
    for key, path in targets(config, prefix):
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


def in_list(key: str, name: str) -> bool:
    """`key` is a setting inside the list saved at `name` (head.layers.0.out_features under
    head.layers, which dotted_scalars keeps whole); never an instantiate key (`_target_`)."""
    return re.fullmatch(rf"{re.escape(name)}\.\d+(\.[A-Za-z]\w*)*", key) is not None


def check_file_overrides(overrides: Any, source: str, groups: Sequence[str], saved: dict) -> None:
    """Refuse saved command-line overrides that are not what a run saves: a hydra key
    (search path, launcher), a package or group path (`group@pkg=`, `a/b=`), a config group
    option that is not a plain name, an interpolation, an escape (Hydra's grammar turns
    `$\\{` into `${`), a control character, a key the saved config does not have. Nothing
    composes them (a resume runs the saved config); they are shown and saved again, so
    they must describe the run."""
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise ConfigError(f"{source}: its saved overrides are not a list of strings. Refusing "
                          "the file.")
    flat = dotted_scalars(saved)  # plain data: nothing resolves; lists kept whole, as JSON
    keys = list(flat)
    lists = [name for name, value in flat.items() if isinstance(value, str) and value.startswith("[")]
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        group_option = key in groups and not re.fullmatch(r"[\w\-\[\], ]*", value)
        known = (key in groups or item.startswith("~")
                 or any(name == key or name.startswith((key + ".", key + "[")) for name in keys)
                 or any(in_list(key, name) for name in lists))
        if ("${" in item or "\\" in item or key.startswith("hydra") or group_option or "@" in key
                or "/" in key or not known or any(ord(char) < 32 for char in item)):
            raise ConfigError(f"{source}: its saved override {item!r} is not one a run of "
                              "this tool saves (hydra keys, package or group paths, keys its "
                              "saved config lacks, interpolations, escapes and control "
                              "characters are refused). Refusing the file.")


def load_class(key: str, path: Any, trust: Sequence[str] | None, source: str = "config") -> type:
    """The one way a class named in a config is imported. `trust` None: the user's own
    config, which may name any class; otherwise the config came from `source`, a file, and
    `path` must pass check_targets' rule at `key` with that trust list."""
    if trust is not None:
        check_targets({"_target_": path}, source, trust, prefix=key.removesuffix("._target_"))
    from hydra.utils import get_class

    return get_class(path)


def config_from_file(saved: dict, source: str, trust: Sequence[str],
                     settings: dict[str, Any] | None = None) -> DictConfig:
    """A file's saved config (plain data, checked by check_plain) as the config a run
    uses, with the user's `settings` (dotted keys: this command line's) on top; checked as
    a whole, unresolved, before anything resolves: no interpolation, no instantiate key,
    only the classes the rule allows; then typed by this version's schema (which fills the
    keys later versions added with their defaults), validated, and bounded (FILE_LIMITS)."""
    refuse_interpolations(saved, source)
    try:
        merged = OmegaConf.create(saved)
        for key, value in (settings or {}).items():
            OmegaConf.update(merged, key, value, merge=False, force_add=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: its saved config does not fit this version's schema "
                          f"({describe(error)}); the file is damaged or not this tool's.") from None
    merged = OmegaConf.to_container(merged)
    refuse_interpolations(merged, source)  # what the settings made too
    refuse_instantiate_keys(merged, source)
    check_targets(merged, source, trust)
    config = typed(merged, source)
    try:
        validate(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: its saved config is not valid here: {error}") from None
    check_limits(config, source)
    return config


OPTIMIZER_SCHEMAS = {"torch.optim.SGD": SGDConfig, "torch.optim.AdamW": AdamWConfig}
SCHEDULER_SCHEMAS = {"torch.optim.lr_scheduler.CosineAnnealingLR": CosineSchedulerConfig,
                     "torch.optim.lr_scheduler.StepLR": StepSchedulerConfig}


def typed(config: dict, source: str) -> DictConfig:
    """`config` checked against the schemas a composed config has (Config, the data
    option's, the optimizer's and scheduler's where they are this tool's own; another
    optimizer or scheduler keeps its extra keys): a missing section, a wrong type or an
    unknown key is a ConfigError naming it."""
    data = config.get("data")
    try:
        schema = OmegaConf.structured(Config)
        schema.data = OmegaConf.structured(data_schema(data.get("name") if isinstance(data, dict)
                                                       else None))
        for key, known, base in (("optimizer", OPTIMIZER_SCHEMAS, OptimizerConfig),
                                 ("scheduler", SCHEDULER_SCHEMAS, SchedulerConfig)):
            section = config.get(key)
            target = section.get("_target_") if isinstance(section, dict) else None
            schema[key] = OmegaConf.structured(known.get(target, base))
            OmegaConf.set_struct(schema[key], target in known)
        result = OmegaConf.merge(schema, config)
    except (OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"{source}: its saved config does not fit this version's schema "
                          f"({describe(error)}); the file is damaged or not this tool's.") from None
    missing = sorted(OmegaConf.missing_keys(result))
    if missing:
        raise ConfigError(f"{source}: its saved config has no {', '.join(missing)}; the file "
                          "is damaged or not this tool's.")
    return result


def describe(error: Exception) -> str:
    """An OmegaConf error in one line: its message and the full key, without its
    multi-line object dump."""
    message = str(getattr(error, "msg", error)).splitlines()[0]
    key = getattr(error, "full_key", None)
    return f"{key}: {message}" if key else message


def check_limits(config: DictConfig, source: str) -> None:
    for key, limit in FILE_LIMITS.items():
        value = OmegaConf.select(config, key)
        if isinstance(value, int) and value > limit:
            raise ConfigError(f"{source}: its saved config asks for {key}={value}, more than a "
                              f"file may ask for ({limit}: each costs memory). If this is your "
                              f"own run, start it again with {key}={value} on your command line.")
