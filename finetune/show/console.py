"""What the console shows before a run starts: the config groups chosen and the keys whose
values differ from those groups' defaults (set on the command line or by an experiment)."""

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.config.schemas import CONFIG_GROUPS, dotted_scalars

SEARCH_GROUPS = ("experiment", "hparams_search")  # presets: what they set is shown as changed


def app_choices(choices: dict[str, Any]) -> dict[str, Any]:
    """Hydra's runtime choices without its own groups (hydra/...) and unchosen ones, in the
    order of conf/config.yaml."""
    chosen = [group for group, option in choices.items()
              if not group.startswith("hydra") and option is not None]
    order = {group: index for index, group in enumerate(CONFIG_GROUPS)}
    return {group: choices[group] for group in sorted(chosen, key=lambda g: order.get(g, 99))}


def choice_overrides(choices: dict[str, Any]) -> list[str]:
    """The overrides that compose the same groups, presets left out: their defaults."""
    def text(option: Any) -> str:
        return f"[{','.join(option)}]" if isinstance(option, list | tuple) else str(option)

    return [f"{group}={text(option)}" for group, option in choices.items()
            if group not in SEARCH_GROUPS]


def shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def used_options(choices: dict[str, Any], config: DictConfig, defaults: DictConfig) -> dict[str, Any]:
    """The choices, a group's `name` shown instead of its option where the run changed it:
    backbone=resnet18 with backbone.name=timm/vit_small_patch16_224 builds the vit."""
    def used(group: str, option: Any) -> Any:
        name, default = (OmegaConf.select(c, f"{group}.name", default=None,
                                          throw_on_resolution_failure=False) for c in (config, defaults))
        return name if isinstance(name, str) and name != default else option

    return {group: used(group, option) for group, option in choices.items()}


def config_view(choices: dict[str, Any], config: DictConfig, defaults: DictConfig) -> str:
    """Two short parts: `group=option ...`, then `key: value (default: ...)` per change.
    Keys compare unresolved, so T_max: ${trainer.max_epochs} is no change of its own."""
    groups = "  ".join(f"{group}={option}"
                       for group, option in used_options(choices, config, defaults).items())
    current, default = (dotted_scalars(OmegaConf.to_container(c)) for c in (config, defaults))
    values, default_values = (dotted_scalars(OmegaConf.to_container(c, resolve=True))
                              for c in (config, defaults))
    changed = [f"  {key}: {shown(values[key])}" + (
        f"  (default: {shown(default_values[key])})" if key in default else "  (new)")
        for key, value in current.items() if default.get(key, object()) != value]
    return "\n".join([f"config: {groups}",
                      "changed from the defaults:" if changed else "all other keys at their defaults",
                      *changed])
