"""The verdict on a merge: a pure function of the measured numbers, so the rules can be tested on their own.

Rules (per held-out text, against the best source model on that text):
* merged perplexity > 2 x best source, or not finite            -> "failed merge" (the CLI exits with 3)
* merged perplexity > 1.10 x best source                         -> "degraded"
* a skill where the merged model scores below the base model     -> listed in `skills_lost`, and "degraded"
Otherwise "ok". Every rule that fires adds a one-line reason. Perplexities are only compared where the
source's own number is finite; a skill is only compared where the base was probed on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

OK, DEGRADED, FAILED = "ok", "degraded", "failed merge"
DEGRADED_RATIO = 1.10
FAILED_RATIO = 2.0


@dataclass
class ModelScores:
    """What was measured for one model; `role` is "source", "base" or "merged"."""

    name: str
    path: str
    role: str
    perplexity: dict[str, float] = field(default_factory=dict)
    skills: dict[str, float] = field(default_factory=dict)


@dataclass
class Verdict:
    model: str
    status: str
    skills_lost: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def judge(
    merged: ModelScores,
    sources: Sequence[ModelScores],
    base: ModelScores | None = None,
    *,
    degraded_ratio: float = DEGRADED_RATIO,
    failed_ratio: float = FAILED_RATIO,
) -> Verdict:
    """Apply the rules above to the merged model's numbers."""
    reasons: list[str] = []
    status = OK

    def worsen(to: str) -> None:
        nonlocal status
        order = (OK, DEGRADED, FAILED)
        if order.index(to) > order.index(status):
            status = to

    for text, value in merged.perplexity.items():
        best = _best_source(sources, text)
        if not _finite(value):
            worsen(FAILED)
            reasons.append(f"perplexity on '{text}' is {value} (not finite)")
            continue
        if best is None:
            continue
        best_name, best_value = best
        ratio = value / best_value if best_value > 0 else math.inf
        times = f"{ratio:.2f}x" if ratio < 1000 else f"{ratio:.3g}x"
        if ratio > failed_ratio:
            worsen(FAILED)
            reasons.append(f"perplexity on '{text}' is {value:.4g}, {times} the best source ({best_name}: {best_value:.4g}; failed above {failed_ratio:g}x)")
        elif ratio > degraded_ratio:
            worsen(DEGRADED)
            reasons.append(f"perplexity on '{text}' is {value:.4g}, {times} the best source ({best_name}: {best_value:.4g}; degraded above {degraded_ratio:g}x)")

    lost: list[str] = []
    if base is not None:
        for skill, value in merged.skills.items():
            if skill in base.skills and value < base.skills[skill]:
                lost.append(skill)
                reasons.append(f"skill '{skill}' lost: {value:.2f} < base {base.skills[skill]:.2f}")
    if lost:
        worsen(DEGRADED)
    return Verdict(merged.name, status, lost, reasons)


def _best_source(sources: Sequence[ModelScores], text: str) -> tuple[str, float] | None:
    values = [(s.perplexity[text], i, s.name) for i, s in enumerate(sources) if _finite(s.perplexity.get(text))]
    if not values:
        return None
    value, _, name = min(values)
    return name, value


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)

