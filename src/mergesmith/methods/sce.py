"""SCE (arXiv 2408.07990): Select the entries whose task vectors vary most across models, Calculate per-model
weights from the task vectors' energy, Erase entries that disagree with the elected sign, then merge.

    δᵢ = modelᵢ − base, masked to the top `select_topk` fraction of entries by variance across models
         (the fraction counts entries of non-zero variance; 1 selects everything; ties go to the earlier
         entry, or to the entries mergekit's topk picks under `--tie-order mergekit`)
    ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²)
    out = base + Σᵢ ηᵢ·mᵢ·δᵢ / max(Σᵢ ηᵢ·mᵢ, 1e-6),   mᵢ = sign agreement with the elected sign

Parameters follow mergekit's `sce` (`select_topk`, `int8_mask`; no weights), plus `consensus_method`.

Energy floor: mergekit falls back to uniform weights ηᵢ = 1/N whenever Σⱼ mean(δⱼ²) < 1e-6, an absolute
threshold that real fine-tunes (entries of ~1e-3 or less, mean squares ~1e-6 or less) fall under for most
tensors, so the energy weighting silently disappears. We keep that as the default (`energy_floor: 1e-6`) so
that existing configs give mergekit's numbers; `energy_floor: 0` applies the paper's energy weighting to
every tensor (uniform weights then only when all task vectors are zero).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mergesmith.methods import _kernels
from mergesmith.methods._consensus import CONSENSUS_METHODS, accumulation_dtype, disjoint_into, elect_sign_into
from mergesmith.methods._parallel import in_parts
from mergesmith.methods._sums import run_sums
from mergesmith.methods._sparsify import (
    ANY_DISTANCE, KEEP_ALL_BOUNDS, Cut, KeepRule, StoredValues, TaskVector, check_tie_order, chunk_size, models_and_base,
    row_bounds, select_top_fraction, selection_dtype, spans, top_fraction_count, variance_across,
)
from mergesmith.methods._task_vectors import CONSENSUS
from mergesmith.methods.registry import Param, merge_method


def sce_weights(energy: torch.Tensor, energy_floor: float = 0.0) -> torch.Tensor:
    """ηᵢ = energyᵢ / Σⱼ energyⱼ (energy = mean square of a task vector); uniform when the sum is at most
    `energy_floor`, zero, or not finite."""
    n = energy.shape[0]
    total = float(energy.sum())
    if total == 0 or abs(total) < energy_floor or not torch.isfinite(torch.tensor(total)):
        return torch.full_like(energy, 1.0 / n)
    return energy / total


def _sum_of_squares(d: torch.Tensor) -> float | torch.Tensor:
    """Σ d² of a chunk (overwritten, except by the dot product). 16-bit dtypes square in the dtype (rounded),
    as mergekit's `tvs.square().mean()` does. On CPU numpy's pairwise sum adds in one order whatever the
    thread count (torch's dot and sum split the chunk by thread, which moved SCE's weights by an ulp)."""
    wide = d.dtype in (torch.float32, torch.float64)
    if wide and d.device.type != "cpu":
        return torch.dot(d, d)
    squares = d.square_() if wide else d.square_().float()
    if squares.device.type != "cpu":
        return squares.sum()
    return float(run_sums(squares.numpy()))


def _task_vector_chunks(tvs, selection, chunks):
    """Yield (start, end, [masked task vector chunk per model]) for the (start, end) `chunks`, reusing
    buffers (torch path)."""
    size = max((e - s for s, e in chunks), default=1)
    bufs = [tv.buffer(size) for tv in tvs]
    mask = tvs[0].buffer(size, selection_dtype(tvs[0].dtype))
    for s, e in chunks:
        ds = [tv.chunk(s, e, buf[: e - s]) for tv, buf in zip(tvs, bufs)]
        selected = selection.member(s, e, mask[: e - s])
        if selected is not None:
            for d in ds:
                d.mul_(selected)
        yield s, e, ds


class _Selection:
    """SCE's selection (see `_selection`): every entry, the entries whose two-model distance |m1 - m2| is in
    `cut`, or the True entries of the uint8 mask `stored`."""

    def __init__(self, cut: Cut | None = None, spread: TaskVector | None = None, stored: torch.Tensor | None = None):
        self.cut, self.spread, self.stored = cut, spread, stored

    def member(self, s: int, e: int, out: torch.Tensor) -> torch.Tensor | None:
        """The 0/1 selection of [s, e) written into `out` (selection dtype), or None for all (torch path)."""
        if self.cut is not None:
            return self.cut.mask_into(self.spread.chunk(s, e, out).abs_(), s, out)
        if self.stored is not None:
            return out.copy_(self.stored[s:e])  # uint8 -> float converts fast (bool would not)
        return None

    def keep_array(self, s: int, m1: np.ndarray, m2: np.ndarray, buf: np.ndarray) -> np.ndarray:
        """The selection of the chunk at `s` as uint8 for the compiled loops (empty: all), given the chunk's
        two models as the loops read them (`loop_operand`; used by a cut) and a uint8 buffer of the chunk's
        length."""
        if self.cut is not None:
            _kernels.loops().cut_mask(m1, m2, *self.cut.bounds(s), buf)
            return buf
        if self.stored is not None:
            return self.stored[s : s + buf.size].numpy()
        return _EVERYTHING

    def loop_terms(self, s: int, e: int) -> tuple[np.ndarray, tuple]:
        """The selection of [s, e) as the one-pass loops take it (`_kernel_loops.pair_delta_merge_into`,
        `_generated_loops`): a uint8 mask (empty: none) and bounds on two models' distance, which the
        pair loop tests as it goes (three or more models are never cut: the bounds then pass everything)."""
        if self.cut is not None:
            return _EVERYTHING, self.cut.bounds(s)
        return (_EVERYTHING if self.stored is None else self.stored[s:e].numpy()), ANY_DISTANCE


_EVERYTHING = np.empty(0, dtype=np.uint8)


def _selection(tvs, fraction: float, size: int, tie_order: str) -> _Selection:
    """SCE's selection: the top `fraction` of the entries of non-zero variance across the models.

    Two models under the position tie order (the common merge): their variance is (m1 - m2)^2 / 4, so the
    difference of the two models, rounded once, ranks the entries as their exact variance does. It is
    streamed, so neither a variance tensor nor a stored mask is made, and its float32 rounding merges fewer
    entries into ties than the variance's would. Otherwise the variance is computed as mergekit computes it
    (bit for bit) and the mask is stored."""
    if fraction >= 1:
        return _Selection()
    if tie_order == "position" and len(tvs) == 2:
        spread = TaskVector(tvs[0].model, tvs[1].model, selection_dtype(tvs[0].dtype))
        return _Selection(cut=select_top_fraction(spread, fraction, size), spread=spread)
    return _Selection(stored=_top_variance(tvs, fraction, size, tie_order))


def _top_variance(tvs, fraction: float, size: int, tie_order: str) -> torch.Tensor:
    """uint8 0/1 mask of the entries SCE keeps (the top `fraction` by variance across the models). The float
    variance is dropped once the mask is made, so it never coexists with the output."""
    variance = variance_across(tvs, size)
    if tie_order == "mergekit":  # the same topk call as mergekit, so equal variances are chosen alike
        keep = torch.zeros(variance.shape, dtype=torch.uint8, device=variance.device)
        k = top_fraction_count(int(torch.count_nonzero(variance)), fraction)
        keep[torch.topk(variance.abs(), k=k, largest=True).indices] = 1
        return keep
    cut = select_top_fraction(StoredValues(variance), fraction, size)
    if all(tv.compiled() for tv in tvs) and cut.bounds(0)[:2] != ANY_DISTANCE[:2]:
        return _compiled_members(variance, cut, size)
    keep = torch.ones(variance.shape, dtype=torch.uint8, device=variance.device)
    buf = tvs[0].buffer(size, selection_dtype(variance.dtype))
    for s, e in spans(variance.numel(), size):
        member = cut.mask_into(variance[s:e], s, buf[: e - s])
        if member is not None:
            keep[s:e].copy_(member)
    return keep


def _compiled_members(variance: torch.Tensor, cut: Cut, size: int) -> torch.Tensor:
    """`_top_variance`'s mask made by `_kernel_loops.above_into` on every thread (the torch loop took 1.7 s
    of a three-model 1B merge on one thread): the same 0/1 entries, given a cut that does not select
    everything (which the torch path keeps as ones, NaN included)."""
    keep = torch.empty(variance.shape, dtype=torch.uint8)
    values, members = variance.numpy(), keep.numpy()

    def work(chunks):
        for s, e in chunks:
            _kernels.loops().above_into(values[s:e], *cut.bounds(s), members[s:e])

    in_parts(spans(variance.numel(), size), work, variance.device)
    return keep


@merge_method(
    "sce",
    params=(
        Param("select_topk", float, default=1.0, doc="Fraction of entries (by variance across models) to keep; 1 keeps all."),
        Param("int8_mask", bool, default=False, doc="Accepted for mergekit compatibility; masks are always boolean."),
        Param("energy_floor", float, default=1e-6, doc="Below this total energy the weights are uniform (mergekit's 1e-6); 0 always weights by energy."),
        CONSENSUS,
    ),
    base="required",
    converts_inputs=True,
    breaks_ties=True,
    rounds_output=True,
    min_models=0,
    reference="https://arxiv.org/abs/2408.07990",
)
def sce(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    energy_floor: float = 1e-6,
    consensus_method: str = "sum",
    compute_dtype: torch.dtype | None = None,
    tie_order: str = "position",
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Select by variance, weight by energy, erase minority signs, merge.

    Chunked passes over the inputs (selection, energies, merge); the task vectors are recomputed per chunk
    instead of being stacked, so the only full-size allocation is the output (plus the variance and a stored
    mask where `_selection` needs them). The work is done in `compute_dtype` (default: the base's); the
    inputs may be stored in another (bf16 as read). On float32 CPU work the energy and merge passes run
    `_kernels`' loops, with the same float operations (a bf16 `output_dtype` is then rounded chunk by chunk).
    """
    if not tensors:
        return base.to(compute_dtype or base.dtype)
    if consensus_method not in CONSENSUS_METHODS:
        raise ValueError(f"unknown consensus method {consensus_method!r} (expected sum or count)")
    n, dtype, device = base.numel(), compute_dtype or base.dtype, base.device
    size = chunk_size(base)
    flat_base = base.reshape(-1)
    tvs = [TaskVector(t, base, dtype) for t in tensors]
    check_tie_order(tie_order)
    selection = _selection(tvs, select_topk, size, tie_order)
    compiled = n > 0 and all(tv.compiled() for tv in tvs)
    energy = torch.zeros(len(tvs), dtype=torch.float64, device=device)
    if compiled:
        energy += torch.from_numpy(_compiled_energy(tvs, selection, spans(n, size)))
    else:
        for _, _, ds in _task_vector_chunks(tvs, selection, spans(n, size)):
            for i, d in enumerate(ds):
                energy[i] += _sum_of_squares(d)
    weights = sce_weights((energy / max(n, 1)).to(dtype), energy_floor).tolist()
    out = torch.empty(base.shape, dtype=_kernels.result_dtype(dtype, output_dtype, compiled), device=device)
    flat_out = out.view(-1)
    acc = accumulation_dtype(dtype)  # sums across models: float32 for 16-bit dtypes, rounded once

    def merge_chunks(chunks):
        width = max(e - s for s, e in chunks)
        vote, scratch, divisor, sums = (torch.empty(width, dtype=acc, device=device) for _ in range(4))
        narrow = torch.empty(width, dtype=dtype, device=device) if acc != dtype else None
        for s, e, ds in _task_vector_chunks(tvs, selection, chunks):
            m = e - s
            majority = elect_sign_into(ds, consensus_method, vote[:m], scratch[:m])
            mixed, div = flat_out[s:e], divisor[:m]
            if narrow is None:
                disjoint_into(ds, weights, majority, mixed, div, scratch[:m], weigh_deltas=True)
            else:
                mixed.copy_(disjoint_into(ds, weights, majority, sums[:m], div, scratch[:m], weigh_deltas=True))
                div = narrow[:m].copy_(div)
            mixed.div_(div.clamp_(min=1e-6)).add_(flat_base[s:e])

    if compiled:
        merge = _compiled_merge(tvs, selection, weights, consensus_method == "count", flat_out)
        in_parts(spans(n, _kernels.CHUNK), merge, device)
    elif n:
        in_parts(spans(n, size), merge_chunks, device)
    return out


