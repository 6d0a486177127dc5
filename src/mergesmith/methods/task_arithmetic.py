"""Task arithmetic (arXiv 2212.04089): add the weighted task vectors (fine-tune minus base) to the base."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import Param, merge_method

TASK_VECTOR_COMMON_PARAMS = (
    Param("weight", float, per_model=True, doc="Scale of this model's task vector."),
    Param("normalize", bool, default=False, doc="Divide the summed task vectors by the sum of weights."),
    Param("lambda", float, default=1.0, doc="Scale of the combined task vector."),
    Param("int8_mask", bool, default=False, doc="Accepted for mergekit compatibility; masks are always compact."),
    Param("rescale", bool, default=False, doc="Accepted for mergekit compatibility; unused without sparsification."),
)


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """base + scale * Σ wᵢ·δᵢ, divided by Σ wᵢ when `normalize` (a near-zero sum is treated as 1, as mergekit does)."""
    mixed = torch.zeros_like(base)
    for delta, w in zip(deltas, weights):
        mixed.add_(delta, alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if abs(total) >= 1e-8:
            mixed.div_(total)
    if scale != 1.0:
        mixed.mul_(scale)
    return base + mixed


@merge_method(
    "task_arithmetic",
    params=TASK_VECTOR_COMMON_PARAMS,
    base="required",
    min_models=0,
    elementwise=True,
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: Sequence[float],
    normalize: bool = False,
    int8_mask: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """base + λ · Σ wᵢ (modelᵢ − base)."""
    deltas = [t - base for t in tensors]
    return combine_task_vectors(base, deltas, weight, normalize=normalize, scale=lambda_)
