"""Analyze a model family before merging: task-vector statistics per layer and overall, and a recommended merge.

`analyze(config)` or `analyze(models=[...], base=...)` streams the fine-tunes' task vectors (fine-tune − base)
tensor by tensor (stream.py), sums additive statistics (stats.py) and picks a method with its reasons
(recommend.py). The result is a JSON-ready dict; `emit_config` turns its recommendation into a config that
`mergesmith merge` accepts. See docs/analyze.md.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from mergesmith.analyze.recommend import Recommendation, recommend, recommended_config
from mergesmith.analyze.stats import RANK_ROWS
from mergesmith.analyze.stream import Family, family_from_config, family_from_paths, inventory, model_reference, stream_statistics
from mergesmith.config.loader import ConfigLike
from mergesmith.errors import ConfigError

FORMAT = "mergesmith-analysis/1"

__all__ = ["analyze", "analyze_family", "emit_config", "Recommendation", "recommend", "FORMAT"]


def analyze(
    config: ConfigLike | None = None,
    *,
    models: Sequence[str] | None = None,
    base: str | None = None,
    top_k: float = 0.1,
    rank: bool = True,
    rank_rows: int = RANK_ROWS,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Analyse the models of a merge config, or `models` against `base` (folders or cached hub ids)."""
    if config is not None and (models or base):
        raise ConfigError("analyze: give either a config or --models/--base, not both")
    family = family_from_config(config) if config is not None else family_from_paths(list(models or []), base)
    return analyze_family(family, top_k=top_k, rank=rank, rank_rows=rank_rows, on_progress=on_progress)


def analyze_family(
    family: Family,
    *,
    top_k: float = 0.1,
    rank: bool = True,
    rank_rows: int = RANK_ROWS,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    if family.base is None and len(family.models) < 2:
        raise ConfigError("analyze: without a base model, name at least two models (or give --base)")
    if not family.models:
        raise ConfigError("analyze: name at least one fine-tuned model besides the base")
    labels, groups, total, notes = stream_statistics(family, top_k=top_k, rank=rank, rank_rows=rank_rows, on_progress=on_progress)
    result: dict[str, Any] = {
        "format": FORMAT,
        "config": family.config_label,
        "top_k": top_k,
        "reference": "base" if family.base is not None else "mean",
        "base": inventory(family.base, "base") if family.base is not None else None,
        "models": [inventory(m, "source") for m in family.models],
        "references": {
            "base": model_reference(family.base) if family.base is not None else None,
            "models": [model_reference(m) for m in family.models],
        },
        "layers": [dict(name=label, **groups[label].summary(top_k)) for label in labels if groups[label].tensors],
        "overall": total.summary(top_k),
        "notes": notes,
    }
    result["recommendation"] = recommend(result).to_dict()
    return result


def emit_config(analysis: dict[str, Any]) -> dict[str, Any]:
    """The recommended merge as a config dict (write it with yaml.safe_dump)."""
    r = analysis["recommendation"]
    rec = Recommendation(r["method"], r["rule"], r["parameters"], r["model_parameters"], r["rationale"], r["notes"])
    refs = analysis["references"]
    dtype = (analysis["base"] or analysis["models"][0]).get("dtype")
    return recommended_config(rec, refs["base"], refs["models"], dtype if dtype in ("float32", "float16", "bfloat16") else None)
