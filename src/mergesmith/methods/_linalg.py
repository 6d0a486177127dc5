"""Small shared helpers for the geometric merge methods (slerp family, karcher, model_stock).

Several methods only need inner products between a handful of whole tensors and then output a linear
combination of those tensors. Rather than building unit vectors, tangent vectors and other full-size
temporaries, they compute the Gram matrix once (one pass over the data, one device-to-host copy of an
N x N matrix), do the small geometry in float64 on the host, and finish with a single weighted sum.
"""

from __future__ import annotations

from typing import Sequence

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Above this many vectors, stacking them and using one matrix product beats pairwise dot products.
_PAIRWISE_MAX = 4
# Elements per chunk when the Gram matrix is accumulated in float64 on a reduced-precision GPU path.
_CHUNK = 1 << 22


def reduce_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype reductions run in: float64 stays float64, everything else is done in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def as_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view (or copy) of `tensor` in its reduction dtype."""
    return tensor.reshape(-1).to(reduce_dtype(tensor))


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner products between all pairs of `vectors` (any shapes, equal numel), as a float64 CPU matrix.

    The sums run on the vectors' device in float32 (float64 inputs: float64). On CUDA with TF32 or
    bf16 matmuls enabled, a matrix product would silently lose precision, so the products are then
    accumulated chunk by chunk in float64 instead.
    """
    flats = [as_reduce(v) for v in vectors]
    n = len(flats)
    if n == 0:
        return torch.zeros((0, 0), dtype=torch.float64)
    if n <= _PAIRWISE_MAX:
        entries = []
        for i in range(n):
            for j in range(i, n):
                entries.append(torch.dot(flats[i], flats[j]))
        values = torch.stack(entries).to(device="cpu", dtype=torch.float64)
        out = torch.empty((n, n), dtype=torch.float64)
        k = 0
        for i in range(n):
            for j in range(i, n):
                out[i, j] = out[j, i] = values[k]
                k += 1
        return out
    matrix = torch.stack(flats)
    exact_matmul = matrix.device.type == "cpu" or torch.get_float32_matmul_precision() == "highest"
    if exact_matmul or matrix.dtype == torch.float64:
        result = matrix @ matrix.T
    else:
        result = torch.zeros((n, n), dtype=torch.float64, device=matrix.device)
        for start in range(0, matrix.shape[1], _CHUNK):
            block = matrix[:, start : start + _CHUNK].to(torch.float64)
            result += block @ block.T
    return result.to(device="cpu", dtype=torch.float64)


def combine(
    vectors: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    *,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """`start + Σ cᵢ·vᵢ` (start defaults to zero), in the dtype and device of the first vector."""
    if start is None:
        out = vectors[0] * float(coefficients[0])
        rest = zip(vectors[1:], coefficients[1:])
    else:
        out = start.clone()
        rest = zip(vectors, coefficients)
    for vector, c in rest:
        out.add_(vector, alpha=float(c))
    return out
