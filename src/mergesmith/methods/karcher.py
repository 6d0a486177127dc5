"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit hypersphere.

Every input (the base too, if listed: the method ignores `base_model`) gets the same weight αᵢ = 1/N.
Inputs whose norm is at most `tol` take no part in the direction. With uᵢ = xᵢ/‖xᵢ‖ for the others and
their weights renormalised to sum to one:

1. start from m = Σ αᵢuᵢ / ‖Σ αᵢuᵢ‖ (or the first unit vector when that sum is shorter than `tol`);
2. repeat up to `max_iter` times: θᵢ = arccos(uᵢ·m); the Riemannian gradient is
   τ = Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − (uᵢ·m)·m) over the inputs with θᵢ ≥ tol; stop when ‖τ‖ < tol, otherwise
   step along the geodesic, m ← cos‖τ‖·m + sin‖τ‖·τ/‖τ‖, and renormalise;
3. the result is (Σ αᵢ‖xᵢ‖)·m, the sum running over all inputs (so zero inputs shrink it).

Implementation: every iterate is a linear combination of the uᵢ, so only the N x N Gram matrix of the
inputs is needed. It is computed in one pass, the iteration runs on N coefficients in float64 on the host
(no device syncs per iteration, convergence checks are free), and the output is one weighted sum. This
matches mergekit's tensor-by-tensor loop up to float32 rounding, at the cost of roughly one linear merge.

Differences from mergekit: none in the arithmetic. Inputs of different shapes are refused with a clear
error (the executor trims vocabulary-sized tensors to a common size before calling).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergesmith.methods._linalg import combine, gram
from mergesmith.methods.registry import Param, merge_method


def karcher_coefficients(g: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-5) -> list[float] | None:
    """Coefficients cᵢ with result = Σ cᵢ·xᵢ from the Gram matrix of the xᵢ; None when all are ~zero."""
    n = g.shape[0]
    alphas = torch.full((n,), 1.0 / n, dtype=torch.float64)
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    valid = norms > tol
    if not bool(valid.any()):
        return None
    idx = valid.nonzero().flatten()
    nv = norms[idx]
    unit_gram = g[idx][:, idx] / (nv[:, None] * nv[None, :])
    weights = alphas[idx] / alphas[idx].sum()

    def norm_of(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ unit_gram @ c), 0.0))

    mean = weights.clone()
    mean_norm = norm_of(mean)
    if mean_norm < tol:
        mean = torch.zeros_like(weights)
        mean[0] = 1.0
    else:
        mean = mean / mean_norm

    for _ in range(max_iter):
        dots = (unit_gram @ mean).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        active = theta >= tol
        safe_sin = torch.where(active, torch.sin(theta), torch.ones_like(theta))
        coef = torch.where(active, weights * theta / safe_sin, torch.zeros_like(theta))
        tangent = coef - float(coef @ dots) * mean
        tangent_norm = norm_of(tangent)
        if tangent_norm < tol:
            break
        mean = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
        length = norm_of(mean)
        if length > tol:
            mean = mean / length

    scale = float(alphas @ norms)
    coefficients = torch.zeros(n, dtype=torch.float64)
    coefficients[idx] = scale * mean / nv
    return coefficients.tolist()


@merge_method(
    "karcher",
    params=[
        Param("max_iter", int, default=10, doc="Maximum number of fixed-point iterations."),
        Param("tol", float, default=1e-5, doc="Convergence tolerance (also the norm below which an input is ignored)."),
    ],
    base="ignored",
    min_models=1,
    converts_inputs=True,
    reference="https://arxiv.org/abs/2603.04972",
)
def karcher(
    tensors: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Equal-weight Karcher mean of the inputs' directions, scaled by their mean norm, in `compute_dtype`
    (default: the first input's); inputs in a narrower dtype are converted as they are read."""
    dtype = compute_dtype or tensors[0].dtype
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors[1:]):
        raise ValueError(f"karcher needs tensors of one shape, got {[tuple(t.shape) for t in tensors]}")
    coefficients = karcher_coefficients(gram(tensors, dtype), max_iter=int(max_iter), tol=float(tol))
    if coefficients is None:
        return torch.zeros(shape, dtype=dtype, device=tensors[0].device)
    return combine(tensors, coefficients, dtype=dtype)
