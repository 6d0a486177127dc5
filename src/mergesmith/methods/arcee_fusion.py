"""Arcee Fusion: keep the base, and adopt the other model's value only where it changed in an important way.

With δ = other − base, each element's importance is |δ| times the KL divergence between softmax(other)
and softmax(base) taken along the tensor's last axis (one divergence per row; a 1-D tensor is one row):

    p = softmax(other) + 1e-8,  q = softmax(base) + 1e-8,  KL = Σ p·log(p/q)
    importance = |δ| · KL(row)

The threshold is median + 1.5·(Q3 − Q1) over all importances of the tensor (an outlier fence), where
the quartiles are order statistics: the element of rank ⌊q·(n−1)⌋ (0-based) in sorted order. Elements
with importance ≥ threshold take the other model's value; the rest keep the base.

Differences from mergekit:
- The divergences are accurate: within ~10⁻⁶ of the float64 formula (`_divergence_loops` on CPU for
  float32 and bf16 inputs, float64 torch otherwise), unless the compute dtype is 16-bit (mergekit's
  arithmetic, `--compute-dtype bfloat16`: then its formula in that dtype). mergekit evaluates the formula
  in the tensor's dtype, and for the near-uniform softmaxes of weight rows float32 rounding is of the size
  of the divergence (on the bench's 1B models up to 25% off, median 2-3%), so its importances carry that
  error from row to row and it fuses a slightly different set of entries: those near the fence, where the
  error moves the importance across it (see the README's parity table for how many).
- mergekit estimates the quartiles of tensors with more than 10⁶ elements from 10⁶ values drawn with
  replacement by an *unseeded* generator, so its output for large tensors changes from run to run. We use
  the exact order statistics at every size: reproducible, and no sampling error.
- Fused elements are the other model's value itself rather than base + (other − base) (a rounding-level
  difference).
Identical models give importance 0 everywhere, threshold 0, and return the (equal) inputs.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from mergesmith.methods import _kernels
from mergesmith.methods._parallel import in_parts
from mergesmith.methods._sparsify import CHUNK, StoredValues, TaskVector, chunk_size, loop_operand, loops_read, select_top, zeros_operand
from mergesmith.methods.registry import merge_method

PROB_EPS = 1e-8  # added to both softmaxes (mergekit's)

# Larger tensors find their quartiles with `select_top`, smaller ones with np.partition (5632x2048 float32
# importances, two threads: 2^19 entries 7-9 ns an entry against 21; up to 2^18 `select_top` finishes on the
# whole tensor with its own partitions, 24-28 ns).
SELECT_FROM = 1 << 18


# Entries per block of rows. Below this, torch's ~15 calls a block cost more than the cache misses of larger
# blocks save (5632x2048 bf16, 2 threads: 2^16 1.7-1.8 ns an entry, 2^18 1.4-1.5; the same importances).
ROW_BLOCK = 1 << 18


def _row_blocks(rows: int, cols: int, per_block: int = ROW_BLOCK) -> list[tuple[int, int]]:
    per = max(1, per_block // max(cols, 1))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def row_divergences(other_rows: torch.Tensor, base_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """KL(softmax(other) + ε ‖ softmax(base) + ε) of each row of two 2-D tensors, as a (rows, 1) tensor in
    `dtype`. For float32 and float64 accurate to ~10⁻⁶: the compiled loop on CPU float32 or bf16 inputs,
    else float64 torch in blocks of rows (see the module's docstring for why not float32's own rounding).
    A 16-bit `dtype` is mergekit's arithmetic (`--compute-dtype bfloat16`): its formula in that dtype."""
    if dtype.itemsize < 4:
        return _divergences_in(other_rows, base_rows, dtype)
    kl = torch.empty((other_rows.shape[0], 1), dtype=torch.float64, device=base_rows.device)
    if loops_read(other_rows, base_rows):
        other_np, base_np, kl_np = loop_operand(other_rows), loop_operand(base_rows), kl.view(-1).numpy()

        def compiled(share):
            for r0, r1 in share:
                _kernels.loops().row_divergences_into(other_np[r0:r1], base_np[r0:r1], PROB_EPS, kl_np[r0:r1])

        in_parts(_row_blocks(*other_rows.shape), compiled, base_rows.device)
    else:
        _divergences_in(other_rows, base_rows, torch.float64, out=kl)
        kl.clamp_(min=0)  # rounding below the true value (>= 0: p and q have the same total); NaN stays
    return kl.to(dtype)


