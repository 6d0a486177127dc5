"""Small shared helpers for the geometric merge methods (slerp family, karcher, model_stock).

Several methods only need inner products between a handful of whole tensors and then output a linear
combination of those tensors. Rather than building unit vectors, tangent vectors and other full-size
temporaries, they compute the Gram matrix once (one pass over the data, one device-to-host copy of an
N x N matrix), do the small geometry in float64 on the host, and finish with a single weighted sum.

On CPU the inner products are float64 sums of float32 partial sums over blocks of 4096 products, each in
numpy's order (`block_sums`), so that the compiled loops that do the common case, two task vectors in
float32 (nuslerp and multislerp with a base: `pair_product_sums`, `pair_combine_into`; three:
`triple_product_sums`, `triple_combine_into`; up to eight: `product_sums`, `rows_merge_into`), give the numpy
path's bits; BLAS dots on a 1B merge left the two-model methods 2x slower than the loops. More than eight
vectors take blocked matrix products (their last bits then depend on the BLAS build).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mergesmith.methods import _kernels
from mergesmith.methods._parallel import in_parts
from mergesmith.methods._sums import run_sums
from mergesmith.methods._sparsify import RowSum, TaskVector, loop_operand, spans, zeros_operand

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Up to this many vectors, pairwise dot products; above, blocked matrix products (data read once).
_PAIRWISE_MAX = 8
# Columns per block in the blocked path (CPU: cache-sized; GPU: 64x larger, to limit kernel launches).
_CHUNK = 1 << 16
# Entries per float32 partial sum of inner products on CPU (the partial sums are added in float64): small
# enough that a compiled loop's products of a block stay in L1 (`_kernel_loops.pair_product_sums`).
PRODUCT_BLOCK = 4096


def block_sums(products: np.ndarray, block: int = PRODUCT_BLOCK) -> np.ndarray:
    """float32 sums of the consecutive `block`-entry runs of a flat chunk of products (the last run may be
    shorter), each in numpy's pairwise order: what `_kernel_loops.pair_product_sums` computes. The CPU's
    inner products are made of these, on both paths, so a compiled loop gives the bits numpy gives."""
    whole = products.size - products.size % block
    sums = run_sums(products[:whole].reshape(-1, block))
    if whole < products.size:
        sums = np.append(sums, run_sums(products[whole:]))
    return sums


def product_block_sums(models: Sequence[np.ndarray], base: np.ndarray, block: int = PRODUCT_BLOCK) -> np.ndarray:
    """The (blocks, pairs) float32 sums of dᵢ·dⱼ (pairs i <= j in row-major order: d0·d0, d0·d1, d1·d1 for
    two) over consecutive `block`-entry runs of the task vectors d = model - base of one chunk, for any number
    of models (`_kernel_loops.pair_product_sums`, `triple_product_sums`, `product_sums`; loop operands)."""
    count = len(models)
    sums = np.empty((-(-base.size // block), count * (count + 1) // 2), dtype=np.float32)
    loops = _kernels.loops()
    if count > 3:
        scratch = np.empty((count + 1, block), dtype=np.float32)  # the rows, then the products
        loops.product_sums(tuple(models), base, block, scratch[:count], scratch[count], sums)
    else:
        (loops.pair_product_sums if count == 2 else loops.triple_product_sums)(*models, base, block, sums)
    return sums


def total(sums: np.ndarray) -> float:
    """The float64 sum, in order, of float32 block sums: how the CPU paths finish an inner product."""
    return float(np.add.reduce(sums, dtype=np.float64))


# How many vectors the compiled loops take at once (`_kernel_loops`' pair, triple and general loops).
_LOOP_COUNTS = range(2, _PAIRWISE_MAX + 1)


def _compiled(models: Sequence[torch.Tensor], base: torch.Tensor | None, dtype: torch.dtype | None) -> bool:
    """Whether `_kernels`' loops do the work for two to eight vectors (task vectors against `base`, when given)
    in float32 on CPU."""
    reference = base if base is not None else models[0]
    return (len(models) in _LOOP_COUNTS and dtype in (None, torch.float32) and reference.dtype != torch.float64
            and all(TaskVector(m, reference, torch.float32).compiled() for m in models))


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
    if not wide and _compiled(vectors, base, dtype):
        return _symmetric(_compiled_gram(flats, base.reshape(-1) if base is not None else None, chunk), n)
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
    """Dot products of every pair i <= j (row-major upper triangle) as a float64 CPU vector: BLAS dot (not
    subject to TF32), except for float32 vectors on CPU, the cases the compiled loops do, whose products are
    summed as they sum them (the float64 sum of their `block_sums`)."""
    n = len(flats)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    if n in _LOOP_COUNTS and flats[0].device.type == "cpu" and flats[0].dtype == torch.float32:
        return torch.tensor([total(block_sums((flats[i] * flats[j]).numpy())) for i, j in pairs], dtype=torch.float64)
    return torch.stack([torch.dot(flats[i], flats[j]) for i, j in pairs]).to(torch.float64).cpu()


def _compiled_gram(flats: Sequence[torch.Tensor], base: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """`gram`'s upper triangle for two to eight vectors (task vectors against `base`, when given) with
    `_kernel_loops`' product sums, the chunks shared between the CPU's threads and their sums added in chunk
    order afterwards (as `_pair_dots` adds them)."""
    operands = [loop_operand(f) for f in flats]
    below_all = None if base is None else loop_operand(base)
    pairs = len(flats) * (len(flats) + 1) // 2

    def share(part):
        found = []
        for s, e in part:
            below = zeros_operand(e - s) if below_all is None else below_all[s:e]  # no base: minus zeros, exact
            sums = product_block_sums([o[s:e] for o in operands], below)
            found.append([total(sums[:, k]) for k in range(pairs)])
        return found

    entries = torch.zeros(pairs, dtype=torch.float64)
    for part in in_parts(spans(flats[0].numel(), chunk), share, flats[0].device):
        for chunk_entries in part:
            entries += torch.tensor(chunk_entries, dtype=torch.float64)
    return entries


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
    models: Sequence[torch.Tensor], base: torch.Tensor, coefficients: Sequence[float], dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`base + Σ cᵢ·(modelsᵢ − base)` in `dtype` (default: the base's), chunk by chunk from the inputs as stored
    (bf16 as read): each chunk's task vectors are computed in `dtype` and scaled by their coefficients (each
    product rounded), added up, then the base added. Two to eight float32 task vectors on CPU take one compiled
    loop (`_kernel_loops.pair_combine_into`, `triple_combine_into`, `rows_merge_into`: the same operations),
    which writes a bf16 `output_dtype` directly (`_kernels.OutputChunks`); otherwise the result is in `dtype`."""
    dtype = dtype or base.dtype
    compiled = _compiled(models, base, dtype)
    out = torch.empty(base.shape, dtype=_kernels.result_dtype(dtype, output_dtype, compiled), device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    length = flat_out.numel()
    chunk = min(_CHUNK << 2 if out.device.type == "cpu" else length, max(length, 1))
    if compiled:
        _compiled_combine(flats, flat_base, [np.float32(c) for c in coefficients], flat_out, chunk)
        return out
    base_buf, delta_buf = (torch.empty(chunk, dtype=dtype, device=base.device) for _ in range(2))
    for s in range(0, length, chunk):
        e = min(length, s + chunk)
        b = base_buf[: e - s].copy_(flat_base[s:e])
        o = flat_out[s:e].copy_(flats[0][s:e]).sub_(b).mul_(float(coefficients[0]))
        for flat, c in zip(flats[1:], coefficients[1:]):
            o.add_(delta_buf[: e - s].copy_(flat[s:e]).sub_(b).mul_(float(c)))  # rounded, then added (no fused alpha)
        o.add_(b)
    return out


def _compiled_combine(flats: Sequence[torch.Tensor], base: torch.Tensor, coefficients: list, flat_out: torch.Tensor, chunk: int) -> None:
    """`combine_task_vectors`' chunks with `_kernel_loops.pair_combine_into`, `triple_combine_into` or, for four
    or more task vectors, `rows_merge_into`'s sum (each delta times its coefficient, added in order, then the
    base: the same operations), shared between the CPU's threads."""
    operands, below = [loop_operand(f) for f in flats], loop_operand(base)

    def share(part):
        outputs = _kernels.OutputChunks(flat_out, chunk)
        if len(operands) > 3:
            summed = RowSum(coefficients, 1)
            for s, e in part:
                summed.into([o[s:e] for o in operands], below[s:e], outputs.direct(s, e))
            return
        loops = _kernels.loops()
        combine_into = loops.pair_combine_into if len(operands) == 2 else loops.triple_combine_into
        for s, e in part:
            combine_into(*(o[s:e] for o in operands), below[s:e], *coefficients, outputs.direct(s, e))

    in_parts(spans(base.numel(), chunk), share, base.device)
