"""Small SVD helpers for the subspace merges (TSV, ISO-C, ISO-CTS)."""

from __future__ import annotations

from typing import Sequence

import torch


def svd_dtype(tensor: torch.Tensor) -> torch.dtype:
    """SVDs run in float32 (float64 stays float64): half precisions have no SVD kernels."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of the thin SVD (U: m x r, S: r, Vh: r x n, r = min(m, n))."""
    return torch.linalg.svd(matrix, full_matrices=False)


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
