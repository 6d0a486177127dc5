"""Sparsification of task vectors (fine-tune minus base), streamed over cache-sized chunks.

A task vector is never stored whole. For each model a *plan* is made from passes over chunks of
(model - base); the merge then recomputes each chunk of the task vector and `Plan.apply` zeroes the dropped
entries and applies the L1 rescale factor. The steps follow mergekit's semantics (`mergekit/sparsify.py`):

* `magnitude_plan`: keep the k = max(1, floor(density * n)) largest magnitudes (TIES).
* `outliers_plan`: Model Breadcrumbs: drop the int(gamma * n) largest magnitudes, then the smallest, keeping
  int(density * n). Two thresholds.
* `random_plan`: DARE: keep each entry with probability `density`.
* `della_plan`: DELLA: per-row keep probabilities ranging linearly from density - epsilon (smallest
  magnitude of the row) to density + epsilon (largest); equal magnitudes share their average rank.
* `rescale`: after masking, scale so the L1 norm matches the unmasked vector (mergekit's `rescale`).
* `variance_across` / `select_top_fraction`: SCE's selection by variance across the models (for two models,
  by their difference, which ranks entries as the variance does).

Why it is fast on a CPU:

* Selection instead of sorting: the k-th largest magnitude comes from a strided sample that brackets it in a
  narrow value window, one pass that counts the entries above the window and gathers those inside (with
  their positions), and `kthvalue` on the few gathered ones. O(n), exact.
* Masks are float 0/1 tensors made with vectorised arithmetic (`sign(relu(|d| - t))`) and applied with a
  multiply, as mergekit applies its masks; boolean kernels (`where`, `masked_fill_`, comparisons into bool,
  `cumsum` of bool) are 5-40x slower per element in PyTorch's CPU build and stay out of the per-chunk loops.
* DELLA's keep probabilities are linear in each entry's rank within its row, yet no row is sorted and no
  rank computed: a rank over the row's length is the chance that a uniformly picked other entry is smaller,
  so each entry compares itself with one random partner (see `PartnerKeep`).

Ties at a threshold: mergekit keeps exactly k elements and breaks ties in whatever order its (unstable)
argsort produces. We also keep exactly k, and break ties by position: among equal magnitudes the earlier
element (in flattened order) counts as the larger. On continuous data ties do not occur and the kept sets
are identical; on quantized (e.g. bfloat16) deltas the kept count is still exact.

Randomness (DARE, DELLA): each plan draws uniform int32 words from its own eight SFC64 streams stepped
together (`LaneWords`: DELLA by rows, DARE in blocks), seeded from the caller's `torch.Generator`, so the
same seed gives the same masks on any compute dtype (a generator on another device draws with torch there:
`RandomWords`). The keep probabilities are exact to 2^-32 (DELLA's
to 2^-31, and its partner picks to (c - 1) / 2^32). mergekit's stream (`torch.bernoulli` on the global
Mersenne twister) is not reproduced: it costs 2 ns an entry against 0.24, and a whole merge never matched
it anyway (the executor seeds each tensor from the seed and the tensor's name; mergekit draws one global
stream in its task order).
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

import numpy as np
import torch

from mergesmith.methods import _generated_loops, _kernels
from mergesmith.methods._kernels import loop_operand
from mergesmith.methods._parallel import in_parts
from mergesmith.methods._sums import run_sums
from mergesmith.methods.registry import MethodInputError

# Below this many elements, plain kthvalue on everything is as fast as anything cleverer.
_SMALL = 1 << 16
# Sample size bounds for the candidate window of the threshold search (see `_sample_step`).
_SAMPLE_MIN, _SAMPLE_MAX = 1 << 14, 1 << 18

# Elements per chunk on CPU: 1 MiB of float32. Measured on 3 x 4096^2 float32 (ties, idle 2-core EPYC):
# 2^16 0.41 s, 2^18 0.28 s, 2^20 0.31 s, 2^22 0.43 s with 2 threads: small chunks pay per-op thread
# synchronisation, large ones fall out of cache. Other devices use one chunk.
CHUNK = 1 << 18


def chunk_size(tensor: torch.Tensor) -> int:
    """Chunk length for streaming over `tensor`: CHUNK on CPU, the whole tensor elsewhere."""
    return CHUNK if tensor.device.type == "cpu" else max(1, tensor.numel())


def spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def selection_dtype(dtype: torch.dtype) -> torch.dtype:
    """Magnitudes and masks are float32 (float64 for float64 task vectors), whatever the compute dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _abs_into(d: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|d| in the selection dtype, into `out` when given."""
    if out is None:
        return d.to(selection_dtype(d.dtype)).abs()
    if d.dtype != out.dtype:
        out.copy_(d)
        return out.abs_()
    return torch.abs(d, out=out)


class TaskVector:
    """model - base for flat `model` and `base`, computed on demand in `dtype` (a chunk, a strided sample or
    the whole), never stored. The inputs may be stored in another float dtype (bf16 as read from disk): the
    model is converted before subtracting, since bf16 - bf16 would round the difference to bf16."""

    _loop_inputs: tuple[np.ndarray, np.ndarray] | None = None  # `loop_inputs`, made on first use

    def __init__(self, model: torch.Tensor, base: torch.Tensor, dtype: torch.dtype | None = None):
        self.model, self.base = model.reshape(-1), base.reshape(-1)
        self.dtype = dtype or base.dtype
        self.device = base.device

    def numel(self) -> int:
        return self.base.numel()

    def chunk(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """(model - base)[start:end] into `out` (of the compute dtype)."""
        model, base = self.model[start:end], self.base[start:end]
        if model.dtype == out.dtype and base.dtype == out.dtype:
            return torch.sub(model, base, out=out)
        return out.copy_(model).sub_(base)  # an in-place op computes in out's dtype

    def magnitudes(self, start: int, end: int, buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """|model - base|[start:end] in the selection dtype, into `out` (`buf`: scratch of the compute dtype);
        one compiled loop over the inputs where `compiled`."""
        if self.compiled():
            _kernels.loops().magnitudes_into(*self.operands(start, end), out.numpy())
            return out
        return _abs_into(self.chunk(start, end, buf), out)

    def whole(self) -> torch.Tensor:
        return self.model.to(self.dtype) - self.base

    def sample(self, step: int) -> torch.Tensor:
        return self.model[::step].to(self.dtype) - self.base[::step]

    def buffer(self, size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A chunk buffer (compute dtype unless given)."""
        return torch.empty(min(size, max(self.numel(), 1)), dtype=dtype or self.dtype, device=self.device)

    def compiled(self) -> bool:
        """Whether `_kernels`' loops can work on this task vector: float32 on CPU, inputs bf16 or float32."""
        return self.dtype == torch.float32 and loops_read(self.model, self.base)

    def operands(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(model[start:end], base[start:end]) as the compiled loops read them (`loop_operand`): views, no copy."""
        model, base = self.loop_inputs()
        return model[start:end], base[start:end]

    def loop_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(model, base) whole as the compiled loops read them, made on first use: slicing these costs ~0.3 us
        a chunk, converting each torch slice ~7 us (a few thousand chunks a merge, under the GIL)."""
        if self._loop_inputs is None:
            self._loop_inputs = loop_operand(self.model), loop_operand(self.base)
        return self._loop_inputs


_KERNEL_INPUTS = (torch.float32, torch.bfloat16)


def loops_read(*tensors: torch.Tensor) -> bool:
    """Whether `_kernels`' loops can read these tensors as stored (`loop_operand`): CPU, float32 or bf16,
    and the loops available."""
    return all(t.device.type == "cpu" and t.dtype in _KERNEL_INPUTS for t in tensors) and _kernels.available()


def models_and_base(tvs: Sequence[TaskVector], start: int, end: int) -> tuple[list[np.ndarray], np.ndarray]:
    """([every model], their shared base)[start:end] as the loops for several models read them (`loop_operand`:
    views, no copy)."""
    return [tv.operands(start, end)[0] for tv in tvs], tvs[0].operands(start, end)[1]


class StoredValues(TaskVector):
    """A flat tensor already in memory, read through the TaskVector interface so that `select_top` can select
    on it chunk by chunk (SCE's variance)."""

    def __init__(self, values: torch.Tensor):
        self.values = values.reshape(-1)
        self.dtype, self.device = values.dtype, values.device

    def numel(self) -> int:
        return self.values.numel()

    def chunk(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        return self.values[start:end]  # read only by the selection: no copy

    def whole(self) -> torch.Tensor:
        return self.values

    def sample(self, step: int) -> torch.Tensor:
        return self.values[::step]

    def compiled(self) -> bool:
        """float32 on CPU: the compiled scan reads the values as |values - 0| (`operands`), which is |values|."""
        return self.dtype == torch.float32 and self.device.type == "cpu" and _kernels.available()

    def operands(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(values[start:end], zeros) for the loops, which read magnitudes as |model - base|."""
        return loop_operand(self.values[start:end]), zeros_operand(end - start)


_ZEROS = np.zeros(0, dtype=np.uint16)


def zeros_operand(n: int) -> np.ndarray:
    """n bf16 zeros (uint16 bit patterns), from one array kept for the process: a fresh one per chunk cost a
    page fault per 4 KiB on every scan (~1 ns an entry on this VM)."""
    global _ZEROS
    if _ZEROS.size < n:
        _ZEROS = np.zeros(n, dtype=np.uint16)
    return _ZEROS[:n]


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th smallest entry (1-based) of a flat tensor, as a 0-dim tensor: `torch.kthvalue`'s value. On
    CPU in float32/float64, numpy's `partition` finds it (vectorised quickselect: ~0.2 ms for 2^18 values,
    against 3-4 ms for `kthvalue`, which the selection calls three times a tensor and model)."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) and values.is_contiguous():
        return torch.from_numpy(np.partition(values.numpy(), rank - 1)[rank - 1 : rank]).reshape(())
    return torch.kthvalue(values, rank).values


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1 <= k <= n) of a flat tensor, as a 0-dim tensor, in O(n) (see `select_top`)."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} values")
    rank = n - k + 1  # 1-based ascending rank of the target
    if n <= _SMALL:
        return kth_smallest(values, rank)
    lo, hi = _window(values[:: _sample_step(n)].contiguous(), n, k)
    inside = None if lo is None else values >= lo
    n_above = 0
    if hi is not None:
        above = values > hi
        n_above = int(torch.count_nonzero(above))
        inside = above.logical_not_() if inside is None else inside.logical_and_(above.logical_not_())
    if inside is not None:
        window = values[inside]
        need = k - n_above  # the target is the need-th largest inside the window
        if 1 <= need <= window.numel():
            return kth_smallest(window, window.numel() - need + 1)
    return kth_smallest(values, rank)


def _sample_step(n: int) -> int:
    """Stride of the sample: about n^(2/3) samples, which balances the sample's own selection (grows with s)
    against the candidate window it leaves (shrinks as 1/sqrt(s)); odd, so it does not alias with
    power-of-two row lengths. A 4x larger sample cut the selection in memory (5632x2048 bf16 deltas, a TIES
    cut 3.2 -> 2.0 ns an entry) but not whole 1B merges, whose strided sample then reads every cache line of
    the inputs: TIES user CPU 13.7-14.8 -> 14.7-15.2 s, Arcee Fusion no faster (alternating runs)."""
    samples = min(_SAMPLE_MAX, max(_SAMPLE_MIN, int(n ** (2 / 3))))
    return (n // samples) | 1


def _window(sample: torch.Tensor, n: int, k: int, widen: float = 1.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A value window [lo, hi] that holds the k-th largest of n values with near certainty, from a sample
    (either side None when open); `widen` scales the margin when k itself is an estimate."""
    return _windows(sample, n, [k], widen)[0]


def _windows(sample: torch.Tensor, n: int, ks: Sequence[int], widen: float = 1.0) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """`_window` for each k in `ks`, the sample's order statistics for all their bounds found together (one
    multi-rank `np.partition` on CPU, where two calls a window cost Arcee Fusion's three windows six)."""
    s = sample.numel()
    ranks = []
    for k in ks:
        q = (n - k + 0.5) / n
        centre = q * s
        margin = widen * 4.0 * math.sqrt(s * q * (1 - q)) + 8.0
        ranks.append((int(centre - margin), int(math.ceil(centre + margin))))
    wanted = sorted({r for pair in ranks for r in pair if 1 <= r <= s})
    at = dict(zip(wanted, _smallest_at(sample, wanted)))
    return [(at.get(lo), at.get(hi)) for lo, hi in ranks]


def _smallest_at(values: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """The rank-th smallest entries (1-based, ascending ranks) of a flat tensor, as 0-dim tensors."""
    if not ranks:
        return []
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) and values.is_contiguous():
        positions = [r - 1 for r in ranks]
        picked = torch.from_numpy(np.partition(values.numpy(), positions)[positions])
        return list(picked.unbind())
    return [kth_smallest(values, r) for r in ranks]


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest float of `dtype` below `value`."""
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


def _count_above(a: torch.Tensor, bound: float, scratch: torch.Tensor) -> torch.Tensor:
    """How many entries of a exceed `bound`, as a 0-dim float tensor (exact for chunks below 2^24 entries)."""
    return torch.sub(a, bound, out=scratch).clamp_(min=0).sign_().sum()


class Cut:
    """Exact top-k membership of magnitudes: `a >= threshold`, except that when more entries than needed equal
    the threshold only the earliest of them are in: those before flat position `tie_end`.

    k-th largest ties go to the earlier position; "the earliest m tied entries" is the same as "the tied
    entries before the position just after the m-th one", which needs no list of positions."""

    def __init__(self, threshold: float | None, tie_end: int | None = None, *, everything: bool = False):
        self.threshold, self.tie_end, self.everything = threshold, tie_end, everything
        self._bounds: tuple[np.float32, np.float32] | None = None

    def mask_into(self, a: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor | None:
        """1.0 for the members among the chunk a = magnitudes[start:start + len(a)], else 0.0, written into
        `out` (a's dtype and length; may be a itself). None means every entry is a member.

        With b the float just below the threshold, a - b > 0 exactly when a >= threshold (the sign of a
        float difference is exact), so sign(relu(a - b)) is the membership, in three vectorised passes."""
        if self.everything:
            return None
        if self.threshold is None:
            return out.zero_()
        if self.threshold <= 0:
            return None  # every magnitude is >= 0; members tied at 0 change no value
        ge, gt = _below(self.threshold, a.dtype), self.threshold
        end = start + a.numel()
        if self.tie_end is None or end <= self.tie_end:
            return torch.sub(a, ge, out=out).clamp_(min=0).sign_()
        if start >= self.tie_end:
            return torch.sub(a, gt, out=out).clamp_(min=0).sign_()
        split = self.tie_end - start  # ties are in before the split, out after it
        torch.sub(a[:split], ge, out=out[:split])
        torch.sub(a[split:], gt, out=out[split:])
        return out.clamp_(min=0).sign_()


    def bounds(self, start: int) -> tuple[np.float32, np.float32, int]:
        """(ge, gt, split) in `_kernels.weighted_delta`'s terms for the chunk starting at `start`: a magnitude
        at chunk position i is a member when it exceeds ge (i < split) or gt (i >= split)."""
        if self.everything or (self.threshold is not None and self.threshold <= 0):
            return _MINUS_INF, _MINUS_INF, 0
        if self.threshold is None:
            return _PLUS_INF, _PLUS_INF, 0
        if self._bounds is None:  # once: `_below` makes tensors, and this runs per chunk
            self._bounds = np.float32(_below(self.threshold, torch.float32)), np.float32(self.threshold)
        return *self._bounds, (self.tie_end - start) if self.tie_end is not None else _NO_SPLIT


_MINUS_INF, _PLUS_INF = np.float32(-np.inf), np.float32(np.inf)
_NO_SPLIT = 1 << 62
ALL = Cut(None, everything=True)
NONE = Cut(None)
ANY_DISTANCE = ALL.bounds(0)  # bounds that every distance passes (`_kernel_loops.far_apart`)
KEEP_ALL_BOUNDS = ALL.bounds(0) + NONE.bounds(0)  # a keep rule's bounds that keep every entry (`weighted_delta`)


class KeepRule:
    """Which entries of a task vector a plan keeps: the members of `keep` that are not members of `drop`
    (magnitude cuts), or the True entries of `stored` (a flat bool mask made by a random or sorting plan).
    The torch path applies it with `mask_into`; the compiled loops read the same data (`Cut.bounds`,
    `stored_array`)."""

    def __init__(self, keep: Cut = ALL, drop: Cut = NONE, stored: torch.Tensor | None = None):
        if stored is not None and (keep is not ALL or drop is not NONE):
            raise ValueError("a stored mask replaces the cuts; give one or the other")
        self.keep, self.drop = keep, drop
        self.stored = stored
        self._own = threading.local()  # a magnitudes buffer per thread: the merge may apply a rule from several

    def keeps_nothing(self) -> bool:
        return self.keep is NONE and self.stored is None

    def mask_into(self, d: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor | None:
        """The 0/1 keep mask of the chunk d = (model - base)[start:start + len(d)], written into `out` (d's
        length, selection dtype) and returned; None keeps everything. Safe to call from several threads."""
        if self.stored is not None:
            # bool -> float conversion is slow on CPU; the same bytes read as uint8 convert fast
            return out.copy_(self.stored[start : start + d.numel()].view(torch.uint8))
        if self.drop is NONE:
            return self.keep.mask_into(_abs_into(d, out), start, out)
        scratch = getattr(self._own, "scratch", None)
        if scratch is None or scratch.numel() < d.numel():
            scratch = self._own.scratch = torch.empty(d.numel(), dtype=out.dtype, device=out.device)
        a = _abs_into(d, scratch[: d.numel()])
        top = self.drop.mask_into(a, start, out)
        if top is None:
            return out.zero_()
        top.neg_().add_(1)  # 1 - membership of the dropped top
        inside = self.keep.mask_into(a, start, a)
        return top if inside is None else top.mul_(inside)

    def stored_array(self, start: int, end: int) -> np.ndarray:
        """The stored mask's [start, end) as uint8 (empty when there is none: every entry may be kept)."""
        return _NO_MASK if self.stored is None else self.stored[start:end].view(torch.uint8).numpy()


_NO_MASK = np.empty(0, dtype=np.uint8)
KEEP_NOTHING = KeepRule(keep=NONE)


def row_bounds(rules: Sequence[KeepRule], start: int) -> tuple[np.ndarray, np.ndarray]:
    """The keep rules' bounds for the chunk at `start` as `_kernel_loops.rows_merge_into` takes them: float32
    (keep_ge, keep_gt, drop_ge, drop_gt) and int64 (keep_split, drop_split), a row per rule."""
    bounds = [(rule.keep.bounds(start), rule.drop.bounds(start)) for rule in rules]
    limits = np.array([(keep[0], keep[1], drop[0], drop[1]) for keep, drop in bounds], dtype=np.float32)
    return limits, np.array([(keep[2], drop[2]) for keep, drop in bounds], dtype=np.int64)


class RowSum:
    """out = base + scale · Σ wⱼ·(modelⱼ − base) over every entry of a chunk, in `_kernel_loops.rows_merge_into`'s
    sum: each product rounded, added in model order, then scaled and the base added (Model Stock's output,
    `_linalg.combine_task_vectors` for four or more). Up to twelve models take `_kernels.one_pass_merge_into`'s
    sum, the same operations in one pass from the inputs (in cache, four models: 1.2 against 2.55 ns an
    entry). Holds the loop's buffers: one a thread."""

    def __init__(self, weights: Sequence[float], scale: float):
        count = len(weights)
        self.scale = np.float32(scale)
        self.masks = (_NO_MASK,) * count
        self.one_pass = _kernels.one_pass(count)
        if self.one_pass:
            self.bounds = (KEEP_ALL_BOUNDS,) * count
            self.factors = np.array([x for w in weights for x in (1, w)], dtype=np.float32)  # rescale 1, weight w
            return
        self.limits, self.splits = row_bounds([KeepRule()] * count, 0)
        self.factors = np.array([(1, w) for w in weights], dtype=np.float32)
        self.rows, self.scratch = _kernels.rows_scratch(count)

    def into(self, models: Sequence[np.ndarray], base: np.ndarray, out: np.ndarray) -> None:
        """Write the chunk's sum into `out` (float32, or a bf16 output's bit patterns); loop operands."""
        if self.one_pass:  # no election, no division
            _kernels.one_pass_merge_into(models, base, self.bounds, self.masks, ANY_DISTANCE, self.factors,
                                         self.factors[1::2], (False, False, False), np.float32(1), self.scale, out)
            return
        _kernels.loops().rows_merge_into(tuple(models), base, self.limits, self.splits, self.masks, self.factors,
                                         self.factors[:, 1], (False, False, False, False), np.float32(1), self.scale,
                                         self.rows, self.scratch, out)


def _cut(threshold: torch.Tensor, n_ge: int, n_gt: int, k: int, nth_tie: Callable[[int], int]) -> Cut:
    """The Cut for the k largest, given the threshold and how many values are >= and > it;
    `nth_tie(m)` is the flat position of the m-th entry (1-based, in order) equal to the threshold."""
    if n_ge <= k:
        return Cut(float(threshold))
    return Cut(float(threshold), nth_tie(k - n_gt) + 1)


def cut_from_values(values: torch.Tensor, k: int) -> Cut:
    """The top-k Cut of a flat tensor of magnitudes held in memory."""
    n = values.numel()
    if k <= 0:
        return NONE
    if k >= n:
        return ALL
    threshold = kth_largest(values, k)
    return _cut(threshold, int(torch.count_nonzero(values >= threshold)), int(torch.count_nonzero(values > threshold)), k,
                lambda m: int(torch.nonzero(values == threshold)[m - 1]))


def select_top(tv: TaskVector, ks: Sequence[int], size: int) -> list[Cut]:
    """The top-k Cut of the task vector's magnitudes for each k in `ks`, from one chunked pass.

    A strided sample brackets each target rank in a value window [lo, hi]. The pass counts the entries above
    each window and gathers those inside with their positions; `kthvalue` finishes on the gathered values.
    When the window is a single value v (typical of bf16 deltas, where many entries share each magnitude),
    gathering would copy a large share of the tensor, so the pass only counts the entries above v and equal
    to v per chunk, and one chunk is revisited to find where the kept ties end. Exact either way; a window
    that missed falls back to whole-tensor selection.
    """
    n = tv.numel()
    if all(k <= 0 or k >= n for k in ks):
        return [NONE if k <= 0 else ALL for k in ks]
    return _select(tv, size, lambda nonzero: list(ks), counting=False)


def select_top_fraction(tv: TaskVector, fraction: float, size: int) -> Cut:
    """The Cut of the `top_fraction_count` largest magnitudes, the fraction counting the non-zero ones (SCE's
    selection), in `select_top`'s single pass: the sample estimates the non-zero count to place the window
    (widened for the estimate's error) and the pass counts it exactly, so no separate counting pass."""
    if fraction <= 0:
        return NONE
    if fraction >= 1:
        return ALL

    def ks(nonzero: int) -> list[int]:
        return [top_fraction_count(nonzero, fraction)]

    return _select(tv, size, ks, counting=True)[0]


def _select(tv: TaskVector, size: int, ks_of: Callable[[int | None], list[int]], *, counting: bool) -> list[Cut]:
    """`select_top`'s pass, cutting at the ranks `ks_of(non-zero count)`. Without `counting` the ranks do not
    depend on the count (it is None). With it, the windows bracket `ks_of(the sample's non-zero count, scaled
    to n)`, the pass counts the non-zero entries, and the cuts are made at `ks_of(that exact count)`."""
    n = tv.numel()
    if n <= max(size, _SMALL):
        values = _abs_into(tv.whole())
        return [cut_from_values(values, k) for k in ks_of(int(torch.count_nonzero(values)) if counting else None)]
    sample = _abs_into(tv.sample(_sample_step(n))).contiguous()
    targets = ks_of(round(int(torch.count_nonzero(sample)) * n / sample.numel()) if counting else None)
    todo = list(range(len(targets)))
    bounds = _windows(sample, n, [min(max(targets[j], 1), n) for j in todo], widen=1.5 if counting else 1.0)
    windows = dict(zip(todo, bounds))
    if any(lo is None and hi is None for lo, hi in windows.values()):
        values = _abs_into(tv.whole())
        return [cut_from_values(values, k) for k in ks_of(int(torch.count_nonzero(values)) if counting else None)]
    windows, parts = _split_at_mode(sample, windows)
    single = {j: float(lo) for j, (lo, hi) in windows.items() if lo is not None and hi is not None and bool(lo == hi)}
    above = {j: torch.zeros((), dtype=torch.float64) for j in windows}  # counts: exact past 2^24, unlike float32
    equal: dict = {j: [] for j in single}
    found: dict = {j: [] for j in windows if j not in single}
    chunks = spans(n, size)
    scan = _scan_in_parts if tv.compiled() else _scan_torch
    nonzero = scan(tv, chunks, windows, single, above, equal, found, counting=counting)

    def cut_in(j, k: int) -> Cut | None:
        """The cut at the k-th largest when window j holds it, else None."""
        n_above = int(above[j])
        if j in single:
            v, counts = single[j], torch.stack(equal[j]).to(torch.int64)
            n_equal = int(counts.sum())
            if n_above < k <= n_above + n_equal:
                return _cut(torch.tensor(v, dtype=torch.float64), n_above + n_equal, n_above, k, lambda m: _nth_equal(tv, v, counts, m, chunks))
            return None
        window = torch.cat([v for v, _ in found[j]])
        need = k - n_above
        if 1 <= need <= window.numel():
            threshold = kth_smallest(window, window.numel() - need + 1)
            n_ge, n_gt = (n_above + count for count in _counts_from(window, threshold))
            # the positions are joined only for a cut among tied values (rare for continuous magnitudes)
            return _cut(threshold, n_ge, n_gt, k, lambda m: _nth_at(window, torch.cat([p for _, p in found[j]]), threshold, m))
        return None

    cuts: list[Cut] = []
    for j, k in enumerate(ks_of(nonzero) if counting else targets):
        if k <= 0 or k >= n:
            cuts.append(NONE if k <= 0 else ALL)
            continue
        cut = next((c for c in (cut_in(part, k) for part in parts[j]) if c is not None), None)
        cuts.append(cut if cut is not None else cut_from_values(_abs_into(tv.whole()), k))
    return cuts


# A window whose sample is at least this share one value is split around it (`_split_at_mode`).
_MODE_SHARE = 0.5


def _split_at_mode(sample: torch.Tensor, windows: dict) -> tuple[dict, dict]:
    """(the windows to scan, the parts of each original window). A lone window whose sample is mostly one
    value v (bf16 task vectors: a tie group of a million magnitudes in a 12M-entry matrix) becomes
    (v, hi], [v, v] and [lo, v): the tie group is counted like a single-value window instead of gathered,
    and only the sides are gathered (one tally pass counts all three). Gathering it cost the scan's flag
    listing and numpy's partition, which is slow on many equal values (31 ms for a 1.9M-value SCE window).
    Each part cuts only a k inside its own counts. Several windows are left whole: three are the most one
    pass counts."""
    parts = {j: [j] for j in windows}
    if len(windows) != 1:
        return windows, parts
    ((j, (lo, hi)),) = windows.items()
    if lo is None or hi is None or bool(lo == hi):
        return windows, parts
    inside = sample[(sample >= lo) & (sample <= hi)]
    if inside.numel() < 16:
        return windows, parts
    values, counts = torch.unique(inside, return_counts=True)
    top = int(counts.argmax())
    if int(counts[top]) < _MODE_SHARE * inside.numel():
        return windows, parts
    v = values[top]
    split = {}
    if bool(v < hi):
        split[(j, "above")] = (torch.nextafter(v, torch.tensor(math.inf, dtype=v.dtype)), hi)
    split[(j, "tied")] = (v, v)
    if bool(v > lo):
        split[(j, "below")] = (lo, torch.nextafter(v, torch.tensor(-math.inf, dtype=v.dtype)))
    return split, {j: list(split)}


def _counts_from(window: torch.Tensor, threshold: torch.Tensor) -> tuple[int, int]:
    """(values >= threshold, values > threshold) of a gathered window; numpy's comparisons on CPU (half of
    torch's time on a 2M-value window)."""
    if window.device.type == "cpu":
        values, v = window.numpy(), threshold.numpy()
        return int(np.count_nonzero(values >= v)), int(np.count_nonzero(values > v))
    return int(torch.count_nonzero(window >= threshold)), int(torch.count_nonzero(window > threshold))


def _nth_at(window: torch.Tensor, positions: torch.Tensor, threshold: torch.Tensor, m: int) -> int:
    """The position of the m-th (1-based) value of a gathered window equal to the threshold: where a cut among
    tied values ends. On CPU with numpy (2M values, 1.2M of them tied: 2 ms, torch's masked index 12 ms)."""
    if window.device.type == "cpu":
        return int(positions.numpy()[np.flatnonzero(window.numpy() == threshold.numpy())[m - 1]])
    return int(positions[window == threshold][m - 1])


def _scan_torch(tv: TaskVector, chunks: list[tuple[int, int]], windows: dict, single: dict, above: dict,
                equal: dict, found: dict, *, counting: bool) -> int:
    """`_select`'s scan without the compiled loops: chunk by chunk, each window's counts and gathers from
    numpy (CPU) or torch ops. Returns the non-zero count when `counting`, else 0."""
    size, sel = max(e - s for s, e in chunks), selection_dtype(tv.dtype)
    buf, abuf, scratch = tv.buffer(size), tv.buffer(size, sel), tv.buffer(size, sel)
    nonzero = 0
    for s, e in chunks:
        a = _abs_into(tv.chunk(s, e, buf[: e - s]), abuf[: e - s])
        if counting:
            nonzero += int(np.count_nonzero(a.numpy()) if a.device.type == "cpu" else torch.count_nonzero(a))
        for j, (lo, hi) in windows.items():
            if a.device.type == "cpu":  # numpy: its comparisons and flatnonzero cost half of torch's here
                if j in single:
                    gt, ge = _counts_above_cpu(a, single[j])
                    above[j] += gt
                    equal[j].append(torch.tensor(ge - gt))
                else:
                    n_above, found_values, found_at = _window_cpu(a, lo, hi)
                    above[j] += n_above
                    found[j].append((found_values, found_at + s))
                continue
            if j in single:
                v = single[j]
                gt = _count_above(a, v, scratch[: e - s])
                above[j] += gt
                equal[j].append(_count_above(a, _below(v, sel), scratch[: e - s]) - gt)
                continue
            if hi is not None:
                inside = a <= hi
                above[j] += (e - s) - torch.count_nonzero(inside)
                if lo is not None:
                    inside.logical_and_(a >= lo)
            else:
                inside = a >= lo
            where = torch.nonzero(inside).flatten()
            found[j].append((a[where], where + s))
    return nonzero


def _scan_in_parts(tv: TaskVector, chunks: list[tuple[int, int]], windows: dict, single: dict, above: dict,
                   equal: dict, found: dict, *, counting: bool) -> int:
    """`_scan_compiled` over every chunk, in the contiguous pieces `in_parts` gives the threads (one piece when
    the plans are being built at once); the pieces' tallies are added in chunk order, so they are the
    sequential scan's (the positions gathered stay ascending). Returns the non-zero count. SCE's two-model
    cut is one selection a tensor: on one thread it left the other core idle (1B: ~3.5 s of 6.3)."""
    def share(part: list[tuple[int, int]]) -> tuple[int, dict, dict, dict]:
        scratch = _GatherScratch(max(e - s for s, e in part))
        if len(windows) <= _TALLY_WINDOWS:
            tally = _WindowsTally(windows, single, scratch)
            for s, e in part:
                tally.chunk(*tv.operands(s, e), s)
            return tally.results()
        bounds = {j: _loop_bounds(window) for j, window in windows.items()}
        tallies = ({j: 0 for j in above}, {j: [] for j in equal}, {j: [] for j in found})
        return sum(_scan_compiled(*tv.operands(s, e), s, bounds, single, *tallies, scratch) for s, e in part), *tallies

    nonzero = 0
    for part_nonzero, part_above, part_equal, part_found in in_parts(chunks, share, tv.device):
        nonzero += part_nonzero
        for j in above:
            above[j] += part_above[j]
        for j in equal:
            equal[j].extend(part_equal[j])
        for j in found:
            found[j].extend(part_found[j])
    return nonzero


class _GatherScratch:
    """The gather's per-thread scratch for chunks of up to `width` entries, made once a scan: fresh arrays a
    chunk would page-fault on every chunk. `stored`: the chunk's magnitudes as `windows_tally` stores them."""

    def __init__(self, width: int):
        self.flags = np.empty(-(-width // 8) * 8, dtype=np.uint8)
        self.hits = np.empty(width, dtype=np.int32)
        self.magnitudes = np.empty(width, dtype=np.float32)
        self.stored = np.empty(width, dtype=np.float32)

    def for_chunk(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.flags[: -(-n // 8) * 8], self.hits[:n], self.magnitudes[:n]


def _scan_compiled(model: np.ndarray, base: np.ndarray, start: int, windows: dict, single: dict, above: dict,
                   equal: dict, found: dict, scratch: _GatherScratch) -> int:
    """`_select`'s work on one chunk with `_kernels`' loops for more than three windows (up to three:
    `_WindowsTally`): per window, count the magnitudes above it and (single-value windows) equal to it; then
    gather those inside the other windows, with their positions, in one pass for all of them.
    `windows`: each one's (lo, hi) as the loops read them (`_loop_bounds`); `above` holds Python ints.
    Returns the chunk's non-zero count."""
    loops = _kernels.loops()
    flags, hits, magnitudes = scratch.for_chunk(model.size)
    nonzero = 0
    bounds, counts = {}, {}
    for j, (low, high) in windows.items():
        n_above, n_inside, nonzero = loops.window_count(model, base, low, high)
        above[j] += n_above
        if j in single:
            equal[j].append(torch.tensor(n_inside))
        else:
            bounds[j], counts[j] = (low, high), n_inside
    if not bounds:
        return nonzero
    keys = list(bounds)
    lows = np.array([bounds[j][0] for j in keys], dtype=np.float32)
    highs = np.array([bounds[j][1] for j in keys], dtype=np.float32)
    _gather(keys, [counts[j] for j in keys], found, lambda *rows: loops.windows_gather(
        model, base, lows, highs, start, *rows, flags, hits, magnitudes))
    return nonzero


def _loop_bounds(window: tuple[torch.Tensor | None, torch.Tensor | None]) -> tuple[np.float32, np.float32]:
    """A window's (lo, hi) as the loops read them: float32, an open side infinite."""
    lo, hi = window
    return (_MINUS_INF if lo is None else np.float32(lo.item()), _PLUS_INF if hi is None else np.float32(hi.item()))


_TALLY_WINDOWS = 3  # the windows `windows_tally` tests in its one pass (unused ones are padded empty)
_NAN = np.float32(np.nan)  # a padding window's bounds: no magnitude is inside or above it


def _gather(keys: list, counts: list[int], found: dict, gather: Callable) -> None:
    """Append to found[j] the values and positions `gather(values, positions, gathered, flagged)` writes for
    the windows `keys` (row w of each for keys[w], whose count is counts[w]: known from the counting pass;
    `flagged`, their sum, lets the loop pick how it lists the flagged entries)."""
    capacity = max(counts) + 1  # a row is written one entry past its count before the test
    values, positions = np.empty((len(keys), capacity), dtype=np.float32), np.empty((len(keys), capacity), dtype=np.int64)
    if capacity > 1:
        gather(values, positions, np.zeros(len(keys), dtype=np.int64), sum(counts))
    for w, (j, count) in enumerate(zip(keys, counts)):
        found[j].append((torch.from_numpy(values[w, :count]), torch.from_numpy(positions[w, :count])))


class _WindowsTally:
    """`_scan_compiled` for up to three windows over one thread's share of chunks: their counts, the gather's
    flags and the chunk's magnitudes from one pass a chunk (`windows_tally`), then the gather of the flagged
    entries from the stored magnitudes (`gather_stored`). The loops' bounds are made once a share and the
    counts kept in numpy until `results`: per chunk, the bounds, the counts as torch tensors and their
    conversions had cost ~60 us of Python a chunk (held under the GIL, against ~0.5 ms of loop work)."""

    def __init__(self, windows: dict, single: dict, scratch: _GatherScratch):
        self.keys, self.scratch = list(windows), scratch
        padding = _TALLY_WINDOWS - len(self.keys)
        bounds = [_loop_bounds(window) for window in windows.values()] + [(_NAN, _NAN)] * padding  # empty
        self.lows, self.highs = (np.array(side, dtype=np.float32) for side in zip(*bounds))
        self.gathers = np.array([j not in single for j in self.keys] + [False] * padding, dtype=np.uint8)
        self.ws = [w for w, j in enumerate(self.keys) if j not in single]
        self.gather_lows, self.gather_highs = self.lows[self.ws], self.highs[self.ws]
        self.tallies = np.zeros(2 * _TALLY_WINDOWS + 1, dtype=np.int64)  # above each, inside each, non-zero
        self.equal: dict = {j: [] for j in self.keys if j in single}
        self.found: dict = {self.keys[w]: [] for w in self.ws}

    def chunk(self, model: np.ndarray, base: np.ndarray, start: int) -> None:
        inside_before = self.tallies[_TALLY_WINDOWS: 2 * _TALLY_WINDOWS].copy()
        flags, hits, magnitudes = self.scratch.for_chunk(model.size)
        stored = self.scratch.stored[: model.size]
        loops = _kernels.loops()
        loops.windows_tally(model, base, self.lows, self.highs, self.gathers, len(self.keys), self.tallies, flags, stored)
        inside = (self.tallies[_TALLY_WINDOWS: 2 * _TALLY_WINDOWS] - inside_before).tolist()
        for j in self.equal:
            self.equal[j].append(inside[self.keys.index(j)])
        if self.ws:
            _gather([self.keys[w] for w in self.ws], [inside[w] for w in self.ws], self.found, lambda *rows: loops.gather_stored(
                stored, self.gather_lows, self.gather_highs, start, *rows, flags, hits, magnitudes))

    def results(self) -> tuple[int, dict, dict, dict]:
        """(non-zero count, above, equal, found) of the share, as `_scan_in_parts` adds them up."""
        above = {j: int(self.tallies[w]) for w, j in enumerate(self.keys)}
        equal = {j: [torch.tensor(count) for count in counts] for j, counts in self.equal.items()}
        return int(self.tallies[2 * _TALLY_WINDOWS]), above, equal, self.found


def _counts_above_cpu(a: torch.Tensor, v: float) -> tuple[int, int]:
    """(entries > v, entries >= v) of a CPU chunk."""
    x = a.numpy()
    return int(np.count_nonzero(x > v)), int(np.count_nonzero(x >= v))


def _window_cpu(a: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(entries above hi, the values in [lo, hi], their positions in the chunk) of a CPU chunk; an open
    side (None) bounds nothing."""
    x = a.numpy()
    inside = x >= lo.item() if lo is not None else np.ones(x.shape, dtype=bool)
    n_above = 0
    if hi is not None:
        over = x > hi.item()
        n_above = int(np.count_nonzero(over))
        inside &= ~over
    at = np.flatnonzero(inside)
    return n_above, torch.from_numpy(x[at]), torch.from_numpy(at)


def _nth_equal(tv: TaskVector, value: float, counts: torch.Tensor, m: int, chunks: list[tuple[int, int]]) -> int:
    """Flat position of the m-th magnitude equal to `value` (1-based), given how many each chunk holds: only
    the chunk where the running count reaches m is recomputed."""
    running = counts.cumsum(0)
    c = int(torch.searchsorted(running, torch.tensor(m)))
    before = int(running[c - 1]) if c else 0
    s, e = chunks[c]
    a = tv.magnitudes(s, e, tv.buffer(e - s), tv.buffer(e - s, selection_dtype(tv.dtype)))
    if a.device.type == "cpu":  # numpy's flatnonzero: a third of torch.nonzero's time on a chunk
        return s + int(np.flatnonzero(a.numpy() == value)[m - before - 1])
    return s + int(torch.nonzero(a == value)[m - before - 1])


class Plan:
    """How one task vector is sparsified, chunk by chunk: `apply(d, start)` zeroes the entries of the flat
    chunk d = (model - base)[start:start + len(d)] that `rule` drops (multiplying by a 0/1 mask) and applies
    the L1 rescale factor `scale` when set. The merge pass may apply a plan from several threads at once."""

    def __init__(self, rule: KeepRule):
        self.rule = rule
        self.scale: torch.Tensor | None = None

    def apply(self, d: torch.Tensor, start: int, scratch: torch.Tensor) -> torch.Tensor:
        """Sparsify the chunk d in place; `scratch` is a buffer of d's length in the selection dtype."""
        if self.rule.keeps_nothing():
            return d.zero_()
        keep = self.rule.mask_into(d, start, scratch)
        if keep is not None:
            d.mul_(keep)
        if self.scale is not None:
            d.mul_(self.scale)
        return d


class L1Norms:
    """The L1 norms of a task vector before and after masking, accumulated chunk by chunk: each chunk's sum
    in the magnitudes' dtype (a float64 sum of float32 entries costs 15x more on CPU), the chunk sums in
    float64: Python floats on CPU (a torch scalar op per chunk cost more than DELLA's numpy sums), tensors on
    the device elsewhere (no synchronisation per chunk)."""

    def __init__(self, device: torch.device):
        cpu = device.type == "cpu"
        self.before = 0.0 if cpu else torch.zeros((), dtype=torch.float64, device=device)
        self.after = 0.0 if cpu else torch.zeros((), dtype=torch.float64, device=device)

    def add(self, a: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Add the chunk of magnitudes `a` and its masked part (`keep`: bool, or 0/1 of a's dtype; None keeps all).
        On CPU `a` is overwritten: numpy's pairwise sums (`_sums.run_sums`: the same order on every numpy
        version, the compiled loops' order) add in the same order whatever the thread count,
        where torch's sum and dot split the chunk by thread (so the rescale factor, and DARE's output, moved
        by an ulp between machines with different core counts)."""
        if a.device.type == "cpu":
            x = a.numpy()
            whole = float(run_sums(x))
            self.before += whole
            self.after += whole if keep is None else float(run_sums(np.multiply(x, keep.numpy(), out=x)))
            return
        whole = a.sum()
        self.before += whole
        self.after += whole if keep is None else torch.dot(a, keep.to(a.dtype))

    def add_rows(self, a: torch.Tensor, keep: torch.Tensor) -> None:
        """`add` for (r, c) magnitudes and their bool mask, row by row: each row summed in numpy's order (on
        CPU; `a` is overwritten), then the row sums as `add_sums` adds them. DELLA's compiled loop
        (`_kernel_loops.della_rows`) computes the same row sums while the rows are in cache."""
        if a.device.type == "cpu":
            x = a.numpy()
            whole = run_sums(x)
            self.add_sums(whole, run_sums(np.multiply(x, keep.numpy(), out=x)))
            return
        self.before += a.sum(1).sum(dtype=torch.float64)
        self.after += (a * keep).sum(1).sum(dtype=torch.float64)

    def add_sums(self, whole: np.ndarray, kept: np.ndarray) -> None:
        """Add rows' sums of magnitudes (`whole`) and of the kept ones (`kept`), summed in float64."""
        self.before += float(np.add.reduce(whole, dtype=np.float64))
        self.after += float(np.add.reduce(kept, dtype=np.float64))

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        return _l1_scale(*(torch.as_tensor(v, dtype=torch.float64) for v in (self.before, self.after)), dtype)


def _l1_scale(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's rescale factor, from float64 norm accumulators (compared and divided in the task vector's dtype)."""
    before, after = before.to(dtype), after.to(dtype)
    small = (before < eps) | (after < eps)
    return torch.where(small, torch.ones_like(before), before / torch.where(small, torch.ones_like(after), after))


def _masking_plan(tv: TaskVector, rule: KeepRule, *, rescale: bool, size: int) -> Plan:
    """The plan applying `rule`, with mergekit's L1 rescale factor when `rescale` (one more pass)."""
    plan = Plan(rule)
    if rescale:
        _set_rescale(plan, tv, size)
    return plan


def _set_rescale(plan: Plan, tv: TaskVector, size: int) -> None:
    """Set `plan.scale` so the masked task vector keeps its L1 norm (mergekit's rescale), in one pass."""
    sel = selection_dtype(tv.dtype)
    norms = L1Norms(tv.device)
    buf, abuf, mbuf = tv.buffer(size), tv.buffer(size, sel), tv.buffer(size, sel)
    for s, e in spans(tv.numel(), size):
        d = tv.chunk(s, e, buf[: e - s])
        keep = plan.rule.mask_into(d, s, mbuf[: e - s])
        norms.add(_abs_into(d, abuf[: e - s]), keep)
    plan.scale = norms.scale(tv.dtype)


TIE_ORDERS = ("position", "mergekit")
"""How entries of equal magnitude (or variance) at a selection threshold are chosen: "position" (earlier
flat position first; O(n) selection, the default) or "mergekit" (whatever order the sort mergekit calls
produces, by calling the same sort on the whole tensor: bit-equal to mergekit's masks on quantized task
vectors, at mergekit's cost; see `docs/task_vector_methods.md`)."""


def check_tie_order(tie_order: str) -> None:
    """Raise for an unknown tie order; the methods that take one call it on entry."""
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"unknown tie order {tie_order!r} (expected one of {', '.join(TIE_ORDERS)})")


def _sort_magnitudes(tv: TaskVector) -> torch.Tensor:
    """The flat magnitudes mergekit sorts: |model - base| in the compute dtype, as float32 on CPU."""
    w = tv.whole().abs()
    return w.float() if w.device.type == "cpu" else w


def _index_mask_plan(tv: TaskVector, indices: torch.Tensor, *, rescale: bool, size: int) -> Plan:
    """A plan keeping the entries at the flat `indices` (stored as a bool mask)."""
    stored = torch.zeros(tv.numel(), dtype=torch.bool, device=tv.device)
    stored[indices] = True
    return _masking_plan(tv, KeepRule(stored=stored), rescale=rescale, size=size)


def magnitude_plan(tv: TaskVector, density: float, *, rescale: bool, size: int, tie_order: str = "position") -> Plan | None:
    """Keep the max(1, floor(density * n)) largest-magnitude entries (TIES trimming); None when density >= 1.

    density <= 0 (or an empty tensor) keeps nothing. A positive density always keeps at least one entry, as
    mergekit does (older mergekit asserted here instead). Ties at the threshold: see `TIE_ORDERS`."""
    if density >= 1:
        return None
    n = tv.numel()
    if density <= 0 or n == 0:
        return Plan(KEEP_NOTHING)
    k = max(1, int(density * n))
    if tie_order == "mergekit":
        return _index_mask_plan(tv, torch.argsort(_sort_magnitudes(tv), descending=True)[:k], rescale=rescale, size=size)
    (cut,) = select_top(tv, [k], size)
    return _masking_plan(tv, KeepRule(keep=cut), rescale=rescale, size=size)


def outliers_plan(tv: TaskVector, density: float, gamma: float, *, rescale: bool, size: int,
                  tie_order: str = "position") -> Plan | None:
    """Model Breadcrumbs: drop the int(gamma * n) largest magnitudes, then the smallest, keeping int(density * n).

    When density + gamma > 1 the outlier cut shrinks so the kept count is still int(density * n). gamma = 0
    is plain magnitude trimming (with int(density * n), which may be 0, instead of max(1, ...))."""
    if density >= 1:
        return None
    n = tv.numel()
    keep_n = max(0, int(density * n))
    top_n = max(0, int(gamma * n))
    bottom_n = max(0, n - keep_n - top_n)
    if keep_n == 0 or n == 0:
        return Plan(KEEP_NOTHING)
    if tie_order == "mergekit":
        ascending = torch.sort(_sort_magnitudes(tv), descending=False).indices
        return _index_mask_plan(tv, ascending[bottom_n : bottom_n + keep_n], rescale=rescale, size=size)
    dropped_top = n - bottom_n - keep_n
    # Ascending ranks [bottom_n, bottom_n + keep_n): the top (n - bottom_n) minus the top dropped_top.
    kept, dropped = select_top(tv, [n - bottom_n, dropped_top], size)
    return _masking_plan(tv, KeepRule(keep=kept, drop=dropped), rescale=rescale, size=size)


class RandomWords:
    """Uniform random int32 words from a generator on another device than the CPU (CUDA), drawn there by
    torch chunk after chunk (`next`), so that a seeded device generator fixes them. CPU generators seed the
    SFC64 lanes instead (`LaneWords`). `next(count)` returns `prepare(words)` for the next `count` words (a
    flat int32 tensor on `device`); without `prepare`, the words."""

    def __init__(self, generator: torch.Generator, device: torch.device, prepare: Callable[[torch.Tensor], object] | None = None):
        self.device, self.generator = device, generator
        self.prepare = prepare or (lambda words: words)

    def next(self, count: int) -> object:
        words = torch.randint(-(2**31), 2**31, (count,), dtype=torch.int32, device=self.generator.device, generator=self.generator)
        return self.prepare(words.to(self.device))


def lane_state(seed: int) -> np.ndarray:
    """DELLA's stream from `seed`: `_kernels.LANES` SFC64 generators seeded by numpy's
    `SeedSequence(seed).spawn(LANES)`, as a (4, LANES) uint64 array (column k: stream k's four state words)
    that the compiled loops step together."""
    lanes = np.random.SeedSequence(seed).spawn(_kernels.LANES)
    return np.array([np.random.SFC64(child).state["state"]["state"] for child in lanes], dtype=np.uint64).T.copy()


class LaneWords:
    """DELLA's random words: `_kernels.LANES` streams (`lane_state`), stream k drawing for the columns
    j = k (mod LANES) of a row, every row taking ceil(cols / LANES) draws of each stream (the ones past the
    last column are dropped), an entry's two int32 words the lower and upper half of its draw. Why lanes:
    the compiled loop steps them together in SIMD registers, where one stream is a serial chain
    (`_kernel_loops.partner_keep`). `state` is the lanes' state for the compiled loop; `next_rows` draws the
    same words with numpy, for the other paths. Use one or the other for a plan, not both."""

    def __init__(self, seed: int):
        self.state = lane_state(seed)

    def _draws(self, steps: int) -> np.ndarray:
        """The next `steps` draws of every lane, (LANES, steps) uint64, advancing `state`."""
        draws = np.empty((_kernels.LANES, steps), dtype=np.uint64)
        for k in range(_kernels.LANES):
            bits = np.random.SFC64()
            bits.state = {"bit_generator": "SFC64", "state": {"state": self.state[:, k].copy()},
                          "has_uint32": 0, "uinteger": 0}
            draws[k] = bits.random_raw(steps)
            self.state[:, k] = bits.state["state"]["state"]
        return draws

    def next_rows(self, rows: int, cols: int) -> torch.Tensor:
        """DELLA's words: the 2 * rows * cols int32 words of the next `rows` rows of `cols` entries (flat, an
        entry's two words together), advancing `state`."""
        lanes, steps = _kernels.LANES, -(-cols // _kernels.LANES)
        draws = self._draws(rows * steps)
        by_entry = draws.reshape(lanes, rows, steps).transpose(1, 2, 0).reshape(rows, steps * lanes)[:, :cols]
        return torch.from_numpy(np.ascontiguousarray(by_entry).view(np.int32).reshape(-1))

    def block_words(self, count: int) -> np.ndarray:
        """DARE's words: one int32 word for each of the next `count` entries, in blocks of
        `_kernels.KEEP_BLOCK` entries (`count` a whole number of blocks but at the tensor's end): a block of m
        entries takes s = ceil(m / (2 * LANES)) steps of every lane, its first LANES * s entries the draws'
        lower halves in step then lane order, the rest their upper halves; what the compiled loop draws
        (`_kernel_loops.bernoulli_keep`). Both halves of every draw serve an entry, and the loop's stores
        run in order."""
        lanes, words = _kernels.LANES, np.empty(count, dtype=np.int32)
        for start in range(0, count, _kernels.KEEP_BLOCK):
            m = min(_kernels.KEEP_BLOCK, count - start)
            steps = -(-m // (2 * lanes))
            halves = self._draws(steps).T.copy().view(np.int32).reshape(steps * lanes, 2)  # (lower, upper) a draw
            words[start : start + m] = np.concatenate([halves[:, 0], halves[:, 1]])[:m]
        return words


def stream_seed(generator: torch.Generator | None) -> int:
    """The 63-bit seed of one plan's random lanes (`LaneWords`), drawn from a CPU generator (or torch's global one)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator))


def draws_on_cpu(generator: torch.Generator | None) -> bool:
    """Whether a plan seeds its SFC64 lanes from this generator (`LaneWords`; else `RandomWords` draws from it
    on its device, chunk by chunk)."""
    return generator is None or generator.device.type == "cpu"


def _int32_threshold(probability: float) -> int:
    """T such that a uniform int32 word w has P(w < T) = floor(probability * 2^32) / 2^32."""
    return min(2**32, max(0, math.floor(probability * 2**32))) - 2**31


def _stored_plan(tv: TaskVector, rescale: bool, chunks: list[tuple[int, int]],
                 fill: Callable[[int, int, torch.Tensor, L1Norms | None], object]) -> Plan:
    """A plan whose keep mask is made once, chunk by chunk in order (the random draws happen once), and stored
    as bool. `fill(s, e, out, norms)` writes the keep mask of [s, e) into the bool tensor `out` and, when
    `norms` is given (`rescale`), adds the chunk's L1 norms before and after masking to it."""
    stored = torch.empty(tv.numel(), dtype=torch.bool, device=tv.device)
    norms = L1Norms(tv.device) if rescale else None
    for s, e in chunks:
        fill(s, e, stored[s:e], norms)
    plan = Plan(KeepRule(stored=stored))
    if norms is not None:
        plan.scale = norms.scale(tv.dtype)
    return plan


class Bernoulli:
    """Independent keeps with probability `density` (to 2^-32): a word below `_int32_threshold(density)`
    (`threshold`, which the compiled loop compares with too)."""

    def __init__(self, density: float):
        self.threshold = _int32_threshold(density)

    def __call__(self, words: torch.Tensor) -> torch.Tensor:
        if words.device.type == "cpu":
            return torch.from_numpy(words.numpy() < self.threshold)
        return words < self.threshold


def _bernoulli_plan(tv: TaskVector, density: float, rescale: bool, generator: torch.Generator | None, size: int,
                    seed: int | None = None) -> Plan:
    """Independent keeps. On a CPU generator the words come from the SFC64 lanes in blocks
    (`LaneWords.block_words`), the chunks holding whole blocks; on the compiled path one loop draws them,
    compares them (0.24 ns an entry in cache) and sums the chunk's L1 norms while it is in cache
    (`_kernel_loops.bernoulli_rows`)."""
    block = _kernels.KEEP_BLOCK
    chunks = spans(tv.numel(), max(block, size - size % block))
    bernoulli = Bernoulli(density)
    if draws_on_cpu(generator):
        lanes = LaneWords(stream_seed(generator) if seed is None else seed)
        if tv.compiled():
            keep_rows = _kernels.loops().bernoulli_rows
            draws, sums = np.empty((2, block // 2), dtype=np.int32), np.empty((1, 2), dtype=np.float32)

            def fill(s, e, out, norms):
                keep_rows(*tv.operands(s, e), lanes.state, bernoulli.threshold, draws, out.numpy(),
                          sums[: 1 if norms is not None else 0])
                if norms is not None:
                    norms.add_sums(sums[:, 0], sums[:, 1])

            return _stored_plan(tv, rescale, chunks, fill)

        def next_keeps(count: int) -> torch.Tensor:
            return bernoulli(torch.from_numpy(lanes.block_words(count))).to(tv.device)
    else:
        next_keeps = RandomWords(generator, tv.device, prepare=bernoulli).next
    width = max((e - s for s, e in chunks), default=1)
    buf, abuf = tv.buffer(width), tv.buffer(width, selection_dtype(tv.dtype))

    def fill_from_words(s, e, out, norms):
        out.copy_(next_keeps(e - s))
        if norms is not None:
            norms.add(tv.magnitudes(s, e, buf[: e - s], abuf[: e - s]), out)

    return _stored_plan(tv, rescale, chunks, fill_from_words)


def random_plan(tv: TaskVector, density: float, *, rescale: bool, generator: torch.Generator | None, size: int,
                seed: int | None = None) -> Plan | None:
    """DARE: keep each entry independently with probability `density`; None (no draw) when density >= 1.
    `seed`: the stream's seed, drawn ahead with `stream_seed` in model order (else drawn here)."""
    if density >= 1:
        return None
    return _bernoulli_plan(tv, density, rescale, generator, size, seed)


def check_della(density: float, epsilon: float) -> str | None:
    """The problem with a (density, epsilon) pair, or None; only matters when 0 < density < 1."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        return f"epsilon {epsilon} with density {density}: density ± epsilon must stay inside (0, 1)"
    return None


class PartnerKeep:
    """DELLA's keep test for blocks of rows of `cols` magnitudes, without sorting or ranks.

    An entry of rank r (0-based, ascending magnitude) in a row of c is kept with probability
    p(r) = lo + (hi - lo) * r / (c - 1), with lo = density - epsilon and hi = density + epsilon; and
    r / (c - 1) is the chance that another entry of its row, picked uniformly, is smaller. So each entry
    draws u uniform in [0, 1) and a partner: it is kept when u < lo, dropped when u >= hi, and in between
    kept when its partner is smaller. It is then kept with probability lo + (hi - lo) * r / (c - 1) = p(r),
    independently of the other entries given the row: the distribution of ranking every row and drawing
    against p(rank) (mergekit: two argsorts of the whole tensor), for one random draw and one lookup an
    entry (a row sort alone cost more than this whole test).

    Ties: an equal partner counts as smaller on a fair coin, so an entry whose magnitude is shared by the
    ranks [L, R) of its row is kept with probability p((L + R - 1) / 2), that of its group's average rank, as
    if ties were ordered at random.

    Words: two int32 words an entry, the lower and upper half of one 64-bit draw (from `LaneWords` on a CPU
    generator, from `RandomWords` on another device's). The first's low bit is the coin and its other 31
    bits are u (to 2^-31); the second, read as unsigned h, gives k = floor(h * (c - 1) / 2^32), and the
    partner is column k, or k + 1 from the entry's own column on (uniform over the other c - 1 columns to
    (c - 1) / 2^32). Magnitudes compare as their bit patterns read as integers: non-negative IEEE floats
    order alike, and a NaN counts as larger than any number.

    Two ways to the same keeps: `__call__` with `prepare`d words (numpy on CPU, then one torch gather), or
    `compiled_into`, compiled loops that draw the same lanes themselves (float32 on CPU).
    """

    def __init__(self, cols: int, density: float, epsilon: float, dtype: torch.dtype):
        self.cols = cols
        self.bits_dtype = torch.int64 if dtype == torch.float64 else torch.int32
        # u = (v + 2^30) / 2^31 for v = first >> 1, so for an integer v "u < x" is "v < ceil(x * 2^31) - 2^30"
        self.low = math.ceil((density - epsilon) * 2**31) - 2**30
        self.high = math.ceil((density + epsilon) * 2**31) - 2**30

    def prepare(self, words: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(kept at once, kept if the partner is smaller, partner column, coin) per entry from its two words,
        for whole rows; with numpy on CPU."""
        if words.device.type != "cpu":
            return self.prepare_in_torch(words)
        c = self.cols
        w = words.numpy()
        first, second = w[0::2], w[1::2]
        u = first >> 1
        pick = (second.view(np.uint32).astype(np.int64) * (c - 1)) >> 32
        pick = pick.reshape(-1, c)
        pick += pick >= np.arange(c)
        return tuple(torch.from_numpy(a) for a in (u < self.low, u < self.high, pick, first & 1))

    def prepare_in_torch(self, words: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`prepare` with torch ops, on the words' device (a CUDA generator's words stay on the GPU)."""
        c = self.cols
        first, second = words[0::2], words[1::2]
        u = first >> 1
        pick = ((second.to(torch.int64) & 0xFFFFFFFF) * (c - 1)) >> 32
        pick = pick.view(-1, c)
        pick += pick >= torch.arange(c, device=words.device)
        return u < self.low, u < self.high, pick, first & 1

    def __call__(self, mags: torch.Tensor, prepared: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        """Bool keep mask of the (r, cols) magnitudes into `out`, given the `prepare`d words of r * cols entries."""
        r, c = mags.shape
        bits = mags.view(self.bits_dtype)
        at_once, if_smaller, partner, coin = prepared
        smaller = torch.gather(bits, 1, partner.view(r, c)).sub_(coin.view(r, c)) < bits
        kept = out.view(r, c)
        torch.logical_and(if_smaller.view(r, c), smaller, out=kept)
        return kept.logical_or_(at_once.view(r, c))

    def compiled_into(self, mags: torch.Tensor, state: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """`__call__` for float32 magnitudes on CPU, drawing the words from the lanes `state` (`lane_state`)."""
        r, c = mags.shape
        bits, keep = mags.view(torch.int32).numpy(), out.view(r, c).numpy()
        _kernels.loops().partner_keep(bits, state, self.low, self.high, _kernels.vector_gathers(), keep)
        return out

    def compiled_rows(self, tv: TaskVector, start: int, end: int, state: np.ndarray, out: torch.Tensor) -> np.ndarray:
        """`compiled_into` on the rows of tv[start:end] (whole rows), computing the magnitudes from the inputs
        as stored, a row at a time; returns the rows' L1 sums before and after masking, (r, 2) float32
        (`L1Norms.add_rows`)."""
        keep = out.view(-1, self.cols).numpy()
        sums = np.empty((keep.shape[0], 2), dtype=np.float32)
        _kernels.loops().della_rows(*tv.operands(start, end), state, self.low, self.high, _kernels.vector_gathers(), keep, sums)
        return sums


def della_plan(tv: TaskVector, shape: torch.Size, density: float, epsilon: float, *,
               rescale: bool, generator: torch.Generator | None, size: int, seed: int | None = None) -> Plan | None:
    """DELLA MagPrune: keep entries with probabilities linear in their magnitude rank within their row (dim 1;
    1-D tensors are one row), from density - epsilon (smallest) to density + epsilon (largest); see
    `PartnerKeep`. A row of length 1 keeps with probability `density`. Tensors of at most 2 dimensions are
    tested in blocks of rows; others whole. `seed`: the stream's seed, drawn ahead with `stream_seed` in
    model order (else drawn here, when the words come from a CPU generator)."""
    if density >= 1:
        return None
    n = tv.numel()
    if density <= 0 or n == 0:
        return Plan(KEEP_NOTHING)
    problem = check_della(density, epsilon)
    if problem:
        raise MethodInputError(problem)
    cols = shape[1] if len(shape) >= 2 else n
    if cols == 1:
        return _bernoulli_plan(tv, density, rescale, generator, size, seed)
    sel = selection_dtype(tv.dtype)
    whole = len(shape) > 2  # rows along dim 1: move it last, test the whole tensor, move the mask back
    rows_per = n // cols if whole else max(1, min(size // cols, n // cols))
    keep = PartnerKeep(cols, density, epsilon, sel)
    lanes = LaneWords(stream_seed(generator) if seed is None else seed) if draws_on_cpu(generator) else None
    compiled = lanes is not None and tv.compiled()
    if compiled:  # the loops draw the lanes themselves

        def keep_block(mags, out):
            return keep.compiled_into(mags, lanes.state, out)
    elif lanes is not None:

        def keep_block(mags, out):
            return keep(mags, keep.prepare(lanes.next_rows(*mags.shape).to(tv.device)), out)
    else:
        words = RandomWords(generator, tv.device, prepare=keep.prepare)

        def keep_block(mags, out):
            return keep(mags, words.next(2 * mags.numel()), out)

    # the L1 norms are summed by rows (of the test's layout), in the same order on every CPU path
    if whole:
        moved = (shape[0], *shape[2:], cols)
        a, buf = tv.buffer(n, sel), tv.buffer(n)

        def fill_whole(s, e, out, norms):
            mags = tv.magnitudes(0, n, buf, a).view(shape).movedim(1, -1).contiguous().view(-1, cols)
            mask = keep_block(mags, torch.empty(mags.shape, dtype=torch.bool, device=tv.device))
            out.copy_(mask.view(moved).movedim(-1, 1).reshape(-1))
            if norms is not None:
                norms.add_rows(mags, mask)

        return _stored_plan(tv, rescale, [(0, n)], fill_whole)
    width = rows_per * cols
    if compiled:  # magnitudes, test and row sums in one loop (`_kernel_loops.della_rows`)

        def fill_rows(s, e, out, norms):
            sums = keep.compiled_rows(tv, s, e, lanes.state, out)
            if norms is not None:
                norms.add_sums(sums[:, 0], sums[:, 1])
    else:
        abuf, buf = tv.buffer(width, sel), tv.buffer(width)

        def fill_rows(s, e, out, norms):
            mags = tv.magnitudes(s, e, buf[: e - s], abuf[: e - s]).view(-1, cols)
            mask = keep_block(mags, out.view(-1, cols))
            if norms is not None:
                norms.add_rows(mags, mask)

    return _stored_plan(tv, rescale, spans(n, rows_per * cols), fill_rows)


def sparsified(plan: Plan | None, tv: TaskVector) -> torch.Tensor:
    """The whole sparsified task vector under `plan` (flat); for benchmarks and analysis."""
    out = tv.whole()
    if plan is None:
        return out
    size = chunk_size(out)
    scratch = torch.empty(min(size, max(out.numel(), 1)), dtype=selection_dtype(out.dtype), device=out.device)
    for s, e in spans(out.numel(), size):
        plan.apply(out[s:e], s, scratch[: e - s])
    return out


def variance_across(tvs: Sequence[TaskVector], size: int) -> torch.Tensor:
    """Per-entry population variance of the task vectors (of one base), chunk by chunk, in their dtype.

    Welford's update in float64 from the first model to the last, rounded once to the task vectors' dtype:
    the same arithmetic as torch.var(stacked, dim=0, unbiased=False) on CPU, so the values (and therefore
    SCE's selection) equal mergekit's bit for bit, without stacking the task vectors or torch.var's slow
    reduction across the leading dimension.
    """
    n = tvs[0].numel()
    out = torch.empty(n, dtype=tvs[0].dtype, device=tvs[0].device)
    delta = tvs[0].buffer(size)
    if len(tvs) == 2:
        return _variance_of_two(tvs, size, out, delta)
    if n and all(tv.compiled() for tv in tvs):
        return _compiled_variance(tvs, size, out)
    for s, e in spans(n, size):
        mean = tvs[0].chunk(s, e, delta[: e - s]).to(torch.float64, copy=True)
        m2 = torch.zeros_like(mean)
        for count, tv in enumerate(tvs[1:], start=2):
            x = tv.chunk(s, e, delta[: e - s]).to(torch.float64, copy=True)
            step = x - mean
            mean.add_(step / count)
            m2.add_(step.mul_(x.sub_(mean)))
        torch.div(m2, len(tvs), out=m2)
        out[s:e] = m2
    return out


# Entries per block of `_kernel_loops.welford_variance_into` (its two float64 scratch rows: 8 KB in L1).
VARIANCE_BLOCK = 512


def _compiled_variance(tvs: Sequence[TaskVector], size: int, out: torch.Tensor) -> torch.Tensor:
    """`variance_across` for three or more float32 task vectors on CPU, by `_kernels`' loops on every thread:
    the float64 Welford update across the task vectors (`welford_variance_into`): for three to twelve models
    entry by entry in a loop generated for the count (`_generated_loops.variance_loop`), for more on float32
    rows made a block at a time (`variance_into`). The same bits as the torch loop, which took 9.7 of a
    19.8 s SCE merge of three 1B fine-tunes on one thread."""
    flat = out.numpy()

    def work(chunks):
        if len(tvs) <= _generated_loops.MAX_MODELS:  # one loop from the inputs (1B, three: 2.75 s of 5.5 s thread time were the rows)
            variance_into = _generated_loops.variance_loop(len(tvs))
            for s, e in chunks:
                models, base = models_and_base(tvs, s, e)
                variance_into(tuple(models), base, flat[s:e])
            return
        loops = _kernels.loops()
        rows = np.empty((len(tvs), VARIANCE_BLOCK), dtype=np.float32)
        mean, m2 = np.empty(VARIANCE_BLOCK, dtype=np.float64), np.empty(VARIANCE_BLOCK, dtype=np.float64)
        for s, e in chunks:
            models, base = models_and_base(tvs, s, e)
            loops.variance_into(tuple(models), base, rows, mean, m2, flat[s:e])

    in_parts(spans(out.numel(), size), work, out.device)
    return out


def _variance_of_two(tvs: Sequence[TaskVector], size: int, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`variance_across` for two task vectors (the common SCE merge): the Welford loop's float64 operations
    in the same order, minus its exact no-ops (adding to a zero m2; the halvings done as multiplications by
    0.5): 8 passes over the chunk instead of 11, the same bits."""
    for s, e in spans(out.numel(), size):
        mean = tvs[0].chunk(s, e, delta[: e - s]).to(torch.float64, copy=True)
        x = tvs[1].chunk(s, e, delta[: e - s]).to(torch.float64, copy=True)
        step = x - mean
        mean.add_(step, alpha=0.5)  # mean + step / 2: the product is exact, one rounding, as in the loop
        out[s:e] = step.mul_(x.sub_(mean)).mul_(0.5)
    return out


def top_fraction_count(nonzero: int, fraction: float) -> int:
    """SCE's selection size: int(fraction * m) of the m entries with non-zero variance."""
    return int(nonzero * fraction) if fraction > 0 else 0
