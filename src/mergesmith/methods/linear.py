"""Linear merge ("model soup", arXiv 2203.05482): a weighted average of the models' tensors."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import MethodInputError, Param, merge_method

class ZeroWeightSumError(MethodInputError):
    """Normalizing by a weight sum of zero would divide by zero."""


ZERO_SUM_PROBLEM = "weights sum to 0, so normalize: true would divide by zero (set normalize: false or change the weights)"


def _check_weight_sum(params: dict) -> str | None:
    if params.get("normalize", True) and abs(sum(params["weight"])) < 1e-12:
        return ZERO_SUM_PROBLEM
    return None


@merge_method(
    "linear",
    params=[
        Param("weight", float, per_model=True, doc="Relative weight of the model."),
        Param("normalize", bool, default=True, doc="Divide by the sum of the weights."),
    ],
    elementwise=True,
    converts_inputs=True,
    reference="https://arxiv.org/abs/2203.05482",
    check=_check_weight_sum,
)
def linear(
    tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize: bool = True, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Weighted sum of the tensors, divided by the sum of weights when `normalize` is set, in `compute_dtype`
    (default: the first tensor's). Inputs in another dtype are converted as they are added."""
    scale = 1.0
    if normalize:
        total = float(sum(weight))
        if abs(total) < 1e-12:
            # mergekit divides by zero here and writes inf/nan; a clear refusal is better.
            raise ZeroWeightSumError(ZERO_SUM_PROBLEM)
        scale = 1.0 / total
    # Folding the normalisation into the weights saves a zero-fill and a division pass over the tensor.
    result = tensors[0].to(compute_dtype or tensors[0].dtype, copy=True).mul_(float(weight[0]) * scale)
    for tensor, w in zip(tensors[1:], weight[1:]):
        result.add_(tensor, alpha=float(w) * scale)  # in place: computed in result's dtype
    return result
