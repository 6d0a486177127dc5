"""Multi-SLERP: weighted barycentric interpolation of several models on a hypersphere.

Each input vector xᵢ (the model, or model − base when a base is given) is scaled to the unit sphere,
uᵢ = xᵢ / (‖xᵢ‖ + eps). With weights wᵢ (divided by their sum when `normalize_weights`):

1. m = Σ wᵢ·uᵢ, normalised to m̂ = m / ‖m‖ (the weighted Euclidean mean, projected on the sphere);
2. the uᵢ are projected onto the tangent space at m̂: τᵢ = uᵢ − (uᵢ·m̂)·m̂, and τ = Σ wᵢ·τᵢ;
3. the exponential map goes back to the sphere: with θ = ‖τ‖ + eps, r = cos θ·m̂ + sin θ/θ·τ;
4. the radius is the weighted mean norm: result = (Σ wᵢ‖xᵢ‖)·r (+ base).

A single input is returned unchanged. Every quantity above is a linear combination of the xᵢ, so the
implementation only computes their Gram matrix (one pass over the data), does steps 1–4 on N-vectors of
coefficients in float64, and forms the output with one weighted sum: far less memory traffic than
materialising uᵢ, τᵢ and friends, with the same result up to float32 rounding.

Differences from mergekit:

* When ‖m‖ < eps (the inputs cancel out, or are all zero, e.g. identical models given a base),
  mergekit falls back to the linear combination Σ wᵢ·xᵢ for two inputs but raises an error for three or
  more. We use the linear fallback for any number of inputs, so identical models merge to themselves.
* With `normalize_weights` and weights summing to zero, mergekit divides by zero and writes inf/NaN;
  we raise `ZeroWeightSumError` instead.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergesmith.methods._linalg import combine, combine_task_vectors, gram
from mergesmith.methods.linear import ZeroWeightSumError
from mergesmith.methods.registry import Param, merge_method


def multislerp_coefficients(
    g: torch.Tensor, weights: Sequence[float], *, normalize: bool, eps: float
) -> list[float]:
    """Coefficients cᵢ with result = Σ cᵢ·xᵢ, given the Gram matrix `g` of the xᵢ (float64)."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if normalize:
        total = float(w.sum())
        if abs(total) < 1e-12:
            raise ZeroWeightSumError("weights sum to 0, so normalize_weights: true cannot divide by them")
        w = w / total
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    inv = 1.0 / (norms + eps)
    unit_gram = g * inv[:, None] * inv[None, :]

    def norm_of(coeffs: torch.Tensor) -> float:
        return math.sqrt(max(float(coeffs @ unit_gram @ coeffs), 0.0))

    mean_norm = norm_of(w)
    if mean_norm < eps:
        return w.tolist()  # inputs cancel out: linear combination Σ wᵢ·xᵢ
    mean = w / mean_norm  # coefficients of m̂ over the uᵢ
    dots = unit_gram @ mean  # uᵢ·m̂
    tangent = w - float(w @ dots) * mean  # Σ wᵢ (uᵢ − (uᵢ·m̂) m̂)
    theta = norm_of(tangent) + eps
    on_sphere = mean * math.cos(theta) + tangent * (math.sin(theta) / theta)
    radius = float(norms @ w)
    return (on_sphere * radius * inv).tolist()


@merge_method(
    "multislerp",
    params=[
        Param("weight", float, per_model=True, doc="Barycentric weight of the model."),
        Param("normalize_weights", bool, default=True, doc="Divide the weights by their sum."),
        Param("eps", float, default=1e-8, doc="Small constant for numerical stability."),
    ],
    base="optional",
    min_models=1,
    converts_inputs=True,
    rounds_output=True,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
def multislerp(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weight: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
    compute_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted spherical interpolation of any number of models (or their task vectors, given a base).

    Streams: the Gram matrix and the output are computed chunk by chunk from the inputs as read, task
    vectors included (no full-size task vector or converted copy is made); two task vectors in float32 on
    CPU by compiled loops, which write a bf16 `output_dtype` directly (see `_linalg`)."""
    dtype = compute_dtype or (base if base is not None else tensors[0]).dtype
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    coefficients = multislerp_coefficients(gram(tensors, dtype, base=base), weight, normalize=normalize_weights, eps=eps)
    if base is None:
        return combine(tensors, coefficients, dtype=dtype)
    return combine_task_vectors(tensors, base, coefficients, dtype, output_dtype)
