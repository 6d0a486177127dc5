"""TSV-Merge, Task Singular Vectors (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

For each 2-D weight, with N task vectors δᵢ = modelᵢ − base of rank r = min(rows, cols):

    δᵢ ≈ Uᵢ Σᵢ Vᵢᵀ          keep each task's top k singular triplets, k = floor(r · sv_reduction)
    U = [U₁ … U_N], Σ = diag(Σ₁ … Σ_N), V = [V₁ … V_N]
    U⊥, V⊥ = polar factors of U, V   (the nearest orthonormal bases: decorrelates the tasks' subspaces)
    out = base + λ · U⊥ Σ V⊥ᵀ

Tensors that are not matrices (norms, biases) get the paper's rule: base + λ · mean(δᵢ).

Parameters:
* `lambda` (default 1.0): the paper's α, the scale of the merged task vector (the paper uses 1.0).
* `sv_reduction` (default null = 1/N): the fraction of each task's rank kept. It is capped at 1/N so the
  concatenated bases fit in r dimensions; when k comes out 0 (a matrix with r < N) the matrix falls back to
  the mean rule.

The singular vectors and polar factors come from float64 Gram matrices (`_svd`); the big factors are kept
in float32 (float64 inputs: float64). Cost per matrix: one Gram product and eigendecomposition per task and
two for the polar factors, each about the cost of a few matrix products of the matrix's size; far slower
than the element-wise methods (bench/README: the SVD methods).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods._svd import mean_task_vector, polar_factor, svd_dtype, top_singular
from mergesmith.methods.registry import Param, merge_method


def _check(params: dict) -> str | None:
    frac = params.get("sv_reduction")
    if frac is not None and not 0 < frac <= 1:
        return f"sv_reduction must be in (0, 1], got {frac}"
    return None


@merge_method(
    "tsv",
    params=(
        Param("lambda", float, default=1.0, doc="Scale of the merged task vector (the paper's alpha)."),
        Param("sv_reduction", float, default=None, doc="Fraction of each task's singular values kept; null means 1/N (capped at 1/N)."),
    ),
    base="required",
    min_models=0,
    reference="https://arxiv.org/abs/2412.00081",
    check=_check,
)
def tsv(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    lambda_: float = 1.0,
    sv_reduction: float | None = None,
) -> torch.Tensor:
    """Low-rank task matrices with decorrelated (orthogonalized) singular bases, summed."""
    n = len(tensors)
    if n == 0:
        return base
    if base.dim() != 2:
        return mean_task_vector(base, tensors, lambda_)
    r = min(base.shape)
    frac = 1.0 / n if sv_reduction is None else min(float(sv_reduction), 1.0 / n)
    k = min(int(r * frac), r // n)
    if k == 0:
        return mean_task_vector(base, tensors, lambda_)
    dtype = svd_dtype(base)
    us, ss, vhs = [], [], []
    for t in tensors:
        u, s, vh = top_singular((t - base).to(dtype), k)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    u_perp = polar_factor(torch.cat(us, dim=1))
    vh_perp = polar_factor(torch.cat(vhs, dim=0))
    merged = (u_perp * torch.cat(ss).to(dtype)) @ vh_perp
    return base + (lambda_ * merged).to(base.dtype)
