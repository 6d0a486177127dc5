"""NearSwap: take the other model's value where it is close to the base, keep the base where it is far.

Elementwise, with d = |base − other|:

    w = clamp(t / max(d, 1e-6), 0, 1)          result = w·other + (1 − w)·base

so parameters that differ by at most t are swapped in completely, and larger differences are blended in
with weight t/d. `t = 0` returns the base; a negative t also returns the base (w is clamped at 0).
Matches mergekit; identical models and zero tensors give the base (d is floored, so no division by zero).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import Param, merge_method

DIFF_FLOOR = 1e-6


@merge_method(
    "nearswap",
    params=[Param("t", float, doc="Distance below which the other model's value replaces the base's.")],
    base="required",
    min_models=1,
    max_models=1,
    elementwise=True,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
def nearswap(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, t: float) -> torch.Tensor:
    """Blend in the other model with weight clamp(t / |base − other|, 0, 1) per element."""
    other = tensors[0]
    diff = other - base
    w = diff.abs().clamp_(min=DIFF_FLOOR).reciprocal_().mul_(float(t)).clamp_(0.0, 1.0)
    return torch.addcmul(base, w, diff)
