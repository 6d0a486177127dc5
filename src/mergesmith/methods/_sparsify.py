"""Sparsification steps for task vectors: small pure functions that compose.

Each step takes one task vector (fine-tune minus base) and returns a tensor of the same shape, or a boolean
keep-mask that `apply_mask` turns into one. They follow mergekit's semantics (`mergekit/sparsify.py`) but
select instead of sorting whole tensors:

* `magnitude`: keep the k = max(1, floor(density * n)) largest magnitudes (TIES). Selection finds the k-th
  largest magnitude with a sampled window plus `torch.kthvalue` on the few candidates in it, O(n), instead
  of argsorting all n values.
* `magnitude_outliers`: Model Breadcrumbs: drop the `gamma` fraction of largest magnitudes and then the
  smallest, keeping floor(density * n). Two thresholds, no sort.
* `random_drop`: DARE: keep each element with probability `density`.
* `della_magprune`: DELLA: per-row keep probabilities ranging linearly from density - epsilon (smallest
  magnitude of the row) to density + epsilon (largest). Ranks come from one sort of each row's magnitudes
  reinterpreted as integers (same order for non-negative floats, and a much faster kernel), in row
  chunks so that the int64 sort indices never cover the whole tensor at once.
* `inplace=True` (used by the methods, which own their task vectors) masks without a copy.
* `rescale_l1`: after masking, scale so the L1 norm matches the unmasked vector (mergekit's `rescale`).

Ties at a threshold: mergekit keeps exactly k elements and breaks ties in whatever order its (unstable)
argsort happens to produce. We also keep exactly k, and break ties by position: among equal magnitudes the
earlier element (in flattened order) counts as the larger. On continuous data ties do not occur and the
kept sets are identical; on quantized (e.g. bfloat16) deltas the kept count is still exact.

Randomness: uniform numbers are drawn in float32 with the caller's `torch.Generator` on the generator's
own device and moved to the tensor's device, so the same seed gives the same mask on any compute dtype,
and a CPU generator still works for CUDA tensors (at the cost of a host-to-device copy). The keep test
`u < p` replaces `torch.bernoulli(p)`: on CPU it consumes the generator exactly as `torch.bernoulli` does
(so a seeded run is bit-identical to mergekit after `torch.manual_seed` with the same seed; see
`bench/parity_task_vectors.py`) and is about twice as fast. On CUDA the streams are not promised to match.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from mergesmith.methods.registry import MethodInputError

# Below this many elements, plain kthvalue on everything is as fast as anything cleverer.
_SMALL = 1 << 16
# Sample size for the candidate window of the threshold search.
_SAMPLE = 1 << 14
# Elements per row chunk in DELLA's per-row ranking (bounds the int64 index tensor of the sort).
_RANK_CHUNK = 1 << 22


def magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor| as a flat contiguous tensor in a selection-friendly dtype (float32; float64 stays float64)."""
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.reshape(-1).to(dtype).abs()


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1 <= k <= n) of a flat tensor, as a 0-dim tensor, in O(n).

    A strided sample brackets the target rank in a value window [lo, hi]; one pass counts the entries above
    the window and gathers the (few) entries inside it, and `kthvalue` finishes on those. When the window
    misses (adversarial data), it falls back to `kthvalue` on everything, so the answer is always exact.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} values")
    rank = n - k + 1  # 1-based ascending rank of the target
    if n <= _SMALL:
        return torch.kthvalue(values, rank).values
    step = (n // _SAMPLE) | 1  # odd, so it does not alias with power-of-two row lengths
    sample = values[::step].contiguous()
    s = sample.numel()
    q = (rank - 0.5) / n
    centre = q * s
    margin = 4.0 * math.sqrt(s * q * (1 - q)) + 8.0
    lo_rank = int(centre - margin)
    hi_rank = int(math.ceil(centre + margin))
    if lo_rank >= 1:
        lo = torch.kthvalue(sample, lo_rank).values
        inside = values >= lo
    else:
        lo, inside = None, None
    if hi_rank <= s:
        hi = torch.kthvalue(sample, hi_rank).values
        above = values > hi
        inside = ~above if inside is None else inside.logical_and_(~above)
        n_above = int(torch.count_nonzero(above))
    else:
        n_above = 0
    if inside is None:
        return torch.kthvalue(values, rank).values
    window = values[inside]
    need = k - n_above  # the target is the need-th largest inside the window
    if 1 <= need <= window.numel():
        return torch.kthvalue(window, window.numel() - need + 1).values
    return torch.kthvalue(values, rank).values


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest entries of a flat tensor; ties go to the earlier position."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = kth_largest(values, k)
    mask = values >= threshold
    count = int(torch.count_nonzero(mask))
    if count > k:  # ties at the threshold: keep the earliest of them
        mask = values > threshold
        tied = values == threshold
        ctype = torch.int32 if n < 2**31 else torch.int64
        mask |= tied & (tied.cumsum(0, dtype=ctype) <= k - int(torch.count_nonzero(mask)))
    return mask


def apply_mask(tensor: torch.Tensor, keep: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """`tensor` with the entries outside the (flat or same-shape) boolean `keep` set to zero (a copy unless
    `inplace`)."""
    keep = keep.reshape(tensor.shape)
    if inplace:  # masked_fill_ avoids mul_'s bool-to-float conversion copy
        return tensor.masked_fill_(keep.logical_not(), 0)
    return tensor * keep


def rescale_l1(original: torch.Tensor | None, masked: torch.Tensor, eps: float = 1e-7, *, before: torch.Tensor | None = None) -> torch.Tensor:
    """Scale `masked` (in place) so its L1 norm equals `original`'s (or `before`, that norm computed
    earlier); unchanged when either norm < eps. The condition is evaluated on the device (no host sync).
    """
    if before is None:
        before = original.abs().sum()
    after = masked.abs().sum()
    small = (before < eps) | (after < eps)
    scale = torch.where(small, torch.ones_like(before), before / torch.where(small, torch.ones_like(after), after))
    return masked.mul_(scale)


def _finish(tensor: torch.Tensor, keep: torch.Tensor, rescale: bool, inplace: bool) -> torch.Tensor:
    before = tensor.abs().sum() if rescale else None
    masked = apply_mask(tensor, keep, inplace=inplace)
    return rescale_l1(None, masked, before=before) if rescale else masked


def magnitude(tensor: torch.Tensor, density: float, *, rescale: bool = False, inplace: bool = False) -> torch.Tensor:
    """Keep the max(1, floor(density * n)) largest-magnitude entries (TIES trimming); density >= 1 is a no-op.

    density <= 0 (or an empty tensor) keeps nothing. A positive density always keeps at least one entry, as
    mergekit does (older mergekit asserted here instead).
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * n))
    return _finish(tensor, top_k_mask(magnitudes(tensor), k), rescale, inplace)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, gamma: float, *, rescale: bool = False, inplace: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(gamma * n) largest magnitudes, then the smallest, keeping int(density * n).

    When density + gamma > 1 the outlier cut shrinks so the kept count is still int(density * n). gamma = 0
    is plain magnitude trimming (with int(density * n), which may be 0, instead of max(1, ...)).
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep_n = max(0, int(density * n))
    top_n = max(0, int(gamma * n))
    bottom_n = max(0, n - keep_n - top_n)
    if keep_n == 0 or n == 0:
        return torch.zeros_like(tensor)
    values = magnitudes(tensor)
    # Ascending ranks [bottom_n, bottom_n + keep_n): the top (n - bottom_n) minus the top (n - bottom_n - keep_n).
    keep = top_k_mask(values, n - bottom_n)
    dropped_top = n - bottom_n - keep_n
    if dropped_top > 0:
        keep &= ~top_k_mask(values, dropped_top)
    return _finish(tensor, keep, rescale, inplace)


def uniform(shape: torch.Size | tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """float32 U[0, 1) numbers of `shape` on `device`, drawn with `generator` on the generator's device."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=torch.float32)
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return u.to(device)


def random_drop(
    tensor: torch.Tensor,
    density: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`; density >= 1 is a no-op (no draw)."""
    if density >= 1:
        return tensor
    keep = uniform(tensor.shape, tensor.device, generator) < density
    return _finish(tensor, keep, rescale, inplace)


def della_probabilities(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probabilities: density - epsilon + 2 * epsilon * (rank - 1) / (row length - 1).

    Ranks are by magnitude, ascending, within each row along dim 1 (1-D tensors are one row; for N-D
    tensors dim 1 is the ranked axis, as in mergekit). A row of length 1 gets probability `density`
    (mergekit divides 0 by 0 there). Ties are ranked in sort order (arbitrary but deterministic).
    """
    work = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    moved = work.movedim(1, -1)
    n = moved.shape[-1]
    rows = moved.reshape(-1, n)
    if n == 1:
        return torch.full_like(tensor, density, dtype=torch.float32 if tensor.dtype != torch.float64 else tensor.dtype)
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    int_view = torch.int64 if dtype == torch.float64 else torch.int32
    step = torch.arange(n, device=tensor.device, dtype=dtype) / (n - 1)
    by_rank = (density - epsilon) + step * 2 * epsilon
    probs = torch.empty(rows.shape, device=tensor.device, dtype=dtype)
    chunk = max(1, _RANK_CHUNK // n)
    for start in range(0, rows.shape[0], chunk):
        mags = rows[start : start + chunk].to(dtype).abs()
        # Non-negative IEEE floats order like their bit patterns read as integers; integer sorts are faster.
        order = torch.sort(mags.view(int_view), dim=1).indices
        probs[start : start + chunk].scatter_(1, order, by_rank.expand(order.shape[0], n))
    probs = probs.reshape(moved.shape).movedim(-1, 1)
    return probs.reshape(tensor.shape)


def check_della(density: float, epsilon: float) -> str | None:
    """The problem with a (density, epsilon) pair, or None; only matters when 0 < density < 1."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        return f"epsilon {epsilon} with density {density}: density ± epsilon must stay inside (0, 1)"
    return None


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """DELLA MagPrune: keep entries with magnitude-ranked probabilities around `density` (see `della_probabilities`)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    problem = check_della(density, epsilon)
    if problem:
        raise MethodInputError(problem)
    keep = uniform(tensor.shape, tensor.device, generator) < della_probabilities(tensor, density, epsilon)
    return _finish(tensor, keep, rescale, inplace)


def variance_topk(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE selection: mask of the int(fraction * m) entries with the largest variance across models, where m
    counts the entries of non-zero variance. `task_vectors` is stacked (models first); the mask has one
    model's shape. fraction >= 1 selects everything, <= 0 nothing."""
    shape = task_vectors.shape[1:]
    device = task_vectors.device
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction)
    return top_k_mask(magnitudes(var), k).reshape(shape)


# --- Chunked plans -----------------------------------------------------------------------------------------
#
# The functions above take a whole task vector. The task-vector methods instead stream: each model's task
# vector is never stored; a *plan* is made from passes over cache-sized chunks of (model - base), and the
# merge recomputes each chunk of the task vector, masks it with `Plan.apply`, and combines it. On CPU this
# replaces a dozen full-size temporaries per model (each costing a page-faulted allocation and a trip
# through DRAM) with a few chunk-size buffers that stay in cache. The kept sets, thresholds, random
# streams and per-element arithmetic are those of the whole-tensor functions above.

# Elements per chunk on CPU: 1 MiB of float32. Measured on 3 x 4096^2 float32 (ties, idle 2-core EPYC):
# 2^16 0.41 s, 2^18 0.28 s, 2^20 0.31 s, 2^22 0.43 s with 2 threads (2^18 also best with 1): small chunks
# pay per-op thread synchronisation, large ones fall out of cache. Other devices use one chunk.
CHUNK = 1 << 18


def chunk_size(tensor: torch.Tensor) -> int:
    """Chunk length for streaming over `tensor`: CHUNK on CPU, the whole tensor elsewhere."""
    return CHUNK if tensor.device.type == "cpu" else max(1, tensor.numel())


def spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _abs_into(d: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|d| in the selection dtype (as `magnitudes`), into `out` when given and d is float32/float64."""
    if d.dtype in (torch.float32, torch.float64):
        return torch.abs(d, out=out) if out is not None else d.abs()
    return d.to(torch.float32).abs()


class _Cut:
    """Top-k membership of magnitudes: `a >= threshold`, or with ties at the threshold the earliest `tie_need`
    of them (in flat order, counted across the chunks of one pass, which start at 0 and go in order)."""

    def __init__(self, everything: bool, threshold: torch.Tensor | None = None, tie_need: int | None = None):
        self.everything, self.threshold, self.tie_need = everything, threshold, tie_need
        self._seen = 0
        self.nan_free = False  # set by select_top when no magnitude was NaN (enables `mask_fast`)

    def mask_fast(self, d: torch.Tensor, scratch: torch.Tensor) -> bool:
        """Zero the entries of d with |d| below the threshold, exactly as `d.masked_fill_(~keep(|d|), 0)`,
        with two vectorized `threshold_` passes instead of comparisons and a branchy masked fill; False
        (nothing done) where that is not exact: ties, NaNs or a dtype other than float32/float64.

        `threshold_(x, t, 0)` keeps x > t, so with t the float just below the threshold, d > t keeps the large
        positive entries and -d > t the large negative ones; d - (-d kept) recombines them. Every kept
        entry is its own value and every dropped one +0, as with the fill."""
        if not self.nan_free or self.threshold is None or d.dtype not in (torch.float32, torch.float64):
            return False
        if self.threshold.dtype != d.dtype:
            return False
        if float(self.threshold) <= 0:
            return self.tie_need is None  # |d| >= 0 keeps everything that is not NaN
        if self.tie_need is None:
            cut = float(torch.nextafter(self.threshold, torch.tensor(float("-inf"), dtype=d.dtype)))
            restore = None
        else:  # keep |d| > threshold, then put back the earliest tied entries (few, found by `find_ties`)
            if self._tie_positions is None:
                return False
            cut = float(self.threshold)
            start = self._chunk_start
            local = [p - start for p in self._tie_positions if start <= p < start + d.numel()]
            restore = (torch.tensor(local, dtype=torch.int64, device=d.device), None) if local else None
            if restore is not None:
                restore = (restore[0], d[restore[0]].clone())
        neg = torch.neg(d, out=scratch)
        torch.nn.functional.threshold_(neg, cut, 0.0)
        torch.nn.functional.threshold_(d, cut, 0.0)
        d.sub_(neg)
        if restore is not None:
            d[restore[0]] = restore[1]
        return True

    _tie_positions: list[int] | None = None
    _chunk_start = 0

    def find_ties(self, model: torch.Tensor, base: torch.Tensor, size: int) -> None:
        """Record the flat positions of the `tie_need` earliest entries tied at the threshold (for `mask_fast`)."""
        if self.tie_need is None or self.threshold is None or not self.nan_free:
            return
        found: list[int] = []
        buf = torch.empty(min(size, model.numel()), dtype=model.dtype, device=model.device)
        for s, e in spans(model.numel(), size):
            a = _abs_into(torch.sub(model[s:e], base[s:e], out=buf[: e - s]))
            hits = torch.nonzero(a == self.threshold).flatten()
            if hits.numel():
                found.extend((hits[: self.tie_need - len(found)] + s).tolist())
                if len(found) >= self.tie_need:
                    break
        self._tie_positions = found

    def keep(self, a: torch.Tensor, start: int) -> torch.Tensor | None:
        """Boolean keep mask of the chunk `a`, or None for "all"."""
        if self.threshold is None:
            return None if self.everything else torch.zeros(a.shape, dtype=torch.bool, device=a.device)
        if self.tie_need is None:
            return a >= self.threshold
        if start == 0:
            self._seen = 0
        mask = a > self.threshold
        tied = a == self.threshold
        counts = tied.cumsum(0, dtype=torch.int64).add_(self._seen)
        self._seen += int(torch.count_nonzero(tied))
        return mask.logical_or_(tied.logical_and_(counts <= self.tie_need))


_ALL = _Cut(True)
_NONE = _Cut(False)


def _window(sample: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """kth_largest's candidate window [lo, hi] (either side None when open)."""
    s = sample.numel()
    rank = n - k + 1
    q = (rank - 0.5) / n
    centre = q * s
    margin = 4.0 * math.sqrt(s * q * (1 - q)) + 8.0
    lo_rank = int(centre - margin)
    hi_rank = int(math.ceil(centre + margin))
    lo = torch.kthvalue(sample, lo_rank).values if lo_rank >= 1 else None
    hi = torch.kthvalue(sample, hi_rank).values if hi_rank <= s else None
    return lo, hi


def _cut_from_values(values: torch.Tensor, k: int) -> _Cut:
    threshold = kth_largest(values, k)
    count_ge = int(torch.count_nonzero(values >= threshold))
    if count_ge <= k:
        return _Cut(False, threshold)
    return _Cut(False, threshold, k - int(torch.count_nonzero(values > threshold)))


def select_top(model: torch.Tensor, base: torch.Tensor, ks: Sequence[int], size: int) -> list[_Cut]:
    """For flat `model` and `base`, the top-k cut of |model - base| for each k in `ks`, from one chunked pass.

    As `kth_largest`: a strided sample brackets each target rank in a window; the pass counts the entries
    above each window and gathers those inside; `kthvalue` finishes. Exact; a missed window falls back to
    whole-tensor selection.
    """
    n = model.numel()
    cuts: list[_Cut | None] = [(_NONE if k <= 0 else _ALL if k >= n else None) for k in ks]
    todo = [j for j, c in enumerate(cuts) if c is None]
    if not todo:
        return cuts  # type: ignore[return-value]
    if n <= max(size, _SMALL):
        values = _abs_into(model - base)
        for j in todo:
            cuts[j] = _cut_from_values(values, ks[j])
        _mark_nan_free(cuts, values.sum())
        return cuts  # type: ignore[return-value]
    step = (n // _SAMPLE) | 1
    sample = _abs_into(model[::step] - base[::step]).contiguous()
    windows = {j: _window(sample, n, ks[j]) for j in todo}
    if any(lo is None and hi is None for lo, hi in windows.values()):
        values = _abs_into(model - base)
        for j in todo:
            cuts[j] = _cut_from_values(values, ks[j])
        return cuts  # type: ignore[return-value]
    above = {j: torch.zeros((), dtype=torch.int64, device=model.device) for j in todo}
    parts: dict[int, list[torch.Tensor]] = {j: [] for j in todo}
    buf = torch.empty(min(size, n), dtype=model.dtype, device=model.device)
    mass = torch.zeros((), dtype=torch.float32 if model.dtype != torch.float64 else torch.float64, device=model.device)
    for s, e in spans(n, size):
        d = torch.sub(model[s:e], base[s:e], out=buf[: e - s])
        a = _abs_into(d, d if d.dtype in (torch.float32, torch.float64) else None)
        mass += a.sum()  # NaN iff some |d| is NaN (all terms are >= 0)
        for j in todo:
            lo, hi = windows[j]
            if hi is not None:
                over = a > hi
                above[j] += torch.count_nonzero(over)
                inside = over.logical_not_()
                if lo is not None:
                    inside.logical_and_(a >= lo)
            else:
                inside = a >= lo
            parts[j].append(a[inside])
    fallback = None
    for j in todo:
        k = ks[j]
        window = torch.cat(parts[j])
        n_above = int(above[j])
        need = k - n_above
        if 1 <= need <= window.numel():
            threshold = torch.kthvalue(window, window.numel() - need + 1).values
            count_ge = n_above + int(torch.count_nonzero(window >= threshold))
            if count_ge <= k:
                cuts[j] = _Cut(False, threshold)
            else:
                cuts[j] = _Cut(False, threshold, k - n_above - int(torch.count_nonzero(window > threshold)))
        else:
            if fallback is None:
                fallback = _abs_into(model - base)
            cuts[j] = _cut_from_values(fallback, k)
    _mark_nan_free(cuts, mass)
    return cuts  # type: ignore[return-value]


def _mark_nan_free(cuts: list, mass: torch.Tensor) -> None:
    if not bool(torch.isnan(mass)):
        for cut in cuts:
            if cut is not _ALL and cut is not _NONE:
                cut.nan_free = True


class Plan:
    """How one task vector is sparsified, chunk by chunk: `apply(d, start)` zeroes the dropped entries of the
    flat chunk d = (model - base)[start:start + len(d)] in place and applies the L1 rescale factor."""

    def __init__(self, keep: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor | None] | None, zero: bool = False):
        self._keep, self.zero, self.scale = keep, zero, None

    def keep(self, d: torch.Tensor, a: torch.Tensor | None, start: int) -> torch.Tensor | None:
        return None if self._keep is None else self._keep(d, a, start)

    def apply(self, d: torch.Tensor, start: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        if self.zero:
            return d.zero_()
        if self.drop is not None:  # a stored mask: torch.where is a vectorized blend, masked_fill_ branches
            torch.where(self.drop[start : start + d.numel()], self._zero(d), d, out=d)
            if self.scale is not None:
                d.mul_(self.scale)
            return d
        if self.fast_cut is not None:
            self.fast_cut._chunk_start = start
        if self.fast_cut is not None and scratch is not None and self.fast_cut.mask_fast(d, scratch):
            if self.scale is not None:
                d.mul_(self.scale)
            return d
        a = _abs_into(d, scratch if scratch is not None and scratch.dtype == d.dtype else None) if self._needs_abs else None
        keep = self.keep(d, a, start)
        if keep is not None:
            d.masked_fill_(keep.logical_not(), 0)
        if self.scale is not None:
            d.mul_(self.scale)
        return d

    _needs_abs = True
    drop: torch.Tensor | None = None

    @staticmethod
    def _zero(d: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=d.dtype, device=d.device)
    fast_cut: "_Cut | None" = None


def _l1_scale(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """rescale_l1's factor from float64 norm accumulators (compared and divided in the task vector's dtype)."""
    before, after = before.to(dtype), after.to(dtype)
    small = (before < eps) | (after < eps)
    return torch.where(small, torch.ones_like(before), before / torch.where(small, torch.ones_like(after), after))


def _rescale_pass(plan: Plan, model: torch.Tensor, base: torch.Tensor, size: int) -> None:
    """Set `plan.scale` so each masked task vector keeps its L1 norm (mergekit's rescale)."""
    n = model.numel()
    before = torch.zeros((), dtype=torch.float64, device=model.device)
    after = torch.zeros((), dtype=torch.float64, device=model.device)
    buf = torch.empty(min(size, n), dtype=model.dtype, device=model.device)
    abuf = torch.empty(min(size, n), dtype=model.dtype, device=model.device)
    for s, e in spans(n, size):
        d = torch.sub(model[s:e], base[s:e], out=buf[: e - s])
        a = _abs_into(d, abuf[: e - s] if d.dtype in (torch.float32, torch.float64) else None)
        before += a.sum(dtype=torch.float64)
        keep = plan.keep(d, a, s)
        if keep is not None:
            a = a.masked_fill_(keep.logical_not_(), 0)
        after += a.sum(dtype=torch.float64)
    plan.scale = _l1_scale(before, after, model.dtype)


def magnitude_plan(model: torch.Tensor, base: torch.Tensor, density: float, *, rescale: bool, size: int) -> Plan | None:
    """Chunked `magnitude` (flat model and base); None when nothing is dropped."""
    if density >= 1:
        return None
    n = model.numel()
    if density <= 0 or n == 0:
        return Plan(None, zero=True)
    (cut,) = select_top(model, base, [max(1, int(density * n))], size)
    plan = Plan(lambda d, a, s: cut.keep(a, s))
    plan.fast_cut = cut
    cut.find_ties(model, base, size)
    if rescale:
        _rescale_pass(plan, model, base, size)
    return plan


def outliers_plan(model: torch.Tensor, base: torch.Tensor, density: float, gamma: float, *, rescale: bool, size: int) -> Plan | None:
    """Chunked `magnitude_outliers`."""
    if density >= 1:
        return None
    n = model.numel()
    keep_n = max(0, int(density * n))
    top_n = max(0, int(gamma * n))
    bottom_n = max(0, n - keep_n - top_n)
    if keep_n == 0 or n == 0:
        return Plan(None, zero=True)
    dropped_top = n - bottom_n - keep_n
    ks = [n - bottom_n] + ([dropped_top] if dropped_top > 0 else [])
    cuts = select_top(model, base, ks, size)

    def keep(d, a, s):
        mask = cuts[0].keep(a, s)
        if len(cuts) > 1:
            drop = cuts[1].keep(a, s)
            if mask is None:
                mask = torch.ones(a.shape, dtype=torch.bool, device=a.device)
            if drop is None:
                return torch.zeros(a.shape, dtype=torch.bool, device=a.device)
            mask = mask.logical_and_(drop.logical_not_())
        return mask

    plan = Plan(keep)
    if rescale:
        _rescale_pass(plan, model, base, size)
    return plan


def _stored_mask_plan(model, base, rescale, size, keep_chunks) -> Plan:
    """A plan whose keep mask is computed once (random draws happen once, in order) and stored as bool.

    `keep_chunks(d, s, e)` returns the keep mask of chunk [s, e) given that chunk of the task vector d."""
    n = model.numel()
    drop = torch.empty(n, dtype=torch.bool, device=model.device)  # stored inverted: what apply needs
    zero = torch.zeros((), dtype=model.dtype, device=model.device)
    before = torch.zeros((), dtype=torch.float64, device=model.device)
    after = torch.zeros((), dtype=torch.float64, device=model.device)
    buf = torch.empty(min(size, n), dtype=model.dtype, device=model.device)
    abuf = torch.empty(min(size, n), dtype=model.dtype, device=model.device)
    for s, e in keep_chunks.spans:
        d = torch.sub(model[s:e], base[s:e], out=buf[: e - s])
        k = drop[s:e]
        torch.logical_not(keep_chunks(d, s, e), out=k)
        if rescale:
            a = _abs_into(d, abuf[: e - s] if d.dtype in (torch.float32, torch.float64) else None)
            before += a.sum(dtype=torch.float64)
            after += torch.where(k, zero, a, out=a).sum(dtype=torch.float64)
    plan = Plan(None)
    plan.drop = drop
    if rescale:
        plan.scale = _l1_scale(before, after, model.dtype)
    return plan


class _Draws:
    """Uniform numbers for consecutive chunks, drawn as `uniform` would draw them for the whole tensor."""

    def __init__(self, device: torch.device, generator: torch.Generator | None, size: int):
        self.device, self.generator = device, generator
        gen_device = generator.device if generator is not None else device
        self.buf = torch.empty(size, dtype=torch.float32, device=gen_device)

    def next(self, count: int) -> torch.Tensor:
        u = self.buf[:count]
        if self.generator is None:
            u.uniform_()
        else:
            u.uniform_(generator=self.generator)
        return u.to(self.device)


def random_plan(model: torch.Tensor, base: torch.Tensor, density: float, *, rescale: bool,
                generator: torch.Generator | None, size: int) -> Plan | None:
    """Chunked `random_drop` (same draws, same mask)."""
    if density >= 1:
        return None
    n = model.numel()
    draws = _Draws(model.device, generator, min(size, max(n, 1)))

    def keep_chunks(d, s, e):
        return draws.next(e - s) < density

    keep_chunks.spans = spans(n, size)
    return _stored_mask_plan(model, base, rescale, size, keep_chunks)


def della_plan(model: torch.Tensor, base: torch.Tensor, shape: torch.Size, density: float, epsilon: float, *,
               rescale: bool, generator: torch.Generator | None, size: int) -> Plan | None:
    """Chunked `della_magprune` for tensors of at most 2 dimensions (rows ranked in blocks); others whole."""
    if density >= 1:
        return None
    n = model.numel()
    if density <= 0 or n == 0:
        return Plan(None, zero=True)
    problem = check_della(density, epsilon)
    if problem:
        raise MethodInputError(problem)
    if len(shape) > 2:
        whole = {}

        def keep_whole(d, s, e):
            delta = d.reshape(shape)
            whole["keep"] = uniform(shape, model.device, generator) < della_probabilities(delta, density, epsilon)
            return whole["keep"].reshape(-1)

        keep_whole.spans = [(0, n)]
        return _stored_mask_plan(model, base, rescale, n, keep_whole)
    cols = shape[-1] if len(shape) == 2 else n
    draws = _Draws(model.device, generator, min(max(size, cols), n))
    if cols == 1:
        def keep_chunks(d, s, e):
            return draws.next(e - s) < torch.full((e - s,), density, dtype=d.dtype if d.dtype == torch.float64 else torch.float32, device=d.device)
    else:
        dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
        int_view = torch.int64 if dtype == torch.float64 else torch.int32
        step = torch.arange(cols, device=model.device, dtype=dtype) / (cols - 1)
        by_rank = (density - epsilon) + step * 2 * epsilon

        def keep_chunks(d, s, e):
            mags = d.view(-1, cols).to(dtype).abs()
            order = torch.sort(mags.view(int_view), dim=1).indices
            probs = torch.empty(mags.shape, device=model.device, dtype=dtype)
            probs.scatter_(1, order, by_rank.expand(order.shape[0], cols))
            return draws.next(e - s) < probs.view(-1)

    rows_per = max(1, size // cols)
    keep_chunks.spans = spans(n, rows_per * cols)
    return _stored_mask_plan(model, base, rescale, rows_per * cols, keep_chunks)
