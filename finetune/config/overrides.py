"""The command line's overrides, checked before Hydra composes them, so that every bad
override is one ConfigError (exit code 2, as the bad-input table says) and a key that does
not exist comes with the keys it may have meant, or the option of its group that has it
(`data.root` belongs to `data=imagefolder`).

The check composes the config once (~0.1 s, no torch); the slower diagnosis runs only when
that fails. A sweep's overrides are checked with their first value.
"""

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf

from finetune.config.schemas import CONFIG_GROUPS
from finetune.errors import ConfigError, closest

NOT_FOUND = object()


def check_command_line(argv: list[str], config_dir: str) -> None:
    """Raise a ConfigError for the first override that cannot compose."""
    args, _ = get_args_parser().parse_known_args(argv[1:])
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    if args.config_name or args.config_path or args.config_dir:
        return  # another primary config or search path: Hydra checks that one itself
    parser = OverridesParser.create()
    for override in args.overrides:  # one at a time, to name the one that does not parse
        try:
            parser.parse_overrides([override])
        except Exception as error:  # Hydra's grammar: its own words say where
            raise ConfigError(f"{override!r} does not parse: {one_paragraph(str(error))} Put "
                              "an override with brackets, quotes or spaces in single quotes "
                              "in the shell.") from None
    parsed = parser.parse_overrides(args.overrides)
    overrides = [line for line in map(as_composable, parsed) if line is not None]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            config = compose(config_name="config", overrides=overrides)
        except Exception as error:
            raise ConfigError(diagnose(parsed, error, config_dir)) from None
    for override in parsed:
        if override.type == OverrideType.DEL and not is_hydras(override):
            check_deletable(override, config)


def check_deletable(override: Override, config: DictConfig) -> None:
    """`~key` may drop an entry of a free-form section (`~logger.tensorboard`), not a
    setting of the schema, which every run reads (Hydra lets `~seed` through)."""
    parent = override.key_or_group.rpartition(".")[0]
    node = OmegaConf.select(config, parent) if parent else config
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) is not dict:
        key = override.key_or_group
        raise ConfigError(f"{override.input_line}: {key} is a setting every run reads; it "
                          f"cannot be deleted. Give it a value instead ({key}=...); "
                          "python train.py --cfg job shows its current one.")


def is_hydras(override: Override) -> bool:
    return override.key_or_group.startswith("hydra")


def is_group(override: Override) -> bool:
    return override.key_or_group.split("@")[0] in CONFIG_GROUPS


def as_composable(override: Override) -> str | None:
    """The override as one compose() takes: a sweep by its first value; Hydra's own keys
    (launcher, sweeper, run directory) are left to Hydra."""
    if is_hydras(override):
        return None
    if not override.is_sweep_override():
        return override.input_line
    try:
        return f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
    except Exception:  # interval(...) and other ranges a sweeper samples: Hydra checks them
        return None


def diagnose(parsed: list[Override], error: Exception, config_dir: str) -> str:
    """The message for a command line that did not compose: a missing key or group option
    named with what was probably meant, else Hydra's own words as one paragraph."""
    groups = [line for override in parsed if is_group(override)
              and (line := as_composable(override)) is not None]
    for override in parsed:
        if is_group(override) and as_composable(override) is not None:
            problem = missing_option(override, config_dir)
            if problem:
                return problem
    try:
        base = compose(config_name="config", overrides=groups, return_hydra_config=True)
    except Exception:
        return one_paragraph(str(error))
    for override in parsed:
        if (override.type in (OverrideType.CHANGE, OverrideType.DEL) and not is_group(override)
                and not is_hydras(override) and lookup(base, override.key_or_group) is NOT_FOUND):
            given = [line.key_or_group for line in parsed if not is_group(line)]
            return missing_key(override, base, groups, given, config_dir)
    return one_paragraph(str(error) + (f" {error.__cause__}" if error.__cause__ else ""))


