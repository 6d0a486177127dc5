"""Singular vectors and polar factors for the subspace merges (TSV, ISO-C, ISO-CTS), from the eigenvectors
of a float64 Gram matrix.

For a matrix A, tall side m x n (m >= n; a wide matrix is handled as its transpose): AᵀA = V Λ Vᵀ gives
A's right singular vectors V and values σ = √λ, its left ones U = A V / σ, and its polar factor
U Vᵀ = A · V Λ^(-1/2) Vᵀ. Why not LAPACK's SVD: the Gram route is faster (one n x n product and one eigh
instead of a bidiagonalization: the three methods take 1.55-1.7x less time on the bench's 1B model,
`bench/svd_cost.py`) and, with the Gram matrix and the eigh in float64, far more accurate than the float32
SVD it replaces (TSV on the bench's task vectors: 4e-8 of the result's largest entry off a float64 SVD,
against 1.5e-3). The big matrices stay in their work dtype; float64 copies of at most `ROWS` rows at a time
are made to multiply (float32 storage of unit-scale factors costs ~1e-7: the Gram product and the eigh are
where precision is lost).

Directions whose eigenvalue is at or below `noise_floor` (rounding error of the Gram matrix) count as
zero: they get σ = 0 and no singular vector, and the polar factor of a rank-deficient matrix is the partial
isometry on its range. LAPACK's SVD would instead complete the basis with arbitrary directions, which
ISO-C would then add to the merge at the mean singular value.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import MethodInputError

# Rows of a big matrix converted to float64 at a time (4096 x 2048: 64 MB).
ROWS = 4096
_F64 = torch.float64


def svd_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the big factors are kept in: float32 (float64 stays float64); half precisions are widened."""
    return _F64 if tensor.dtype == _F64 else torch.float32


def gram(tall: torch.Tensor) -> torch.Tensor:
    """Aᵀ A in float64, summed over blocks of `ROWS` rows."""
    n = tall.shape[1]
    out = torch.zeros(n, n, dtype=_F64, device=tall.device)
    for block in tall.split(ROWS):
        block = block.to(_F64)
        out.addmm_(block.T, block)
    return out


def times(tall: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """tall @ small, each block of `ROWS` rows multiplied in float64, the result in tall's dtype."""
    out = torch.empty(tall.shape[0], small.shape[1], dtype=tall.dtype, device=tall.device)
    for start, block in zip(range(0, tall.shape[0], ROWS), tall.split(ROWS)):
        out[start:start + block.shape[0]] = block.to(_F64) @ small
    return out


def noise_floor(top: torch.Tensor, tall: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of tall's float64 Gram matrix at or below this are rounding error, not signal: a sum of m
    products errs by up to about m·ε of the largest eigenvalue."""
    return top.clamp_min(0) * (max(tall.shape) * torch.finfo(_F64).eps)


def gram_eigen(tall: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, below the noise floor set to 0) and eigenvectors of tall's Gram matrix; `shape`
    (the matrix's own, tall or wide) is for the messages."""
    try:
        values, vectors = torch.linalg.eigh(gram(tall))
    except torch.linalg.LinAlgError:
        shape = tuple(shape)
        if not bool(torch.isfinite(tall).all()):
            raise MethodInputError(f"a {shape} matrix holds NaN or infinite values") from None
        raise MethodInputError(f"the eigendecomposition of a {shape} matrix's Gram matrix did not converge") from None
    values, vectors = values.flip(0), vectors.flip(1)
    values = torch.where(values > noise_floor(values[0], tall), values, torch.zeros_like(values))
    return values, vectors


def _reciprocal(values: torch.Tensor) -> torch.Tensor:
    """1 / values, 0 where a value is 0."""
    return torch.where(values > 0, 1 / values.clamp_min(torch.finfo(_F64).tiny), torch.zeros_like(values))


def top_singular(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m x k), S (k, float64), Vh (k x n) of the k largest singular values of `matrix`; U and Vh in the
    matrix's dtype. Singular values that are zero come with zero vectors."""
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix
    values, vectors = gram_eigen(tall, matrix.shape)
    s = values[:k].sqrt()
    right = vectors[:, :k]
    left = times(tall, right * _reciprocal(s))
    right = (right * (s > 0)).to(matrix.dtype)
    return (right, s, left.T) if wide else (left, s, right.T)


def polar_with_singular_values(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The polar factor U Vᵀ of `matrix` (its dtype) and its min(m, n) singular values (float64,
    descending)."""
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix
    values, vectors = gram_eigen(tall, matrix.shape)
    s = values.sqrt()
    factor = times(tall, (vectors * _reciprocal(s)) @ vectors.T)
    return (factor.T if wide else factor), s


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal rows or columns (orthogonal Procrustes): U Vᵀ of U S Vᵀ."""
    return polar_with_singular_values(matrix)[0]


def mean_task_vector(base: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """base + scale · mean(modelᵢ − base): the papers' rule for tensors that are not matrices."""
    mixed = torch.zeros_like(base)
    for t in tensors:
        mixed.add_(t - base)
    mixed.div_(len(tensors))
    if scale != 1.0:
        mixed.mul_(scale)
    return base + mixed
