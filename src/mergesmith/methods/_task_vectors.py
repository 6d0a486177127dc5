"""The shared pipeline of the task-vector family (TIES, DARE, Breadcrumbs, DELLA and their linear variants).

    δᵢ = modelᵢ − base                          task vectors
    δᵢ ← sparsify(δᵢ, densityᵢ, ...)            optional: magnitude / random / outliers / DELLA (+ L1 rescale)
    δᵢ ← wᵢ · δᵢ                                 weights
    with consensus:  keep entries whose sign matches the elected sign (sum or count), divisor = Σ agreeing wᵢ
    without:         divisor = Σ wᵢ
    out = base + λ · Σ δᵢ / (divisor if normalize)

Divisors: with consensus an entry no model agrees on has divisor 0, treated as 1; without consensus a weight
sum with |Σ w| < 1e-8 is treated as 1. Both as in mergekit's generalized task arithmetic.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from mergesmith.methods import _sparsify
from mergesmith.methods._consensus import CONSENSUS_METHODS, disjoint_merge, elect_sign
from mergesmith.methods.registry import Param
from mergesmith.methods.task_arithmetic import combine_task_vectors

DENSITY = Param("density", float, default=1.0, per_model=True, doc="Fraction of this model's task vector to keep.")
GAMMA = Param(
    "gamma", float, default=0.01, per_model=True,
    doc="Fraction of largest-magnitude entries dropped as outliers (Breadcrumbs).",
)
EPSILON = Param(
    "epsilon", float, default=0.15, per_model=True,
    doc="Half-width of DELLA's keep probabilities: density ± epsilon from smallest to largest magnitude in a row.",
)
CONSENSUS = Param(
    "consensus_method", str, default="sum", choices=CONSENSUS_METHODS,
    doc="How the majority sign is elected: 'sum' (sign of the summed task vectors, TIES) or 'count' (one vote per model).",
)


def task_vector_params(*, normalize: bool, rescale: bool, extra: Sequence[Param] = ()) -> tuple[Param, ...]:
    """mergekit's parameters of a generalized task-arithmetic method, with that method's defaults."""
    params = (
        Param("weight", float, per_model=True, doc="Scale of this model's task vector."),
        Param("normalize", bool, default=normalize, doc="Divide by the sum of the weights (of the agreeing models, with consensus)."),
        Param("lambda", float, default=1.0, doc="Scale of the combined task vector."),
        Param("int8_mask", bool, default=False, doc="Accepted for mergekit compatibility; masks are always boolean."),
        Param(
            "rescale", bool, default=rescale,
            doc="After sparsifying, scale each task vector so its L1 norm matches the unsparsified one.",
        ),
        DENSITY,
    )
    return params + tuple(extra)


Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]
"""(task vector, model index) -> sparsified task vector; may work in place (the task vector is a fresh tensor)."""


def merge_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None,
    consensus: str | None,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """base + scale · (sparsified, weighted, optionally sign-agreeing) task vectors; see the module docstring."""
    if not tensors:
        return base
    deltas = []
    for i, tensor in enumerate(tensors):
        delta = tensor - base
        if sparsify is not None:
            delta = sparsify(delta, i)
        deltas.append(delta)
    if consensus is None:
        return combine_task_vectors(base, deltas, weights, normalize=normalize, scale=scale)
    for delta, w in zip(deltas, weights):
        delta.mul_(float(w))
    majority = elect_sign(deltas, consensus)
    mixed, divisor = disjoint_merge(deltas, weights, majority, in_place=True)
    del deltas, majority
    if normalize:
        divisor.masked_fill_(divisor == 0, 1)
        mixed.div_(divisor)
    if scale != 1.0:
        mixed.mul_(scale)
    return mixed.add_(base)


def per_model_check(name: str, fn: Callable[..., str | None], *keys: str) -> Callable[[dict], str | None]:
    """A registry `check` applying `fn` to each model's values of the per-model parameters `keys`."""

    def check(params: dict) -> str | None:
        columns = [params.get(k) for k in keys]
        if any(c is None for c in columns):
            return None
        for i, values in enumerate(zip(*columns)):
            problem = fn(*values)
            if problem:
                return f"{name}, model {i + 1}: {problem}"
        return None

    return check


__all__ = [
    "CONSENSUS",
    "DENSITY",
    "EPSILON",
    "GAMMA",
    "merge_task_vectors",
    "per_model_check",
    "task_vector_params",
    "_sparsify",
]
