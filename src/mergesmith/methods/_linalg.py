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


def gram(vectors: Sequence[torch.Tensor], dtype: torch.dtype | None = None, *, base: torch.Tensor | None = None) -> torch.Tensor:
    """Inner products between all pairs of `vectors` (any shapes, equal numel, any float dtypes), as a
    float64 CPU matrix, computed in the reduction dtype of `dtype` (default: of the inputs; float64 if any is).
    With `base`, of the task vectors `vectors[i] - base` instead, each subtraction made in `dtype` (rounded
    there, as whole tensors would be; default: the inputs' promoted dtype) and then reduced in the work dtype.

    On CPU the vectors are read in cache-sized chunks and converted (and the base subtracted) as they go, and
    each chunk's dot products (BLAS) are summed in float64: no full-size converted copy of an input, nor a task
    vector, is made, so inputs can stay as read (bf16). Other devices take the whole vectors at once; only the
    N x N result is copied to the host (one sync).
    """
    n = len(vectors)
    if n == 0:
        return torch.zeros((0, 0), dtype=torch.float64)
    inputs = list(vectors) + ([base] if base is not None else [])
    wide = dtype == torch.float64 or any(v.dtype == torch.float64 for v in inputs)
    work = torch.float64 if wide else torch.float32
    flats = [v.reshape(-1) for v in vectors]
    if flats[0].device.type != "cpu" or n > _PAIRWISE_MAX:
        if base is not None:
            delta_dtype = dtype or torch.promote_types(flats[0].dtype, base.dtype)
            flats = [f.to(delta_dtype) - base.reshape(-1).to(delta_dtype) for f in flats]
        return _gram_blocked([f.to(work) for f in flats])
    length = flats[0].numel()
    chunk = min(_CHUNK << 2, max(length, 1))
    bufs = [torch.empty(chunk, dtype=work) for _ in flats]
    if base is not None:  # task vectors in the compute dtype (rounded there, as subtracting whole tensors would)
        delta_dtype = dtype or torch.promote_types(flats[0].dtype, base.dtype)
        base_buf, delta_buf = (torch.empty(chunk, dtype=delta_dtype) for _ in range(2))
    entries = torch.zeros(n * (n + 1) // 2, dtype=torch.float64)
    for start in range(0, length, chunk):
        end = min(length, start + chunk)
        if base is None:
            parts = [f[start:end] if f.dtype == work else buf[: end - start].copy_(f[start:end]) for f, buf in zip(flats, bufs)]
        else:
            b = base_buf[: end - start].copy_(base.reshape(-1)[start:end])
            parts = [buf[: end - start].copy_(delta_buf[: end - start].copy_(f[start:end]).sub_(b)) for f, buf in zip(flats, bufs)]
        entries += _pair_dots(parts)
    return _symmetric(entries, n)


def _pair_dots(flats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dot products of every pair i <= j (row-major upper triangle), BLAS dot (not subject to TF32), as a
    float64 CPU vector."""
    n = len(flats)
    return torch.stack([torch.dot(flats[i], flats[j]) for i in range(n) for j in range(i, n)]).to(torch.float64).cpu()


def _symmetric(upper_entries: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric n x n matrix whose upper triangle (row-major) is `upper_entries`."""
    upper = torch.zeros((n, n), dtype=torch.float64)
    rows, cols = torch.triu_indices(n, n)
    upper[rows, cols] = upper_entries
    return upper + torch.triu(upper, diagonal=1).T


def _gram_blocked(flats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Many vectors (or a GPU): stack cache-sized column blocks and use matrix products, reading the data
    once. On CUDA a float32 matmul may run in TF32, so the blocks are then multiplied in float64."""
    n = len(flats)
    if n <= _PAIRWISE_MAX:
        return _symmetric(_pair_dots(flats), n)
    exact = flats[0].device.type == "cpu" or torch.get_float32_matmul_precision() == "highest"
    block_dtype = flats[0].dtype if exact else torch.float64
    result = torch.zeros((n, n), dtype=torch.float64, device=flats[0].device)
    length = flats[0].numel()
    chunk = _CHUNK if flats[0].device.type == "cpu" else _CHUNK << 6
    for start in range(0, length, chunk):
        block = torch.stack([f[start : start + chunk] for f in flats]).to(block_dtype)
        result += (block @ block.T).to(torch.float64)
    return result.cpu()


def combine(vectors: Sequence[torch.Tensor], coefficients: Sequence[float], *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`Σ cᵢ·vᵢ` in `dtype` (default: the first vector's), on its device. The vectors may be in a narrower
    dtype (bf16 as read): they are added in place, so in `dtype`. On CPU the sum is built chunk by chunk, so
    each output chunk is written once and stays in cache while the terms are added. (Task vectors against
    a base: `combine_task_vectors`.)"""
    first = vectors[0]
    out = torch.empty(first.shape, dtype=dtype or first.dtype, device=first.device)
    flat_out, flat_first = out.view(-1), first.reshape(-1)
    c0 = float(coefficients[0])
    terms = [(v.reshape(-1), float(c)) for v, c in zip(vectors[1:], coefficients[1:])]
    length = flat_out.numel()
    chunk = _CHUNK << 2 if out.device.type == "cpu" else max(length, 1)
    for s in range(0, length, chunk):
        e = min(length, s + chunk)
        o = flat_out[s:e].copy_(flat_first[s:e]).mul_(c0)
        for vector, c in terms:
            o.add_(vector[s:e], alpha=c)
    return out


def combine_task_vectors(
    models: Sequence[torch.Tensor], base: torch.Tensor, coefficients: Sequence[float], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`base + Σ cᵢ·(modelsᵢ − base)` in `dtype` (default: the base's), chunk by chunk from the inputs as stored
    (bf16 as read): each chunk's task vectors are computed in `dtype`, the first scaled, the others added with
    their coefficients, then the base: per entry the operations of scaling whole task vectors in place and
    adding them up, without making them."""
    dtype = dtype or base.dtype
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    length = flat_out.numel()
    chunk = min(_CHUNK << 2 if out.device.type == "cpu" else length, max(length, 1))
    base_buf, delta_buf = (torch.empty(chunk, dtype=dtype, device=base.device) for _ in range(2))
    for s in range(0, length, chunk):
        e = min(length, s + chunk)
        b = base_buf[: e - s].copy_(flat_base[s:e])
        o = flat_out[s:e].copy_(flats[0][s:e]).sub_(b).mul_(float(coefficients[0]))
        for flat, c in zip(flats[1:], coefficients[1:]):
            o.add_(delta_buf[: e - s].copy_(flat[s:e]).sub_(b), alpha=float(c))
        o.add_(b)
    return out