def missing_option(override: Override, config_dir: str) -> str | None:
    group = override.key_or_group.split("@")[0]
    options = sorted(path.stem for path in (Path(config_dir) / group).glob("*.yaml"))
    value = as_composable(override).split("=", 1)[1]
    if value in options or value == "null" or (value.startswith("[") and value.endswith("]")):
        return None
    hint = " or ".join(f"{group}={option}" for option in closest(value, options))
    return (f"{group}={value} is not an option of the {group} group: use one of "
            f"{', '.join(options)}" + (f" (did you mean {hint}?)" if hint else "")
            + f". Each option is a file in conf/{group}/.")


def missing_key(override: Override, base: DictConfig, groups: list[str], given: list[str],
                config_dir: str) -> str:
    key = override.key_or_group
    chosen = OmegaConf.to_container(base.hydra.runtime.choices)  # group -> option in use
    group = key.split(".")[0]
    parts = [f"{override.input_line}: there is no key {key}"
             + (f" in {group}={chosen.get(group)}" if group in CONFIG_GROUPS else "") + "."]
    owners = owning_options(key, groups, given, chosen, config_dir)
    if owners:
        parts.append(f"It belongs to {' and '.join(f'{group}={o}' for o in owners)}: add "
                     f"{group}={owners[0]} before it.")
    # a section is a key only for a mapping (trainer.early_stopping={patience: 3})
    sections = override.type == OverrideType.CHANGE and isinstance(override.value(), dict)
    meant = closest(key, [name for name in every_key(OmegaConf.to_container(base), sections=sections)
                          if not name.startswith("hydra")])
    if meant and not owners:
        parts.append(f"Did you mean {', '.join(meant)}?")
    parts.append("python train.py --cfg job lists every key.")
    return " ".join(parts)


def owning_options(key: str, groups: list[str], given: list[str], chosen: dict[str, str],
                   config_dir: str) -> list[str]:
    """The other options of key's group that have it, the closest fit first: the one with the
    most of the group's keys given on the command line (data.root and data.file: data=csv),
    then the one with the fewest keys of its own (data.root alone: data=imagefolder; csv
    also needs data.file)."""
    group = key.split(".")[0]
    others = [line for line in groups if line.split("=")[0] != group]
    fits = []
    for option in other_options(group, chosen, config_dir):
        config = compose(config_name="config", overrides=[*others, f"{group}={option}"])
        if lookup(config, key) is not NOT_FOUND:
            held = sum(lookup(config, name) is not NOT_FOUND
                       for name in given if name.startswith(f"{group}."))
            fits.append((-held, len(every_key(OmegaConf.to_container(config[group]))), option))
    return [option for *_, option in sorted(fits)]


def other_options(group: str, chosen: dict[str, str], config_dir: str) -> list[str]:
    if group not in CONFIG_GROUPS:
        return []
    return sorted(path.stem for path in (Path(config_dir) / group).glob("*.yaml")
                  if path.stem != chosen.get(group))


def lookup(config: DictConfig, key: str) -> Any:
    return OmegaConf.select(config, key, default=NOT_FOUND, throw_on_resolution_failure=False)


def every_key(node: Any, prefix: str = "", sections: bool = False) -> list[str]:
    """Every dotted key of a config that takes a plain value (optimizer.lr, not optimizer);
    with `sections` its sections too, which take a mapping."""
    if not isinstance(node, dict):
        return []
    keys = []
    for name, value in node.items():
        if not (isinstance(value, dict) and value) or sections:  # {} takes entries: a key
            keys.append(f"{prefix}{name}")
        keys += every_key(value, f"{prefix}{name}.", sections)
    return keys


OMEGACONF_DETAILS = ("full_key:", "reference_type=", "object_type=")  # said once already


def one_paragraph(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines()
                    if line.strip() and not line.strip().startswith(OMEGACONF_DETAILS))
