"""The one exception type users see: a bad config or input, reported without a traceback."""

import difflib
from collections.abc import Iterable


class ConfigError(Exception):
    """A problem the user can fix by changing the config, a file or a path.

    `train.py` prints the message as one paragraph and exits non-zero, before anything in
    the run directory is written.
    """


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The choices that look most like `word`, best first (for "did you mean" hints)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    matches = closest(word, choices)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


class TrainingFailed(Exception):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, once the run has said where it stopped and how to go on."""