def _compiled_energy(tvs, selection: _Selection, chunks: list[tuple[int, int]]) -> np.ndarray:
    """Σ δᵢ² per model (float64), as the torch path adds it: each chunk's squares by numpy's pairwise sum in
    float32, the chunk sums in float64 in chunk order. The chunks are shared between threads, their sums
    kept per chunk and added in order afterwards, so the total does not depend on the thread count."""
    sums = np.zeros((len(chunks), len(tvs)), dtype=np.float64)
    index = {chunk: i for i, chunk in enumerate(chunks)}

    def work(share):
        # one loop a chunk: the selection's deltas squared and summed as they are made (two models: 1.2 against
        # 2.4 ns an entry writing rows of the chunk's deltas; four: 7.7 s of thread time at 1B through rows)
        chunk_sums, loops = np.empty(len(tvs), dtype=np.float32), _kernels.loops()
        for s, e in share:
            models, base = models_and_base(tvs, s, e)
            keep, apart = selection.loop_terms(s, e)
            if len(tvs) == 2:
                loops.pair_square_sums(*models, base, keep, apart, chunk_sums)
            else:
                loops.square_sums(tuple(models), base, keep, chunk_sums)
            sums[index[(s, e)]] = chunk_sums

    in_parts(chunks, work, tvs[0].device)
    total = np.zeros(len(tvs), dtype=np.float64)
    for chunk_sums in sums:
        total += chunk_sums
    return total


