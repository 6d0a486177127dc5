"""Passthrough: copy one model's tensor unchanged (optionally scaled); the building block of frankenmerges."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import Param, merge_method


@merge_method(
    "passthrough",
    params=[Param("scale", float, default=None, per_model=True, doc="Multiply the tensor by this factor.")],
    max_models=1,
    elementwise=True,
)
def passthrough(tensors: Sequence[torch.Tensor], *, scale: Sequence[float | None] = (None,)) -> torch.Tensor:
    """Return the single input tensor, multiplied by `scale` when one is given."""
    factor = scale[0] if scale else None
    return tensors[0] if factor is None else tensors[0] * factor
