"""SLERP: spherical linear interpolation between the base tensor (t = 0) and one other model (t = 1).

The whole tensor is treated as one vector. With θ the angle between the two tensors,

    result = sin((1−t)·θ)/sin θ · base + sin(t·θ)/sin θ · other

and plain linear interpolation `(1−t)·base + t·other` is used when the tensors are nearly colinear or
antipodal (|cos θ| > 0.9995). The coefficients multiply the tensors as they are, so their norms are
interpolated along with the direction. As in mergekit, cos θ is measured with each norm replaced by 1
when it is at most 1e-8, so a zero tensor gives cos θ = 0 and a NaN-free (if unusual) result:
slerp(0, b, t) = sin(t·π/2)·b. This matches mergekit rather than switching to lerp, because the goal is
identical numerics; the case only arises for all-zero tensors.

Sums run in float32 (float64 inputs stay float64); the result has the inputs' dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergesmith.methods._linalg import reduce_dtype
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


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp between two same-shaped tensors, treating each as one flat vector."""
    if v0.numel() == 0:
        return v0.clone()
    work = reduce_dtype(v0)
    a = v0.reshape(-1).to(work)
    b = v1.reshape(-1).to(work)
    stats = torch.stack(
        [torch.linalg.vector_norm(a), torch.linalg.vector_norm(b), torch.dot(a, b)]
    ).tolist()  # the one host sync
    norm_a, norm_b, dot = stats
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    # Divide each norm separately (not their product) so huge norms cannot overflow.
    cos_theta = (dot / norm_a) / norm_b
    if not math.isfinite(cos_theta):
        cos_theta = 1.0  # only for non-finite inputs; lerp propagates them as they are
    c0, c1 = slerp_coefficients(t, cos_theta)
    out = a * c0
    out.add_(b, alpha=c1)
    return out.reshape(v0.shape).to(v0.dtype)


@merge_method(
    "slerp",
    params=[Param("t", float, doc="Interpolation factor: 0 gives the base model, 1 the other model.")],
    base="required",
    min_models=1,
    max_models=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def slerp(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from the base model (t = 0) to the other model (t = 1)."""
    return slerp_tensors(float(t), base, tensors[0])
