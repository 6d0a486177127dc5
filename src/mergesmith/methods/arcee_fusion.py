"""Arcee Fusion: keep the base, and adopt the other model's value only where it changed in an important way.

With δ = other − base, each element's importance is |δ| times the KL divergence between softmax(other)
and softmax(base) taken along the tensor's last axis (one divergence per row; a 1-D tensor is one row):

    p = softmax(other) + 1e-8,  q = softmax(base) + 1e-8,  KL = Σ p·log(p/q)
    importance = |δ| · KL(row)

The threshold is median + 1.5·(Q3 − Q1) over all importances of the tensor (an outlier fence), where
the quartiles are order statistics: the element of rank ⌊q·(n−1)⌋ (0-based) in sorted order. Elements
with importance ≥ threshold take the other model's value; the rest keep the base.

Difference from mergekit: mergekit estimates the quartiles of tensors with more than 10⁶ elements from
10⁶ values drawn with replacement by an *unseeded* generator, so its output for large tensors changes
from run to run. We use the exact order statistics at every size (agreeing with mergekit exactly up to
10⁶ elements): reproducible, and no sampling error. Fused elements are the other model's value itself
rather than base + (other − base) (a rounding-level difference).
Identical models give importance 0 everywhere, threshold 0, and return the (equal) inputs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mergesmith.methods import _kernels
from mergesmith.methods._parallel import in_parts
from mergesmith.methods._sparsify import StoredValues, TaskVector, chunk_size, loop_operand, select_top, spans
from mergesmith.methods.registry import merge_method

PROB_EPS = 1e-8
# Larger tensors find their quartiles with `select_top`, smaller ones with np.partition (5632x2048 float32
# importances, two threads: 2^19 entries 7-9 ns an entry against 21; up to 2^18 `select_top` finishes on the
# whole tensor with its own partitions, 24-28 ns).
SELECT_FROM = 1 << 18


# Entries per block of rows. Below this, torch's ~15 calls a block cost more than the cache misses of larger
# blocks save (5632x2048 bf16, 2 threads: 2^16 1.7-1.8 ns an entry, 2^18 1.4-1.5; the same importances).
ROW_BLOCK = 1 << 18


def _row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    per = max(1, ROW_BLOCK // max(cols, 1))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def importance_scores(other: torch.Tensor, base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """|other − base| scaled by the per-row KL(softmax(other) ‖ softmax(base)), in `dtype` (default: the
    base's), computed in blocks of rows from the inputs as stored (each block converted as it is used)."""
    dtype = dtype or base.dtype
    o_rows, b_rows = other.reshape(-1, other.shape[-1]), base.reshape(-1, base.shape[-1])
    scores = torch.empty(o_rows.shape, dtype=dtype, device=base.device)
    compiled = TaskVector(other, base, dtype).compiled()  # the last step as one loop, on the inputs as stored

    def blocks(share):
        for r0, r1 in share:
            o, b = o_rows[r0:r1].to(dtype), b_rows[r0:r1].to(dtype)
            p = torch.softmax(o, dim=-1).add_(PROB_EPS)
            q = torch.softmax(b, dim=-1).add_(PROB_EPS)
            kl = torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True)
            if compiled:
                _kernels.loops().scaled_magnitudes_into(
                    loop_operand(o_rows[r0:r1]), loop_operand(b_rows[r0:r1]), kl.view(-1).numpy(), scores[r0:r1].numpy())
            else:
                torch.sub(o, b, out=scores[r0:r1]).abs_().mul_(kl)

    in_parts(_row_blocks(*o_rows.shape), blocks, base.device)
    return scores.view(other.shape)


def quartiles(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, median, Q3): the elements of 0-based rank ⌊q·(n−1)⌋ of `flat` in ascending order, exact at any size."""
    last = flat.numel() - 1
    ranks = [last // 4, last // 2, (3 * last) // 4]
    large = flat.numel() > SELECT_FROM and flat.dtype in (torch.float32, torch.float64)
    if large and bool(flat.min() >= 0):
        # importances >= 0 (a row's KL can round below 0: then not) are their own magnitudes: rank r ascending
        # is the (n - r)-th largest, which `select_top` finds for the three ranks in one chunked pass
        cuts = select_top(StoredValues(flat), [flat.numel() - r for r in ranks], chunk_size(flat))
        picked = torch.tensor([cut.threshold for cut in cuts], dtype=flat.dtype)
    elif flat.device.type == "cpu":
        # One multi-rank selection (introselect), O(n), instead of a full sort.
        values = np.partition(flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32).numpy(), ranks)
        picked = torch.from_numpy(values[ranks]).to(flat.dtype)
    else:
        picked = torch.sort(flat).values[ranks]  # GPU radix sort beats per-slice selection
    return picked[0], picked[1], picked[2]


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    q1, median, q3 = quartiles(importance.reshape(-1))
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    base="required",
    min_models=1,
    max_models=1,
    converts_inputs=True,
    rounds_output=True,
    reference="https://arcee.ai",
)
def arcee_fusion(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, compute_dtype: torch.dtype | None = None,
                 output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Take the other model's value where its importance reaches the outlier fence; keep the base elsewhere."""
    dtype = compute_dtype or base.dtype
    other = tensors[0]
    if other.numel() == 0:
        return base.to(dtype, copy=True)
    shaped_other = other.reshape(1) if other.dim() == 0 else other
    shaped_base = base.reshape(1) if base.dim() == 0 else base
    importance = importance_scores(shaped_other, shaped_base, dtype)
    threshold = fusion_threshold(importance)
    inputs = TaskVector(shaped_other, shaped_base, dtype)
    if inputs.compiled():
        return _choose_compiled(inputs, importance, threshold, output_dtype).reshape(base.shape)
    # the importances' storage becomes the output, block by block
    rows = importance.view(-1, importance.shape[-1])
    o_rows, b_rows = shaped_other.reshape(rows.shape), shaped_base.reshape(rows.shape)

    def blocks(share):
        for r0, r1 in share:
            fused = rows[r0:r1] >= threshold
            torch.where(fused, o_rows[r0:r1].to(dtype), b_rows[r0:r1].to(dtype), out=rows[r0:r1])

    in_parts(_row_blocks(*rows.shape), blocks, base.device)
    return importance.reshape(base.shape)


def _choose_compiled(inputs: TaskVector, importance: torch.Tensor, threshold: torch.Tensor,
                     output_dtype: torch.dtype | None) -> torch.Tensor:
    """The output pass as one compiled loop a chunk, on the inputs as stored (`_kernels.choose_into`): into
    the float32 importances' own storage, or straight into a bf16 output. torch's compare and `where` on
    float32 copies of both inputs took ~1.4 ns an entry on two threads; the loop ~0.3."""
    flat_importance = importance.reshape(-1)
    out_dtype = _kernels.result_dtype(torch.float32, output_dtype, True)
    flat_out = flat_importance if out_dtype == torch.float32 else torch.empty(flat_importance.shape, dtype=out_dtype)
    fence = np.float32(threshold.item())
    loops = _kernels.loops()

    def work(chunks: list[tuple[int, int]]) -> None:
        outputs = _kernels.OutputChunks(flat_out, max(e - s for s, e in chunks))
        for s, e in chunks:
            loops.choose_into(flat_importance[s:e].numpy(), fence, *inputs.operands(s, e), outputs.target(s, e))
            outputs.done(s, e)

    in_parts(spans(flat_out.numel(), chunk_size(flat_out)), work, flat_out.device)
    return flat_out
