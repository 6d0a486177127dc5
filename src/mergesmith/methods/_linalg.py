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


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner products between all pairs of `vectors` (any shapes, equal numel, any float dtypes), as a
    float64 CPU matrix.

    On CPU the vectors are read in cache-sized chunks, converted to the reduction dtype (float32; float64
    if any input is float64) as they go, and each chunk's dot products (BLAS, float32) are summed in float64:
    no full-size converted copy of an input is made, so inputs can stay as read (bf16). Other devices take
    the whole vectors at once; only the N x N result is copied to the host (one sync).
    """
    n = len(vectors)
    if n == 0:
        return torch.zeros((0, 0), dtype=torch.float64)
    work = torch.float64 if any(v.dtype == torch.float64 for v in vectors) else torch.float32
    flats = [v.reshape(-1) for v in vectors]
    length = flats[0].numel()
    on_cpu = flats[0].device.type == "cpu"
    if not on_cpu or n > _PAIRWISE_MAX:
        return _gram_blocked([f.to(work) for f in flats])
    chunk = min(_CHUNK << 2, max(length, 1))
    bufs = [torch.empty(chunk, dtype=work) for _ in flats]
    result = torch.zeros((n, n), dtype=torch.float64)
    for start in range(0, length, chunk):
        end = min(length, start + chunk)
        parts = [f[start:end] if f.dtype == work else buf[: end - start].copy_(f[start:end]) for f, buf in zip(flats, bufs)]
        dots = torch.stack([torch.dot(parts[i], parts[j]) for i in range(n) for j in range(i, n)]).to(torch.float64)
        k = 0
        for i in range(n):
            for j in range(i, n):
                result[i, j] += dots[k]
                k += 1
    return _symmetrize(result)


def _symmetrize(upper: torch.Tensor) -> torch.Tensor:
    """Fill the lower triangle from the upper one."""
    return torch.triu(upper) + torch.triu(upper, diagonal=1).T


def _gram_blocked(flats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Many vectors (or a GPU): stack cache-sized column blocks and use matrix products, reading the data
    once. On CUDA a float32 matmul may run in TF32, so the blocks are then multiplied in float64."""
    n = len(flats)
    if n <= _PAIRWISE_MAX:  # pairwise dots: no stacking, and BLAS dot is not subject to TF32
        entries = torch.stack([torch.dot(flats[i], flats[j]) for i in range(n) for j in range(i, n)]).to(torch.float64).cpu()
        result = torch.zeros((n, n), dtype=torch.float64)
        k = 0
        for i in range(n):
            for j in range(i, n):
                result[i, j] = entries[k]
                k += 1
        return _symmetrize(result)
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
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`start + Σ cᵢ·vᵢ` (start defaults to zero), in `dtype` (default: the first vector's), on its device.
    The vectors may be in a narrower dtype (bf16 as read): they are added in place, so in `dtype`.

    With `scratch`, the vectors are temporaries the caller owns and the first one holds the result.
    """
    if scratch:
        out = vectors[0].mul_(float(coefficients[0]))
        for vector, c in zip(vectors[1:], coefficients[1:]):
            out.add_(vector, alpha=float(c))
        return out if start is None else out.add_(start)
    if start is None:
        out = vectors[0].to(dtype or vectors[0].dtype, copy=True).mul_(float(coefficients[0]))
        rest = zip(vectors[1:], coefficients[1:])
    else:
        out = start.to(dtype or start.dtype, copy=True)
        rest = zip(vectors, coefficients)
    for vector, c in rest:
        out.add_(vector, alpha=float(c))
    return out
