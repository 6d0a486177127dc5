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
