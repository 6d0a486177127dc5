"""Pick a merge method and its parameters from the measured task-vector statistics, with the reasons.

The rules, their thresholds and the papers behind them are documented in docs/analyze.md; they read only the
analysis dictionary (`overall` sums of the whole model), so they can be tested on constructed numbers.
First matching rule wins:

  no base            → linear (soup) if averaging keeps ≥ 99 % of the weights' norm, else karcher
  one fine-tune      → slerp from the base, t = 0.5
  interference ≥ 0.1 → dare_ties if the deltas are small (‖δ‖/‖θ_base‖ ≤ 0.05), else ties; density = mass fraction
  mean cosine ≥ 0.5  → model_stock
  |cosine| < 0.2 and mass fraction ≤ 0.25 → ties, density = mass fraction (sparse, near-orthogonal)
  two fine-tunes     → nuslerp of the task vectors, equal weights
  otherwise          → task_arithmetic, λ = 1 / (1 + (n − 1)·max(cosine, 0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

INTERFERENCE_HIGH = 0.10
ALIGNED_COSINE = 0.5
ORTHOGONAL_COSINE = 0.2
SPARSE_MASS = 0.25
DARE_RELATIVE_NORM = 0.05
SOUP_NORM_RETAINED = 0.99
EMBEDDING_HEAVY = 0.5
LOW_RANK = 0.1


@dataclass
class Recommendation:
    method: str
    rule: str
    parameters: dict[str, Any] = field(default_factory=dict)  # global
    model_parameters: list[dict[str, Any]] = field(default_factory=list)  # one per fine-tune, in order
    rationale: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rule": self.rule, "parameters": self.parameters,
                "model_parameters": self.model_parameters, "rationale": self.rationale, "notes": self.notes}  # fmt: skip


def mean_pairwise(matrix: list[list[float | None]]) -> float | None:
    values = [matrix[i][j] for i in range(len(matrix)) for j in range(i + 1, len(matrix)) if matrix[i][j] is not None]
    return sum(values) / len(values) if values else None


def density_for(mass: float | None) -> float:
    """The mass fraction rounded up to 0.01, within [0.01, 1]."""
    if mass is None:
        return 1.0
    return min(1.0, max(0.01, math.ceil(mass * 100 - 1e-9) / 100))


def recommend(analysis: dict[str, Any]) -> Recommendation:
    overall = analysis["overall"]
    names = [m["name"] for m in analysis["models"]]
    n = len(names)
    top_k = analysis.get("top_k", 0.1)
    if analysis.get("base") is None:
        return _without_base(overall, n)
    if n == 1:
        return Recommendation(
            "slerp", "single", {"t": 0.5}, [{}],
            ["one fine-tune and its base: a merge can only move along the line between them; slerp t = 0.5 keeps half "
             "of the fine-tune's change (weight-space ensembling of a fine-tune with its base, WiSE-FT, trades a little "
             "in-task accuracy for robustness). Raise t toward 1 to keep more of the fine-tune."],
        )  # fmt: skip

    cos = mean_pairwise(overall["cosine"]) or 0.0
    interference = overall["interference"] or 0.0
    conflict = overall["conflict_rate"]
    masses = overall["mass_fraction"]
    mass = sum(masses) / n
    rel = [r for r in overall["relative_norm"] if r is not None]
    rel_norm = sum(rel) / len(rel) if rel else float("inf")
    densities = [{"weight": 1.0, "density": density_for(m)} for m in masses]
    measured = (f"mean pairwise cosine of the task vectors {cos:.3f}; interference {interference:.3f} (share of the "
                f"union of the top-{top_k:g} entries where models disagree in sign"
                + (f"; {conflict:.3f} of overlapping entries conflict" if conflict is not None else "")
                + f"); 90 % of each task vector's squared mass sits in {', '.join(f'{m:.3f}' for m in masses)} of its entries")  # fmt: skip
    rec: Recommendation
    if interference >= INTERFERENCE_HIGH:
        if rel_norm <= DARE_RELATIVE_NORM:
            rec = Recommendation("dare_ties", "interference-small-deltas", {"normalize": True}, densities, [
                f"interference {interference:.3f} ≥ {INTERFERENCE_HIGH}: the models' largest changes overlap with opposite signs, "
                "which plain addition cancels; TIES elects a sign per entry and averages only the agreeing models (TIES, arXiv 2306.01708).",
                f"the deltas are small (mean ‖δ‖/‖θ_base‖ = {rel_norm:.4f} ≤ {DARE_RELATIVE_NORM}), the regime where DARE's random "
                "drop-and-rescale preserves the fine-tunes' abilities (DARE, arXiv 2311.03099), so dare_ties.",
                "density per model = its measured mass fraction: the entries that carry 90 % of its squared L2 mass.",
            ])  # fmt: skip
        else:
            rec = Recommendation("ties", "interference", {"normalize": True}, densities, [
                f"interference {interference:.3f} ≥ {INTERFERENCE_HIGH}: the models' largest changes overlap with opposite signs, "
                "which plain addition cancels; TIES trims each task vector to its largest entries, elects a sign per entry and "
                "averages only the agreeing models (TIES, arXiv 2306.01708).",
                f"the deltas are not small (mean ‖δ‖/‖θ_base‖ = {rel_norm:.4f} > {DARE_RELATIVE_NORM}); DARE's random drop is "
                "reported to fail for large deltas (arXiv 2311.03099), so magnitude trimming (ties) rather than dare_ties.",
                "density per model = its measured mass fraction: the entries that carry 90 % of its squared L2 mass.",
            ])  # fmt: skip
    elif cos >= ALIGNED_COSINE:
        rec = Recommendation("model_stock", "aligned", {}, [{} for _ in names], [
            f"the task vectors point the same way (mean cosine {cos:.3f} ≥ {ALIGNED_COSINE}): the fine-tunes learned much the "
            "same thing, as fine-tunes of one task with different seeds do. Averaging them (model soups, arXiv 2203.05482) "
            "removes their independent noise; Model Stock (arXiv 2403.19522) additionally uses the measured angle between "
            "them to choose how far to move from the base toward that average.",
        ])  # fmt: skip
    elif abs(cos) < ORTHOGONAL_COSINE and mass <= SPARSE_MASS:
        rec = Recommendation("ties", "orthogonal-sparse", {"normalize": True}, densities, [
            f"the task vectors are nearly orthogonal (mean cosine {cos:.3f}, |cos| < {ORTHOGONAL_COSINE}) and sparse "
            f"(mean mass fraction {mass:.3f} ≤ {SPARSE_MASS}): they change different entries, so adding them loses little "
            "(task arithmetic, arXiv 2212.04089).",
            "ties with density = each model's mass fraction keeps the entries that carry 90 % of each task vector and drops "
            "the small remainder that would only add noise; on disjoint supports its disjoint mean equals the plain sum "
            "(TIES, arXiv 2306.01708).",
        ])  # fmt: skip
    elif n == 2:
        rec = Recommendation("nuslerp", "two-models", {}, [{"weight": 1.0}, {"weight": 1.0}], [
            f"two fine-tunes of one base with little interference (interference {interference:.3f} < {INTERFERENCE_HIGH}) "
            f"and neither aligned nor sparse-orthogonal (mean cosine {cos:.3f}, mean mass fraction {mass:.3f}): "
            "spherical interpolation of the two task vectors (nuslerp with base_model, equal weights) keeps the "
            "merged task vector's norm where a linear average of vectors at an angle shrinks it "
            f"(here the average keeps {_pct(overall.get('task_vector_average_retained'))} of the mean norm); this is the "
            "common practice for two models of one base.",
        ])  # fmt: skip
    else:
        lam = round(1.0 / (1.0 + (n - 1) * max(cos, 0.0)), 2)
        rec = Recommendation("task_arithmetic", "orthogonal-dense", {"lambda": lam}, [{"weight": 1.0} for _ in names], [
            f"{n} task vectors with little interference (interference {interference:.3f} < {INTERFERENCE_HIGH}) and "
            f"mean cosine {cos:.3f}: adding them keeps each task's change (task arithmetic, arXiv 2212.04089).",
            f"λ = 1 / (1 + (n − 1)·max(cos, 0)) = {lam}: for task vectors of equal norm with pairwise cosine c, the sum's "
            "component along each task vector is (1 + (n − 1)c) times that vector, so this λ gives each task back at full "
            "strength; tune λ on held-out data if you can.",
        ])  # fmt: skip
    rec.rationale.insert(0, "measured: " + measured + ".")
    rec.notes.extend(_notes(analysis))
    return rec


def _without_base(overall: dict[str, Any], n: int) -> Recommendation:
    retained = overall.get("average_norm_retained") or 0.0
    if retained >= SOUP_NORM_RETAINED:
        return Recommendation("linear", "no-base-close", {"normalize": True}, [{"weight": 1.0} for _ in range(n)], [
            "no base model, so there are no task vectors; the statistics describe each model's deviation from the models' mean.",
            f"the models are close: their average keeps {_pct(retained)} of their mean weight norm (≥ {_pct(SOUP_NORM_RETAINED)}), "
            "the regime where a uniform average (a model soup, arXiv 2203.05482) works: fine-tunes that share an "
            "initialization and lie in one basin. Model Stock would need a base_model.",
        ])  # fmt: skip
    return Recommendation("karcher", "no-base-apart", {}, [{} for _ in range(n)], [
        "no base model, so there are no task vectors; the statistics describe each model's deviation from the models' mean.",
        f"the models point in different directions: their linear average keeps only {_pct(retained)} of their mean weight "
        f"norm (< {_pct(SOUP_NORM_RETAINED)}), so averaging would shrink the weights; the Karcher (Riemannian) mean "
        "averages directions on the sphere and restores the mean norm (for two models it is slerp at t = 0.5). "
        "Model Stock would need a base_model.",
    ])  # fmt: skip


def _notes(analysis: dict[str, Any]) -> list[str]:
    overall = analysis["overall"]
    names = [m["name"] for m in analysis["models"]]
    notes = []
    for name, frac in zip(names, overall["embedding_fraction"]):
        if frac is not None and frac > EMBEDDING_HEAVY:
            notes.append(f"'{name}': {_pct(frac)} of its change is in the embeddings/head (new or retrained tokens?); "
                         "consider excluding them with a filter or taking them from one model.")  # fmt: skip
    for name, r in zip(names, overall["normalized_effective_rank"]):
        if r is not None and r < LOW_RANK:
            notes.append(f"'{name}': its 2-D deltas are low-rank (effective rank {_pct(r)} of full; LoRA-like); "
                         "each change lives in a few directions per matrix, which sparse-looking statistics can understate.")  # fmt: skip
    return notes


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def recommended_config(rec: Recommendation, base_ref: str | None, model_refs: list[str], dtype: str | None) -> dict[str, Any]:
    """A mergekit-style config dict for the recommendation, which `mergesmith merge` accepts."""
    config: dict[str, Any] = {"merge_method": rec.method}
    if base_ref is not None and rec.method not in ("linear", "karcher"):
        config["base_model"] = base_ref
    models = []
    if rec.method == "slerp":
        models.append({"model": base_ref})
    for ref, params in zip(model_refs, rec.model_parameters):
        entry: dict[str, Any] = {"model": ref}
        if params:
            entry["parameters"] = dict(params)
        models.append(entry)
    config["models"] = models
    if rec.parameters:
        config["parameters"] = dict(rec.parameters)
    if dtype:
        config["dtype"] = dtype
    return config
