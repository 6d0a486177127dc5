"""Small SVD helpers for the subspace merges (TSV, ISO-C, ISO-CTS)."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import MethodInputError


def svd_dtype(tensor: torch.Tensor) -> torch.dtype:
    """SVDs run in float32 (float64 stays float64): half precisions have no SVD kernels."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of the thin SVD (U: m x r, S: r, Vh: r x n, r = min(m, n)). LAPACK's divide-and-conquer SVD
    can fail to converge in float32 on matrices with many equal singular values, which ISO-CTS's stacked
    bases have (a 768 x 768 one of the bench's 0.1B models: 614 singular values at 1): such a matrix is
    decomposed again in float64 and the factors returned in its dtype. Where that fails too, a
    `MethodInputError` says so (the merge then names the tensor) instead of LAPACK's traceback."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise MethodInputError(f"the SVD of a {tuple(matrix.shape)} matrix did not converge") from None
    try:
        u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    except torch.linalg.LinAlgError:
        raise MethodInputError(f"the SVD of a {tuple(matrix.shape)} matrix did not converge, in float32 or float64") from None
    return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal rows or columns (orthogonal Procrustes): P Qᴴ from P S Qᴴ."""
    u, _, vh = thin_svd(matrix)
    return u @ vh


def mean_task_vector(base: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """base + scale · mean(modelᵢ − base): the papers' rule for tensors that are not matrices."""
    mixed = torch.zeros_like(base)
    for t in tensors:
        mixed.add_(t - base)
    mixed.div_(len(tensors))
    if scale != 1.0:
        mixed.mul_(scale)
    return base + mixed
