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
# Up to this many vectors, pairwise dot products; above, blocked matrix products (data read once).
_PAIRWISE_MAX = 8
# Columns per block in the blocked path (CPU: cache-sized; GPU: 64x larger, to limit kernel launches).
_CHUNK = 1 << 16


def reduce_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype reductions run in: float64 stays float64, everything else is done in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def as_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view (or copy) of `tensor` in its reduction dtype."""
    return tensor.reshape(-1).to(reduce_dtype(tensor))


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner products between all pairs of `vectors` (any shapes, equal numel), as a float64 CPU matrix.

    The sums run on the vectors' device in float32 (float64 inputs: float64), and only the N x N
    result is copied to the host (one sync).
    """
    flats = [as_reduce(v) for v in vectors]
    n = len(flats)
    if n == 0:
        return torch.zeros((0, 0), dtype=torch.float64)
    if n <= _PAIRWISE_MAX:
        # Pairwise dot products: no extra copies of the data, and BLAS dot is not subject to TF32.
        entries = [torch.dot(flats[i], flats[j]) for i in range(n) for j in range(i, n)]
        values = torch.stack(entries).to(device="cpu", dtype=torch.float64).tolist()
        out = torch.empty((n, n), dtype=torch.float64)
        k = 0
        for i in range(n):
            for j in range(i, n):
                out[i, j] = out[j, i] = values[k]
                k += 1
        return out
    # Many vectors: stack cache-sized column blocks and use matrix products, reading the data once.
    # On CUDA a float32 matmul may run in TF32, so the blocks are then multiplied in float64.
    exact = flats[0].device.type == "cpu" or torch.get_float32_matmul_precision() == "highest"
    block_dtype = flats[0].dtype if exact else torch.float64
    result = torch.zeros((n, n), dtype=torch.float64, device=flats[0].device)
    length = flats[0].numel()
    chunk = _CHUNK if flats[0].device.type == "cpu" else _CHUNK << 6
    for start in range(0, length, chunk):
        block = torch.stack([f[start : start + chunk] for f in flats]).to(block_dtype)
        result += (block @ block.T).to(torch.float64)
    return result.cpu()


def combine(
    vectors: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    *,
    start: torch.Tensor | None = None,
    scratch: bool = False,
) -> torch.Tensor:
    """`start + Σ cᵢ·vᵢ` (start defaults to zero), in the dtype and device of the first vector.

    With `scratch`, the vectors are temporaries the caller owns and the first one holds the result.
    """
    if scratch:
        out = vectors[0].mul_(float(coefficients[0]))
        for vector, c in zip(vectors[1:], coefficients[1:]):
            out.add_(vector, alpha=float(c))
        return out if start is None else out.add_(start)
    if start is None:
        out = vectors[0] * float(coefficients[0])
        rest = zip(vectors[1:], coefficients[1:])
    else:
        out = start.clone()
        rest = zip(vectors, coefficients)
    for vector, c in rest:
        out.add_(vector, alpha=float(c))
    return out
