"""Model Breadcrumbs (arXiv 2312.06795): drop each task vector's largest-magnitude outliers (fraction
`gamma`) and its smallest entries, keeping a fraction `density`.

* `breadcrumbs`: then a weighted sum (mergekit defaults: normalize off, rescale off).
* `breadcrumbs_ties`: then TIES sign election and disjoint merge (normalize off, rescale off).

The cut uses two O(n) thresholds instead of a full sort. Counts follow mergekit: keep int(density * n),
drop int(gamma * n) from the top, shrinking that cut when density + gamma > 1. gamma = 0 is plain magnitude
trimming (older mergekit zeroed the whole task vector there because of a `[n:-0]` slice; the mergekit used
for parity here already gets it right, and so do we).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from mergesmith.methods._sparsify import check_tie_order, outliers_plan
from mergesmith.methods._task_vectors import CONSENSUS, GAMMA, merge_task_vectors, task_vector_params
from mergesmith.methods.registry import merge_method


def breadcrumbs_ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    compute_dtype: torch.dtype | None = None,
    consensus_method: str | None = "sum",
    tie_order: str = "position",
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Drop outliers and small entries, elect sign, disjoint merge; `consensus_method=None` (`breadcrumbs`):
    a weighted sum instead."""
    dens = density or [1.0] * len(tensors)
    gam = gamma or [0.01] * len(tensors)
    check_tie_order(tie_order)
    return merge_task_vectors(
        tensors, base, weight,
        sparsify=lambda tv, i, size: outliers_plan(tv, dens[i], gam[i], rescale=rescale, size=size, tie_order=tie_order),
        consensus=consensus_method, normalize=normalize, scale=lambda_, dtype=compute_dtype,
        concurrent_plans=True, output_dtype=output_dtype,
    )


_REGISTERED = dict(
    base="required", converts_inputs=True, rounds_output=True, breaks_ties=True, min_models=0,
    reference="https://arxiv.org/abs/2312.06795",
)
merge_method(
    "breadcrumbs",
    params=task_vector_params(normalize=False, rescale=False, extra=(GAMMA,)),
    summary="Drop outliers and small entries, then a weighted sum of the task vectors.",
    **_REGISTERED,
)(functools.partial(breadcrumbs_ties, consensus_method=None))
merge_method(
    "breadcrumbs_ties",
    params=task_vector_params(normalize=False, rescale=False, extra=(GAMMA, CONSENSUS)),
    summary="Drop outliers and small entries, elect sign, disjoint merge.",
    **_REGISTERED,
)(breadcrumbs_ties)
