"""Model Stock (arXiv 2403.19522): move from the base towards the fine-tunes' average by a factor set by
the angle between their task vectors.

With N ≥ 2 fine-tunes wᵢ, task vectors δᵢ = wᵢ − w₀ and cos θ the mean pairwise cosine between the δᵢ
(each pair's cosine is δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), clamped to [−1, 1]):

    t = N·cos θ / (1 + (N − 1)·cos θ)          result = t·mean(wᵢ) + (1 − t)·w₀

With `filter_wise: false` (default) the cosine is taken over whole tensors; with `filter_wise: true` it
is taken per slice along the last axis (per row of a matrix; a 1-D tensor counts as one slice), giving
one t per row.

Difference from mergekit: t is clamped to [0, 1]. The paper's derivation assumes the fine-tunes are
spread at a common positive angle; when the task vectors point in opposing directions cos θ < 0 and
mergekit's t goes negative (extrapolating away from the fine-tunes), and it grows without bound as
1 + (N − 1)·cos θ approaches 0 (mergekit keeps the base only at exactly |denominator| < 1e-6). With the
clamp, any negative cosine keeps the base, and the singular point is no longer special. For cos θ ≥ 0 the
formula already lies in [0, 1] and nothing changes. Zero task vectors have cosine 0, hence t = 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mergesmith.methods import _kernels
from mergesmith.methods._linalg import PRODUCT_BLOCK, block_sums, product_block_sums, total
from mergesmith.methods._parallel import in_parts
from mergesmith.methods._sparsify import RowSum, TaskVector, chunk_size, models_and_base, spans
from mergesmith.methods.registry import Param, merge_method

PAIR_NORM_FLOOR = 1e-6


def stock_ratio(cos_theta: torch.Tensor, n: int) -> torch.Tensor:
    """t = N·cos/(1 + (N−1)·cos), clamped to [0, 1] (0 wherever cos ≤ 0)."""
    cos_theta = cos_theta.clamp(min=0.0)
    return (n * cos_theta / (1 + (n - 1) * cos_theta)).clamp(0.0, 1.0)


def _mean_pairwise_cosine(dots: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i < j of dots[i, j] / max(norms[i]·norms[j], 1e-6), each clamped to [-1, 1]; the pair
    axes come first, any further axes (rows) are kept."""
    n = norms.shape[0]
    total = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            total += (dots[i, j] / (norms[i] * norms[j]).clamp(min=PAIR_NORM_FLOOR)).clamp(-1.0, 1.0)
    return total / (n * (n - 1) // 2)


@merge_method(
    "model_stock",
    params=[Param("filter_wise", bool, default=False, doc="Compute the angle per row instead of per tensor.")],
    base="required",
    min_models=2,
    converts_inputs=True,
    rounds_output=True,
    reference="https://arxiv.org/abs/2403.19522",
)
def model_stock(
    tensors: Sequence[torch.Tensor], *, base: torch.Tensor, filter_wise: bool = False, compute_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Interpolate between the base and the fine-tunes' average by the angle-derived ratio t.

    Two passes over chunks (blocks of whole rows with `filter_wise`), each shared between the CPU's threads
    (`in_parts`): the first takes the task vectors' inner products per chunk (per tensor, or per row), summed
    over the chunks in their order afterwards, so the sums do not depend on the thread count; the second
    writes w₀ + t·mean(δᵢ), rounded once into `output_dtype` when that is narrower (no full-size result in
    the compute dtype). No task vector is stored; inputs may be in a narrower dtype than `compute_dtype`
    (bf16 as read)."""
    n, dtype = len(tensors), compute_dtype or base.dtype
    tvs = [TaskVector(t, base, dtype) for t in tensors]
    if filter_wise and base.dim() > 1:  # blocks of whole rows, one t per row
        rows, width = base.shape[0], base.numel() // base.shape[0]
        per = max(1, chunk_size(base) // max(width, 1))
        units = [(r * width, min(rows, r + per) * width, r, min(rows, r + per)) for r in range(0, rows, per)]
    else:  # flat chunks, one t for the tensor
        rows, width = 1, None
        units = [(s, e, 0, 1) for s, e in spans(base.numel(), chunk_size(base))]
    unit_size = max(e - s for s, e, _, _ in units)
    block = width or PRODUCT_BLOCK  # the runs whose products are summed in float32 (on CPU)
    # two float32 task vectors on CPU: both passes as compiled loops on the inputs as stored (bf16 as read)
    compiled = n == 2 and all(tv.compiled() for tv in tvs)
    # three or more on flat chunks: the task vectors as float32 rows made by the loops, the same products and
    # sums as the torch path (its bits), without its per-chunk tensors (1B, three fine-tunes: 9.6 s, 2.9x linear)
    rows_compiled = n > 2 and width is None and all(tv.compiled() for tv in tvs)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    # float32 on CPU: products summed in the compiled loop's blocks, so both paths give the same bits; other
    # dtypes (numpy has no bfloat16, and sums float16 in float16) and devices: torch's products in `dtype`
    blocked = base.device.type == "cpu" and dtype == torch.float32

    def inner_products(share):
        """Per unit of the share, the float32 sums of its blocks' products, a column per pair i <= j (float32 on
        CPU), or a float64 product per pair (per row with `filter_wise`) elsewhere."""
        if compiled or rows_compiled:  # the products' block sums in one loop a chunk
            return [product_block_sums(*models_and_base(tvs, s, e), block) for s, e, _, _ in share]
        bufs = [tv.buffer(unit_size) for tv in tvs]
        found = []
        for s, e, r0, r1 in share:
            ds = [tv.chunk(s, e, buf[: e - s]) for tv, buf in zip(tvs, bufs)]
            if blocked:
                found.append(np.stack([block_sums((ds[i] * ds[j]).numpy(), block) for i, j in pairs], axis=1))
            elif width is None:
                found.append([torch.dot(ds[i], ds[j]).double() for i, j in pairs])
            else:
                found.append([(ds[i] * ds[j]).view(r1 - r0, -1).sum(dim=1).double() for i, j in pairs])
        return found

    per_unit = [products for share in in_parts(units, inner_products, base.device) for products in share]
    dots = torch.zeros((n, n, rows), dtype=torch.float64, device=base.device)
    for (_, _, r0, r1), products in zip(units, per_unit):  # summed in float64 in unit order, as one thread would
        for p, (i, j) in enumerate(pairs):
            if isinstance(products, np.ndarray):  # CPU: the blocks' float32 sums
                column = products[:, p]
                dots[i, j, r0:r1] += total(column) if width is None else torch.from_numpy(column.astype(np.float64))
            else:
                dots[i, j, r0:r1] += products[p]
    norms = torch.stack([dots[i, i] for i in range(n)]).clamp(min=0).sqrt()
    t_over_n = stock_ratio(_mean_pairwise_cosine(dots, norms), n).div_(n).to(dtype)  # applied to Σ δᵢ
    loops_write = compiled or rows_compiled
    out = torch.empty(base.shape, dtype=_kernels.result_dtype(dtype, output_dtype, True) if loops_write else output_dtype or dtype,
                      device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)

    def write(share):
        bufs = [tv.buffer(unit_size) for tv in tvs]
        # with a narrower output, each chunk's result in the compute dtype, then rounded once into it
        scratch = None if out.dtype == dtype else torch.empty(unit_size, dtype=dtype, device=base.device)
        for s, e, r0, r1 in share:
            ds = [tv.chunk(s, e, buf[: e - s]) for tv, buf in zip(tvs, bufs)]
            total = ds[0]
            for d in ds[1:]:
                total.add_(d)
            result = flat_out[s:e] if scratch is None else scratch[: e - s]
            rows_out = result.view(r1 - r0, -1)
            torch.mul(total.view(r1 - r0, -1), t_over_n[r0:r1, None], out=rows_out).add_(flat_base[s:e].view(r1 - r0, -1))
            if scratch is not None:
                flat_out[s:e].copy_(result)

    def write_compiled(share):
        outputs = _kernels.OutputChunks(flat_out, unit_size)
        ratios = t_over_n.numpy()
        for s, e, r0, r1 in share:
            models, below = models_and_base(tvs, s, e)
            _kernels.loops().stock_into(*models, below, ratios[r0:r1], width or (e - s), outputs.direct(s, e))

    def write_rows(share):
        """Three or more models: Σ δᵢ · t/n + base (`rows_merge_into`'s sum: the torch path's additions in model
        order, then the multiplication and the base's addition, each rounded as torch rounds them)."""
        outputs, summed = _kernels.OutputChunks(flat_out, unit_size), RowSum([1] * n, float(t_over_n[0]))
        for s, e, _, _ in share:
            summed.into(*models_and_base(tvs, s, e), outputs.direct(s, e))

    in_parts(units, write_compiled if compiled else write_rows if rows_compiled else write, base.device)
    return out
