"""Isotropic merging (Marczak et al., "No Task Left Behind", arXiv 2502.04959): ISO-C and ISO-CTS.

Both work per 2-D weight on the task vectors δᵢ = modelᵢ − base and flatten the singular spectrum of the
merged update, so no direction dominates; tensors that are not matrices get base + λ · mean(δᵢ) (the
paper's rule).

`iso_c` (Isotropic merging in the Common subspace):

    Σᵢ δᵢ = U S Vᵀ,   out = base + λ · mean(S) · U Vᵀ

`iso_cts` (Common and Task-Specific subspaces), with r = min(rows, cols) and N tasks:

    common:   the top c singular vectors of Σᵢ δᵢ, c ≈ r · common_space_fraction
    specific: for each task, the top d = (r − c) / N singular vectors of δᵢ with the common space
              projected out (δᵢ − U_c U_cᵀ δᵢ)
    U, V = polar factors of the concatenated [specific₁ … specific_N, common] bases (orthonormalized)
    out = base + λ · mean(all kept singular values) · U Vᵀ

c is adjusted so that N·d = r − c exactly: d = round((r − c) / N), capped at floor(r / N), then c = r − N·d.

Parameters:
* `lambda` (default 1.0): the paper's α, scale of the merged update (tuned on validation data in the paper,
  typically between 1 and 2; 1.0 here as a neutral default).
* `common_space_fraction` (iso_cts, default 0.8): the share of the rank given to the common subspace.

Singular vectors and polar factors come from float64 Gram matrices (`_svd`; big factors kept in float32,
float64 inputs in float64); expect about a second per large matrix on a CPU.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods._svd import mean_task_vector, polar_factor, polar_with_singular_values, svd_dtype, top_singular
from mergesmith.methods.registry import Param, merge_method

_LAMBDA = Param("lambda", float, default=1.0, doc="Scale of the merged update (the paper's alpha).")


def _check_fraction(params: dict) -> str | None:
    frac = params.get("common_space_fraction")
    if frac is not None and not 0 <= frac <= 1:
        return f"common_space_fraction must be in [0, 1], got {frac}"
    return None


@merge_method("iso_c", params=(_LAMBDA,), base="required", min_models=0, reference="https://arxiv.org/abs/2502.04959")
def iso_c(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Sum of task vectors with its singular values replaced by their mean."""
    if not tensors:
        return base
    if base.dim() != 2:
        return mean_task_vector(base, tensors, lambda_)
    dtype = svd_dtype(base)
    total = torch.zeros(base.shape, dtype=dtype, device=base.device)
    for t in tensors:
        total.add_((t - base).to(dtype))
    factor, s = polar_with_singular_values(total)
    merged = factor.mul_(float(s.mean()) * lambda_)
    return base + merged.to(base.dtype)


def split_rank(r: int, n: int, fraction: float) -> tuple[int, int]:
    """(common dimensions c, per-task dimensions d) with c + n·d = r."""
    c = int(r * fraction)
    d = min(round((r - c) / n), r // n)
    return r - n * d, d


@merge_method(
    "iso_cts",
    params=(
        _LAMBDA,
        Param("common_space_fraction", float, default=0.8, doc="Share of each matrix's rank given to the common subspace."),
    ),
    base="required",
    min_models=0,
    reference="https://arxiv.org/abs/2502.04959",
    check=_check_fraction,
)
def iso_cts(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    lambda_: float = 1.0,
    common_space_fraction: float = 0.8,
) -> torch.Tensor:
    """Common subspace of the summed task vectors plus task-specific subspaces, orthonormalized, isotropic."""
    n = len(tensors)
    if n == 0:
        return base
    if base.dim() != 2:
        return mean_task_vector(base, tensors, lambda_)
    dtype = svd_dtype(base)
    deltas = [(t - base).to(dtype) for t in tensors]
    total = torch.stack(deltas).sum(dim=0)
    c, d = split_rank(min(base.shape), n, common_space_fraction)
    u_common, s_common, vh_common = top_singular(total, c)
    us, ss, vhs = [], [], []
    if d > 0:
        for delta in deltas:
            specific = delta - u_common @ (u_common.T @ delta)
            ut, st, vht = top_singular(specific, d)
            us.append(ut)
            ss.append(st)
            vhs.append(vht)
    u_all = polar_factor(torch.cat(us + [u_common], dim=1))
    vh_all = polar_factor(torch.cat(vhs + [vh_common], dim=0))
    sigma = float(torch.cat(ss + [s_common]).mean())
    merged = (u_all @ vh_all).mul_(sigma * lambda_)
    return base + merged.to(base.dtype)
