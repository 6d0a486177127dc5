"""DELLA-Merging (arXiv 2406.11617): MagPrune drops task-vector entries at random with keep probabilities
ranked by magnitude within each row (density - epsilon for the smallest, density + epsilon for the largest),
then rescales.

* `della`: then TIES sign election and disjoint merge (mergekit defaults: normalize on, rescale on).
* `della_linear`: then a weighted sum (normalize off, rescale on).

As in mergekit, `rescale` matches each task vector's L1 norm (the paper divides each kept entry by its own
probability), and 0 < density with density ± epsilon outside (0, 1) is an error (caught at plan time here).
No rank is computed (mergekit: two argsorts of the whole tensor): an entry's rank over its row's length is
the chance that a random other entry of the row is smaller, so each entry compares itself with one random
partner (`_sparsify.PartnerKeep`); the keep probabilities, and so the distribution of the masks, are those
of the ranks. A row of length 1 (e.g. an (n, 1) tensor) gets probability `density`, where mergekit
computes 0/0.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from mergesmith.methods._sparsify import TaskVector, check_della, della_plan, draws_on_cpu, stream_seed
from mergesmith.methods._task_vectors import CONSENSUS, EPSILON, merge_task_vectors, per_model_check, task_vector_params
from mergesmith.methods.registry import merge_method

_check = per_model_check("DELLA", check_della, "density", "epsilon")


def della(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    compute_dtype: torch.dtype | None = None,
    consensus_method: str | None = "sum",
    generator: torch.Generator | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """MagPrune with rescale, elect sign, disjoint merge; `consensus_method=None` (`della_linear`, which
    also defaults `normalize` off): a weighted sum instead."""
    dens = density or [1.0] * len(tensors)
    eps = epsilon or [0.15] * len(tensors)
    # each plan's stream seed drawn here, in model order (the plans that draw: 0 < density < 1), so the plans
    # can then be built concurrently: with the compiled loops only (1B: 18-20 -> 13-16 s); the other paths'
    # torch operations use every core already, and two plans at once were slower there (19-20 -> 21 s)
    ahead = draws_on_cpu(generator)
    seeds = [stream_seed(generator) if ahead and 0 < d < 1 and base.numel() else None for d in dens]
    return merge_task_vectors(
        tensors, base, weight,
        sparsify=lambda tv, i, size: della_plan(
            tv, base.shape, dens[i], eps[i], rescale=rescale, generator=generator, size=size, seed=seeds[i]
        ),
        consensus=consensus_method, normalize=normalize, scale=lambda_, dtype=compute_dtype, output_dtype=output_dtype,
        concurrent_plans=ahead and bool(tensors) and TaskVector(tensors[0], base, compute_dtype).compiled(),
    )


_REGISTERED = dict(
    base="required", converts_inputs=True, rounds_output=True, min_models=0, random=True,
    reference="https://arxiv.org/abs/2406.11617", check=_check,
)
merge_method(
    "della",
    params=task_vector_params(normalize=True, rescale=True, extra=(EPSILON, CONSENSUS)),
    summary="MagPrune with rescale, elect sign, disjoint merge.",
    **_REGISTERED,
)(della)
merge_method(
    "della_linear",
    params=task_vector_params(normalize=False, rescale=True, extra=(EPSILON,)),
    summary="MagPrune with rescale, then a weighted sum of the task vectors.",
    **_REGISTERED,
)(functools.partial(della, consensus_method=None, normalize=False))
