"""The search space: hparams_search.params in Hydra's sweep syntax (`interval(a, b)`,
`tag(log, interval(a, b))`, `choice(x, y, ...)`, `range(a, b, step)`) -> Optuna's
distributions, and a trial's values -> command-line overrides."""

from typing import Any

from finetune.errors import ConfigError

VALID = "interval(a, b), tag(log, interval(a, b)), choice(x, y, ...) or range(a, b[, step])"


def distribution(key: str, text: str):
    """One key's Optuna distribution, parsed with Hydra's own override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    try:
        value = OverridesParser.create().parse_override(f"{key}={text}").value()
    except Exception as error:  # Hydra's grammar errors come in several types
        raise ConfigError(f"hparams_search.params.{key}={text!r} is not valid: use {VALID} "
                          f"({error}).") from error
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    if isinstance(value, RangeSweep):
        return CategoricalDistribution(list(value.range()))
    if isinstance(value, ChoiceSweep) and value.list:
        return CategoricalDistribution([choice_value(item) for item in value.list])
    raise ConfigError(f"hparams_search.params.{key}={text!r} is not valid: use {VALID}.")


def choice_value(item: Any) -> Any:
    """A choice as Optuna stores it: a number, a bool, None or text (a list as its text)."""
    if item is None or isinstance(item, bool | int | float | str):
        return item
    return str(item).replace(" ", "").replace("'", "")


def distributions(params: dict[str, str]) -> dict[str, Any]:
    if not params:
        raise ConfigError("hparams_search.params is empty: name at least one key to search, "
                          "e.g. hparams_search.params.optimizer.lr='tag(log, interval(1e-4, 1e-1))'.")
    return {key: distribution(key, str(text)) for key, text in params.items()}


def contains(distribution: Any, value: Any) -> bool:
    """Whether `value` is one the distribution can give (a stored trial's value, checked)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return any(type(value) is type(choice) and value == choice for choice in distribution.choices)
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and distribution.low <= value <= distribution.high)


def as_overrides(values: dict[str, Any]) -> list[str]:
    """A trial's values as `key=value` overrides (None as null, lists as Hydra lists)."""
    return [f"{key}={'null' if value is None else value}" for key, value in values.items()]