def _compiled_merge(tvs, selection: _Selection, weights: list[float], by_count: bool, flat_out: torch.Tensor):
    """The merge pass's chunk work on the compiled path (`_kernel_loops.weighted_consensus_into`'s operations),
    writing the output directly: two to twelve models (three or more elected by count) in one pass from the inputs
    (`pair_delta_merge_into`, `_generated_loops`; three models' merge pass at 1B: 2.6 s through rows of whole
    chunks), otherwise on rows a block of entries at a time (`rows_merge_into`)."""
    ws = np.array(weights, dtype=np.float32)
    floor = np.float32(1e-6)
    count = len(tvs)
    if _kernels.one_pass(count, by_count):
        how = (True, True, True)  # elect, weigh, normalize
        ones = np.ones(2 * count, dtype=np.float32)  # each model's (rescale, weight): the deltas unscaled

        def one_pass(chunks):
            outputs = _kernels.OutputChunks(flat_out, max(e - s for s, e in chunks))
            for s, e in chunks:
                models, base = models_and_base(tvs, s, e)
                keep, apart = selection.loop_terms(s, e)
                _kernels.one_pass_merge_into(models, base, (KEEP_ALL_BOUNDS,) * count, (keep,) * count, apart, ones,
                                             ws, how, floor, np.float32(1), outputs.direct(s, e), by_count)

        return one_pass

    limits, splits = row_bounds([KeepRule()] * count, 0)  # every entry: the selection is the stored mask
    factors = np.ones((count, 2), dtype=np.float32)

    def in_blocks(chunks):
        """More than twelve models, or two elected by count: rows a block of entries at a time (`rows_merge_into`)."""
        width = max(e - s for s, e in chunks)
        rows, scratch = _kernels.rows_scratch(count)
        keep_buf, outputs, loops = np.empty(width, dtype=np.uint8), _kernels.OutputChunks(flat_out, width), _kernels.loops()
        for s, e in chunks:
            models, base = models_and_base(tvs, s, e)
            keep = selection.keep_array(s, models[0], models[-1], keep_buf[: e - s])
            loops.rows_merge_into(tuple(models), base, limits, splits, (keep,) * count, factors, ws, (True, True, by_count, False),
                                  floor, np.float32(1), rows, scratch, outputs.direct(s, e))

    return in_blocks