def _divergences_in(other_rows: torch.Tensor, base_rows: torch.Tensor, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The row divergences by the formula in `dtype` (mergekit's ops), in blocks of rows converted as used."""
    kl = torch.empty((other_rows.shape[0], 1), dtype=dtype, device=base_rows.device) if out is None else out

    def blocks(share):
        for r0, r1 in share:
            p = torch.softmax(other_rows[r0:r1].to(dtype), dim=-1).add_(PROB_EPS)
            q = torch.softmax(base_rows[r0:r1].to(dtype), dim=-1).add_(PROB_EPS)
            torch.sum(torch.div(p, q, out=q).log_().mul_(p), dim=-1, keepdim=True, out=kl[r0:r1])

    in_parts(_row_blocks(*other_rows.shape), blocks, base_rows.device)
    return kl


def importance_scores(other: torch.Tensor, base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """|other − base| scaled by the per-row KL(softmax(other) ‖ softmax(base)), in `dtype` (default: the
    base's), stored whole (the compiled merge never stores them: `RowImportances`)."""
    dtype = dtype or base.dtype
    o_rows, b_rows = other.reshape(-1, other.shape[-1]), base.reshape(-1, base.shape[-1])
    return _stored_importances(RowImportances(o_rows, b_rows, row_divergences(o_rows, b_rows, dtype))).view(other.shape)


def _stored_importances(importances: RowImportances) -> torch.Tensor:
    """The (rows, cols) importances in the KL's dtype: the compiled loop where it applies, else torch in blocks."""
    if importances.compiled():
        return importances.whole().view(importances.rows, importances.cols)
    o_rows, b_rows, kl, dtype = importances.other, importances.base_rows, importances.kl.view(-1, 1), importances.dtype
    scores = torch.empty(o_rows.shape, dtype=dtype, device=importances.device)

    def blocks(share):
        for r0, r1 in share:
            torch.sub(o_rows[r0:r1].to(dtype), b_rows[r0:r1].to(dtype), out=scores[r0:r1]).abs_().mul_(kl[r0:r1])

    in_parts(_row_blocks(*o_rows.shape), blocks, importances.device)
    return scores


class RowImportances(TaskVector):
    """Arcee Fusion's importances |other − base| · KL(row), in the KL's dtype, computed where they are read and never
    stored whole: chunks of whole rows into a thread's scratch for the selection scan (`operands`), a
    strided sample, or the whole tensor for the fallbacks. Storing them cost a float32 tensor as large as
    the model's weight (a fresh 46 MB for a 5632x2048 matrix: its first touch alone ~2 ns an entry on this
    VM) and a pass to write it. The compiled loops read |values − 0| as the magnitudes (`StoredValues`), so
    the selection needs every KL ≥ 0 (`selectable`) and counts the NaN importances it met (`nan_seen`).
    `compiled()` (TaskVector's: a float32 KL on CPU, inputs bf16 or float32) says when the chunk methods
    below apply; otherwise `_stored_importances` computes them with torch."""

    _scratch = threading.local()
    _loop_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # `loop_rows`, made on first use

    def __init__(self, other_rows: torch.Tensor, base_rows: torch.Tensor, kl: torch.Tensor):
        self.other, self.base_rows, self.kl = other_rows, base_rows, kl.view(-1)
        self.rows, self.cols = other_rows.shape
        self.dtype, self.device = kl.dtype, base_rows.device
        self.model, self.base = other_rows.reshape(-1), base_rows.reshape(-1)  # for TaskVector.compiled
        self._nans: list[int] = []

    def numel(self) -> int:
        return self.rows * self.cols

    def chunk_length(self) -> int:
        """Entries per selection chunk: whole rows, about CHUNK of them."""
        return max(1, CHUNK // max(self.cols, 1)) * self.cols

    def selectable(self) -> bool:
        """Every KL ≥ 0 (none NaN), so every importance is its own magnitude."""
        return bool((self.kl >= 0).all())

    @property
    def nan_seen(self) -> bool:
        return any(self._nans)

    def loop_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(other, base, KL) rows whole as the compiled loops read them, made on first use (`TaskVector.loop_inputs`)."""
        if self._loop_rows is None:
            self._loop_rows = loop_operand(self.other), loop_operand(self.base_rows), self.kl.numpy()
        return self._loop_rows

    def _into(self, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        other, base, kl = self.loop_rows()
        self._nans.append(_kernels.loops().scaled_magnitudes_into(other[r0:r1], base[r0:r1], kl[r0:r1], out))
        return out

    def operands(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(importances[start:end], zeros): `start` and `end` fall on row boundaries (`chunk_length`)."""
        scratch = getattr(self._scratch, "values", None)
        if scratch is None or scratch.size < end - start:
            scratch = self._scratch.values = np.empty(end - start, dtype=np.float32)
        values = scratch[: end - start]
        self._into(start // self.cols, -(-end // self.cols), values.reshape(-1, self.cols))
        return values, zeros_operand(end - start)

    def chunk(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        values, _ = self.operands(start, end)
        return out.copy_(torch.from_numpy(values))

    def whole(self) -> torch.Tensor:
        values = torch.empty((self.rows, self.cols), dtype=torch.float32)
        in_parts(_row_blocks(self.rows, self.cols), lambda share: [self._into(r0, r1, values[r0:r1].numpy()) for r0, r1 in share], self.device)
        return values.view(-1)

    def sample(self, step: int) -> torch.Tensor:
        """Every `step`-th importance: strided views of the inputs (indexing them with positions took twice as
        long), and each entry's row's KL."""
        delta = self.model[::step].to(torch.float32) - self.base[::step].to(torch.float32)
        return delta.abs_().mul_(self.kl[torch.arange(0, self.numel(), step) // self.cols])


def _quartile_ranks(n: int) -> list[int]:
    last = n - 1
    return [last // 4, last // 2, (3 * last) // 4]


def _selected(values: TaskVector, ranks: list[int], size: int) -> torch.Tensor:
    """The values of ascending ranks `ranks`, for values that are their own magnitudes: rank r ascending is
    the (n − r)-th largest, which `select_top` finds for all ranks in one chunked pass."""
    cuts = select_top(values, [values.numel() - r for r in ranks], size)
    return torch.tensor([cut.threshold for cut in cuts], dtype=values.dtype)


def quartiles(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, median, Q3): the elements of 0-based rank ⌊q·(n−1)⌋ of `flat` in ascending order, exact at any size."""
    ranks = _quartile_ranks(flat.numel())
    large = flat.numel() > SELECT_FROM and flat.dtype in (torch.float32, torch.float64)
    if large and bool(flat.min() >= 0):  # a row's KL can round below 0, and NaN is not >= 0: then not
        picked = _selected(StoredValues(flat), ranks, chunk_size(flat))
    elif flat.device.type == "cpu":
        # One multi-rank selection (introselect), O(n), instead of a full sort.
        values = np.partition(flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32).numpy(), ranks)
        picked = torch.from_numpy(values[ranks]).to(flat.dtype)
    else:
        picked = torch.sort(flat).values[ranks]  # GPU radix sort beats per-slice selection
    return picked[0], picked[1], picked[2]


def importance_quartiles(importances: RowImportances) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quartiles` of importances that are not stored: selected from chunks computed as the scan reads them;
    where some KL is below 0 or the scan met a NaN importance, from the whole tensor (np.partition's order:
    NaN last)."""
    if importances.numel() > SELECT_FROM and importances.selectable():
        picked = _selected(importances, _quartile_ranks(importances.numel()), importances.chunk_length())
        if not importances.nan_seen:
            return picked[0], picked[1], picked[2]
    return quartiles(importances.whole())


def fence(q1: torch.Tensor, median: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    """The outlier fence: median + 1.5 · (Q3 − Q1)."""
    return median + 1.5 * (q3 - q1)


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    return fence(*quartiles(importance.reshape(-1)))


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
    o_rows = other.reshape(-1, other.shape[-1]) if other.dim() else other.reshape(1, 1)
    b_rows = base.reshape(o_rows.shape)
    importances = RowImportances(o_rows, b_rows, row_divergences(o_rows, b_rows, dtype))
    if importances.compiled():
        threshold = fence(*importance_quartiles(importances))
        return _choose_compiled(importances, threshold, output_dtype).reshape(base.shape)
    importance = _stored_importances(importances)
    threshold = fusion_threshold(importance)
    # the importances' storage becomes the output, block by block

    def blocks(share):
        for r0, r1 in share:
            fused = importance[r0:r1] >= threshold
            torch.where(fused, o_rows[r0:r1].to(dtype), b_rows[r0:r1].to(dtype), out=importance[r0:r1])

    in_parts(_row_blocks(*importance.shape), blocks, base.device)
    return importance.reshape(base.shape)


def _choose_compiled(importances: RowImportances, threshold: torch.Tensor, output_dtype: torch.dtype | None) -> torch.Tensor:
    """The output pass as one compiled loop a block of rows on the inputs as stored, the importances computed
    again on the way (`_kernels.choose_scaled_into`), into a float32 output or straight into a bf16 one.
    torch's compare and `where` on float32 copies of both inputs took ~1.4 ns an entry on two threads."""
    out_dtype = _kernels.result_dtype(torch.float32, output_dtype, True)
    out = torch.empty((importances.rows, importances.cols), dtype=out_dtype)
    flat_out = out.view(-1)
    limit = np.float32(threshold.item())
    loops, cols = _kernels.loops(), importances.cols
    other, base, kl = importances.loop_rows()

    def work(blocks: list[tuple[int, int]]) -> None:
        outputs = _kernels.OutputChunks(flat_out, max(r1 - r0 for r0, r1 in blocks) * cols)
        for r0, r1 in blocks:
            s, e = r0 * cols, r1 * cols
            loops.choose_scaled_into(other[r0:r1], base[r0:r1], kl[r0:r1], limit, outputs.direct(s, e).reshape(-1, cols))

    in_parts(_row_blocks(importances.rows, cols, CHUNK), work, out.device)
    return out
