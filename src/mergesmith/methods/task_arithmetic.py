"""Task arithmetic (arXiv 2212.04089): add the weighted task vectors (fine-tune minus base) to the base."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods._task_vectors import merge_task_vectors
from mergesmith.methods.registry import Param, merge_method

TASK_VECTOR_COMMON_PARAMS = (
    Param("weight", float, per_model=True, doc="Scale of this model's task vector."),
    Param("normalize", bool, default=False, doc="Divide the summed task vectors by the sum of weights."),
    Param("lambda", float, default=1.0, doc="Scale of the combined task vector."),
    Param("int8_mask", bool, default=False, doc="Accepted for mergekit compatibility; masks are always compact."),
    Param("rescale", bool, default=False, doc="Accepted for mergekit compatibility; unused without sparsification."),
)


@merge_method(
    "task_arithmetic",
    params=TASK_VECTOR_COMMON_PARAMS,
    base="required",
    min_models=0,
    elementwise=True,
    converts_inputs=True,
    rounds_output=True,
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
    compute_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """base + λ · Σ wᵢ (modelᵢ − base), divided by Σ wᵢ when `normalize` (a near-zero sum counts as 1, as
    in mergekit); streamed over chunks by the shared task-vector pipeline."""
    return merge_task_vectors(
        tensors, base, weight, sparsify=None, consensus=None, normalize=normalize, scale=lambda_, dtype=compute_dtype,
        output_dtype=output_dtype,
    )
