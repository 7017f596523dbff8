"""The pattern language of `freeze`, `unfreeze` and `param_groups`, over parameter names.

  pretrained.features   a dotted name: matches when its components appear in a parameter's
                        name in a row (the seed's `'pretrained' in name.split('.')`)
  pretrained.layer[12].*  a glob (has * ? or [) over the full name
  re:<expr>             a regular expression searched in the full name
  @stage2               a stage alias (finetune/model/stages.py), the same across families
  !<pattern>            in freeze lists: makes trainable again what earlier patterns froze
"""

import fnmatch
import re
from collections.abc import Callable, Sequence

from finetune.errors import ConfigError, closest
from finetune.model.stages import Aliases


def under_any(paths: Sequence[str]) -> Callable[[str], bool]:
    return lambda name: any(name == path or name.startswith(path + ".") for path in paths)


def matcher(pattern: str, aliases: Aliases, key: str) -> Callable[[str], bool]:
    """A predicate over parameter names for one pattern (without a leading '!')."""
    if not pattern:
        raise ConfigError(f"{key} is an empty pattern.")
    if pattern.startswith("@"):
        return under_any(aliases.lookup(pattern))
    if pattern.startswith("re:"):
        try:
            expression = re.compile(pattern[3:])
        except re.error as error:
            raise ConfigError(f"{key}={pattern!r} is not a valid regular expression: "
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


def no_match_error(pattern: str, names: Sequence[str], aliases: Aliases, key: str) -> ConfigError:
    body = pattern.removeprefix("!")
    if body.startswith("@"):
        hint = (f" It stands for {', '.join(aliases.lookup(body))}, which holds no parameters"
                + (" (the backbone's classifier is replaced by an identity unless "
                   "backbone.keep_classifier=true)." if body == "@classifier" else "."))
    else:
        hints = closest(body.removeprefix("re:"), sorted(module_names(names)) + list(names), n=5)
        hint = f" Closest names: {', '.join(hints)}." if hints else f" The first name is {names[0]}."
    return ConfigError(f"{key}={pattern!r} matches no parameter.{hint} To list every parameter "
                       "name and alias: python train.py dry_run=true 'freeze=[]' (plus your "
                       "backbone overrides).")


def matching(names: Sequence[str], pattern: str, aliases: Aliases, key: str) -> list[str]:
    """The names `pattern` matches; an error naming `key` if there are none."""
    predicate = matcher(pattern, aliases, key)
    hits = [name for name in names if predicate(name)]
    if not hits:
        raise no_match_error(pattern, names, aliases, key)
    return hits
