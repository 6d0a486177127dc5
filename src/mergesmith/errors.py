"""User-facing errors.

Anything derived from `MergesmithError` is a mistake in the user's input (config, models, options), not a
bug: the CLI prints its message as one line per problem and exits with `exit_code`, without a traceback.
Everything else that escapes is a bug and may show a traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence

# Not an error: the exit code of `mergesmith eval` / `merge --eval` when the verdict is "failed merge", so that
# scripts can gate on it. A normal return value of the command, never raised.
EXIT_FAILED_MERGE = 3


class MergesmithError(Exception):
    """Base of every error that the CLI reports as plain lines."""

    exit_code = 2

    def __init__(self, message: str | Sequence[str]):
        if isinstance(message, str):
            self.problems = [message]
        else:
            self.problems = list(message)
        super().__init__("\n".join(self.problems))


class ConfigError(MergesmithError):
    """The YAML is malformed, names something unknown, or is missing something required."""


class InputError(MergesmithError):
    """A model reference cannot be resolved or its files cannot be read."""


class CompatibilityError(MergesmithError):
    """The models cannot be merged as the config asks (shapes, layers, missing tensors)."""


class NotYetSupportedError(MergesmithError):
    """Valid mergekit input that mergesmith does not handle yet; says so instead of guessing."""


class OutputError(MergesmithError):
    """The output folder cannot be written as asked."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "" when nothing is close."""
    choices = list(choices)
    key = _fold(word)
    for choice in choices:
        if _fold(choice) == key and choice != word:
            return f"; did you mean '{choice}'?"
    scored = [(_edit_distance(key, _fold(c)), i, c) for i, c in enumerate(choices)]
    if scored:
        distance, _, best = min(scored)
        if distance <= max(1, len(word) // 3):
            return f"; did you mean '{best}'?"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return f"; did you mean '{close[0]}'?" if close else ""


def _fold(word: str) -> str:
    return word.replace("-", "_").replace(" ", "_").lower()


def _edit_distance(a: str, b: str) -> int:
    """Edit distance counting a swap of neighbouring letters as one edit (typos like 'modles')."""
    rows = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        rows[i][0] = i
    for j in range(len(b) + 1):
        rows[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[-1][-1]
