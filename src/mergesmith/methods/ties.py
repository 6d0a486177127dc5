"""TIES-Merging (arXiv 2306.01708): trim each task vector to its largest magnitudes, elect a sign per entry,
and average the entries that agree with it.

Parameters and defaults follow mergekit's `ties` (normalize on, rescale off), plus `consensus_method`
(mergekit always uses "sum"). The trim keeps max(1, floor(density * n)) entries, as mergekit does; it selects
the k-th largest magnitude in O(n) instead of argsorting (see `_sparsify`), and breaks ties at the threshold
by position (`tie_order="mergekit"`: by mergekit's argsort, at its cost).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods._sparsify import check_tie_order, magnitude_plan
from mergesmith.methods._task_vectors import CONSENSUS, merge_task_vectors, task_vector_params
from mergesmith.methods.registry import merge_method


@merge_method(
    "ties",
    params=task_vector_params(normalize=True, rescale=False, extra=(CONSENSUS,)),
    base="required",
    converts_inputs=True,
    rounds_output=True,
    breaks_ties=True,
    min_models=0,
    reference="https://arxiv.org/abs/2306.01708",
)
def ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    compute_dtype: torch.dtype | None = None,
    consensus_method: str = "sum",
    tie_order: str = "position",
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Trim (top-k magnitude), elect sign, disjoint merge."""
    dens = density or [1.0] * len(tensors)
    check_tie_order(tie_order)
    return merge_task_vectors(
        tensors, base, weight,
        sparsify=lambda tv, i, size: magnitude_plan(tv, dens[i], rescale=rescale, size=size, tie_order=tie_order),
        consensus=consensus_method, normalize=normalize, scale=lambda_, dtype=compute_dtype,
        concurrent_plans=True, output_dtype=output_dtype,
    )
