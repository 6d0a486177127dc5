"""DARE (arXiv 2311.03099): drop each task-vector entry at random, keeping a fraction `density`, and rescale.

* `dare_ties`: DARE drop, then TIES sign election and disjoint merge (mergekit defaults: normalize off,
  rescale on).
* `dare_linear`: DARE drop, then a weighted sum of the task vectors (normalize off, rescale on).

`rescale` follows mergekit, not the paper's exact 1/density: the kept entries are scaled so the task
vector's L1 norm is unchanged, which is 1/density in expectation. The keep mask is drawn with the seeded
`generator` (see `_sparsify.LaneWords.block_words`); the same seed gives the same output, on any thread count.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from mergesmith.methods._sparsify import draws_on_cpu, random_plan, stream_seed
from mergesmith.methods._task_vectors import CONSENSUS, merge_task_vectors, task_vector_params
from mergesmith.methods.registry import merge_method


def dare_ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    compute_dtype: torch.dtype | None = None,
    consensus_method: str | None = "sum",
    generator: torch.Generator | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Random drop with rescale, elect sign, disjoint merge; `consensus_method=None` (`dare_linear`): a
    weighted sum instead."""
    dens = density or [1.0] * len(tensors)
    # each plan's stream seed drawn here, in model order, so the plans can then be built concurrently
    ahead = draws_on_cpu(generator)
    seeds = [stream_seed(generator) if ahead and d < 1 else None for d in dens]
    return merge_task_vectors(
        tensors, base, weight,
        sparsify=lambda tv, i, size: random_plan(tv, dens[i], rescale=rescale, generator=generator, size=size, seed=seeds[i]),
        consensus=consensus_method, normalize=normalize, scale=lambda_, dtype=compute_dtype, concurrent_plans=ahead,
        output_dtype=output_dtype,
    )


_REGISTERED = dict(
    base="required", converts_inputs=True, rounds_output=True, min_models=0, random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
merge_method(
    "dare_ties",
    params=task_vector_params(normalize=False, rescale=True, extra=(CONSENSUS,)),
    summary="Random drop with rescale, elect sign, disjoint merge.",
    **_REGISTERED,
)(dare_ties)
merge_method(
    "dare_linear",
    params=task_vector_params(normalize=False, rescale=True),
    summary="Random drop with rescale, then a weighted sum of the task vectors.",
    **_REGISTERED,
)(functools.partial(dare_ties, consensus_method=None))
