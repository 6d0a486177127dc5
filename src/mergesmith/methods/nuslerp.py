"""NuSLERP: slerp between two models whose interpolation factor comes from per-model weights.

With weights w₀, w₁ the factor is t = w₁ / (w₀ + w₁) (0.5 when the sum is within 1e-6 of zero). Given
a base model, the two task vectors (model − base) are slerped and the result added back to the base;
otherwise the models themselves are slerped.

What counts as "a vector" is chosen by two flags, as in mergekit:

* `nuslerp_flatten` (default true): the whole tensor is one vector;
* otherwise each slice along the last axis is slerped on its own, or, with `nuslerp_row_wise: true`,
  each slice along the first axis (the axes are swapped, so for a 2-D weight these are its columns;
  the name is mergekit's).

For each vector pair, u = v/max(‖v‖, 1e-7), cos θ = u₀·u₁ clamped to [−1, 1]; where 1 − cos²θ ≤ 1e-16
the pair is treated as colinear and linearly interpolated, otherwise
result = (sin((1−t)θ)·v₀ + sin(tθ)·v₁) / sin θ. Zero vectors get cos θ = 0, so the result is finite.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergesmith.methods._linalg import combine, combine_task_vectors, gram, reduce_dtype
from mergesmith.methods.registry import Param, merge_method

NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


def nuslerp_tensors(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """Slerp `v0` → `v1` by `t` per slice along the last (or, `row_wise`, the first) axis; a 0-dim tensor
    is one slice. (Whole flattened tensors stream instead: see `nuslerp`.)

    With `inplace`, `v0` is a scratch tensor the caller owns and may be overwritten by the result.
    """
    shape = v0.shape
    if v0.numel() == 0:
        return v0.clone()
    if v0.dim() == 0:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    work = reduce_dtype(v0)
    a32, b32 = a.to(work), b.to(work)
    norm_a = torch.linalg.vector_norm(a32, dim=-1, keepdim=True).clamp_(min=NORM_FLOOR)
    norm_b = torch.linalg.vector_norm(b32, dim=-1, keepdim=True).clamp_(min=NORM_FLOOR)
    if a32.shape[0] == 1 and a32.dim() == 2:
        dot = torch.dot(a32[0], b32[0]).reshape(1, 1)  # no full-size temporary
    else:
        dot = (a32 * b32).sum(dim=-1, keepdim=True)
    cos = dot.div_(norm_a).div_(norm_b).clamp_(-1.0, 1.0)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    out = a32.mul_(c0) if inplace and a32 is a else a32 * c0
    out.addcmul_(b32, c1)
    if row_wise and v0.dim() > 0:
        out = out.transpose(0, -1)
    return out.reshape(shape).to(v0.dtype)


def slerp_factors(t: float, aa: float, ab: float, bb: float) -> tuple[float, float]:
    """(c0, c1) with slerp(v0, v1) = c0·v0 + c1·v1, from the inner products aa = v0·v0, ab = v0·v1, bb = v1·v1,
    with the constants of `nuslerp_tensors` (norm floor, colinear threshold)."""
    norm_a = max(math.sqrt(max(aa, 0.0)), NORM_FLOOR)
    norm_b = max(math.sqrt(max(bb, 0.0)), NORM_FLOOR)
    cos = min(1.0, max(-1.0, ab / norm_a / norm_b))
    if 1 - cos * cos <= COLINEAR_EPS**2:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def interpolation_factor(weights: Sequence[float]) -> float:
    total = float(weights[0]) + float(weights[1])
    return 0.5 if abs(total) < 1e-6 else float(weights[1]) / total


@merge_method(
    "nuslerp",
    params=[
        Param("weight", float, per_model=True, doc="Relative weight of the model; t = w₁ / (w₀ + w₁)."),
        Param("nuslerp_flatten", bool, default=True, doc="Treat the whole tensor as one vector."),
        Param("nuslerp_row_wise", bool, default=False, doc="When not flattened, slerp slices along the first axis."),
    ],
    base="optional",
    min_models=2,
    max_models=2,
    converts_inputs=True,
    rounds_output=True,
)
def nuslerp(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weight: Sequence[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    compute_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Slerp two models (or their task vectors, given a base) with t = w₁ / (w₀ + w₁).

    Flattened (the default), it streams: the three inner products come from `gram` (float32 per chunk,
    float64 across chunks) and the output from one weighted sum, both chunk by chunk from the inputs as
    read, with no task vector or converted copy made; with a base, in float32 on CPU, by compiled loops
    that write a bf16 `output_dtype` directly (see `_linalg`). Per slice, whole tensors are converted first."""
    t = interpolation_factor(weight)
    dtype = compute_dtype or (base if base is not None else tensors[0]).dtype
    if nuslerp_flatten:
        (aa, ab), (_, bb) = gram(tensors, dtype, base=base).tolist()
        factors = slerp_factors(t, aa, ab, bb)
        if base is None:
            return combine(tensors, factors, dtype=dtype)
        return combine_task_vectors(tensors, base, factors, dtype, output_dtype)
    tensors = [x.to(dtype) for x in tensors]
    base = base.to(dtype) if base is not None else None
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], row_wise=nuslerp_row_wise)
    delta = nuslerp_tensors(t, tensors[0] - base, tensors[1] - base, row_wise=nuslerp_row_wise, inplace=True)
    return delta.add_(base)
