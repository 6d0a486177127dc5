"""The evaluation report: one row per model, one column per text (perplexity) and per skill (accuracy).

The same numbers go out three ways: a plain-text table for the terminal, Markdown for the model card, and
JSON for scripts. The JSON schema is read by other tools; keep it exactly:

    {"models": [{"name", "path", "role", "perplexity": {text: float}, "skills": {skill: float}}],
     "verdict": {"model", "status", "skills_lost": [str], "reasons": [str]} | null}

The best value of each column (lowest perplexity, highest accuracy; ties all marked) carries a `*`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mergesmith.eval.verdict import ModelScores, Verdict

BEST = "*"


@dataclass
class EvalReport:
    models: list[ModelScores] = field(default_factory=list)
    verdict: Verdict | None = None

    @property
    def texts(self) -> list[str]:
        return _union(m.perplexity for m in self.models)

    @property
    def skills(self) -> list[str]:
        return _union(m.skills for m in self.models)

    def to_dict(self) -> dict:
        return {
            "models": [
                {
                    "name": m.name,
                    "path": m.path,
                    "role": m.role,
                    "perplexity": {k: _json_number(v) for k, v in m.perplexity.items()},
                    "skills": {k: _json_number(v) for k, v in m.skills.items()},
                }
                for m in self.models
            ],
            "verdict": self.verdict.to_dict() if self.verdict is not None else None,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and cells (strings, best marked) shared by the text and Markdown renderings."""
        texts, skills = self.texts, self.skills
        header = ["model", "role"] + [f"ppl {t}" for t in texts] + list(skills)
        best_ppl = {t: _best([m.perplexity.get(t) for m in self.models], min) for t in texts}
        best_skill = {s: _best([m.skills.get(s) for m in self.models], max) for s in skills}
        cells = []
        for m in self.models:
            row = [m.name, m.role]
            row += [_cell(m.perplexity.get(t), best_ppl[t], "{:.3f}" if (m.perplexity.get(t) or 0) < 1e5 else "{:.3e}") for t in texts]
            row += [_cell(m.skills.get(s), best_skill[s], "{:.2f}") for s in skills]
            cells.append(row)
        return header, cells

    def render_text(self) -> str:
        header, cells = self.rows()
        widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in [header, *cells]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"({BEST} best in column)")
        lines += _verdict_lines(self.verdict)
        return "\n".join(lines)

    def render_markdown(self, heading: str | None = "## Evaluation") -> str:
        header, cells = self.rows()
        esc = [[c.replace("|", "\\|").replace("*", "\\*") if i < 2 else c for i, c in enumerate(r)] for r in [header, *cells]]
        lines = [heading, ""] if heading else []
        lines.append("| " + " | ".join(esc[0]) + " |")
        lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
        lines += ["", f"Perplexity: lower is better; skills: share of probes answered correctly. `{BEST}` marks the best in each column."]
        if self.verdict is not None:
            v = self.verdict
            lines += ["", f"**Verdict for {v.model}: {v.status}**"]
            lines += [f"- {r}" for r in v.reasons]
        return "\n".join(lines) + "\n"

    def write_markdown(self, path: str | Path) -> None:
        Path(path).write_text(self.render_markdown(), encoding="utf-8")


def _union(dicts) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        for k in d:
            seen[k] = None
    return list(seen)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _best(values, pick):
    finite = [v for v in values if _finite(v)]
    return pick(finite) if finite else None


def _cell(value, best, fmt: str) -> str:
    if value is None:
        return "-"
    if not _finite(value):
        return str(value)
    text = fmt.format(value)
    return text + BEST if best is not None and value == best else text


def _json_number(v: float) -> float | None:
    """JSON has no inf/NaN: an infinite or undefined perplexity is written as null."""
    return float(v) if _finite(v) else None


def _verdict_lines(verdict: Verdict | None) -> list[str]:
    if verdict is None:
        return []
    lines = ["", f"verdict for {verdict.model}: {verdict.status}"]
    lines += [f"  - {r}" for r in verdict.reasons]
    return lines
