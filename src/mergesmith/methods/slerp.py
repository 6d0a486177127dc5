"""SLERP: spherical linear interpolation between the base tensor (t = 0) and one other model (t = 1).

The whole tensor is treated as one vector. With θ the angle between the two tensors,

    result = sin((1−t)·θ)/sin θ · base + sin(t·θ)/sin θ · other

and plain linear interpolation `(1−t)·base + t·other` is used when the tensors are nearly colinear or
antipodal (|cos θ| > 0.9995). The coefficients multiply the tensors as they are, so their norms are
interpolated along with the direction. As in mergekit, cos θ is measured with each norm replaced by 1
when it is at most 1e-8, so a zero tensor gives cos θ = 0 and a NaN-free (if unusual) result:
slerp(0, b, t) = sin(t·π/2)·b. This matches mergekit rather than switching to lerp, because the goal is
identical numerics; the case only arises for all-zero tensors.

Sums run in float32 per chunk and float64 across chunks (float64 inputs stay float64); the result has the
compute dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergesmith.methods._linalg import combine, gram
from mergesmith.methods.registry import Param, merge_method

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(t: float, cos_theta: float) -> tuple[float, float]:
    """(coefficient of the t=0 end, coefficient of the t=1 end) for the given cosine."""
    cos_theta = min(1.0, max(-1.0, cos_theta))
    if abs(cos_theta) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos_theta)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Slerp between two same-shaped tensors, treating each as one flat vector, in `dtype` (default: v0's).

    The norms and the dot product come from `gram` (chunked, no converted copy of a bf16 input); the weighted
    sum is written straight into the result's dtype."""
    dtype = dtype or v0.dtype
    if v0.numel() == 0:
        return v0.to(dtype, copy=True)
    (aa, dot), (_, bb) = gram([v0, v1], dtype).tolist()
    norm_a = math.sqrt(max(aa, 0.0)) if math.isfinite(aa) else aa
    norm_b = math.sqrt(max(bb, 0.0)) if math.isfinite(bb) else bb
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    # Divide each norm separately (not their product) so huge norms cannot overflow.
    cos_theta = (dot / norm_a) / norm_b
    if not math.isfinite(cos_theta):
        cos_theta = 1.0  # only for non-finite inputs; lerp propagates them as they are
    c0, c1 = slerp_coefficients(t, cos_theta)
    return combine([v0, v1], [c0, c1], dtype=dtype)


@merge_method(
    "slerp",
    params=[Param("t", float, doc="Interpolation factor: 0 gives the base model, 1 the other model.")],
    base="required",
    min_models=1,
    max_models=1,
    converts_inputs=True,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def slerp(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, t: float, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Spherical interpolation from the base model (t = 0) to the other model (t = 1)."""
    return slerp_tensors(float(t), base, tensors[0], compute_dtype)
