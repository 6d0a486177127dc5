"""Compiled CPU loops (numba) for the two streamed passes of the task-vector methods on float32.

Why: a streamed TIES merge chunk made ~30 PyTorch passes (subtract, magnitude, mask, sign, vote, agree,
divide, add), each a trip through memory and an OpenMP region: ~5 ns an entry for two models on this
2-core machine. One compiled loop per model and one to combine them do the same float operations at
~0.7 ns. The selection pass counts and gathers its window in one loop per chunk instead of five numpy
passes (no faster, but without temporaries).

What stays in PyTorch: every other dtype (16-bit compute for mergekit's arithmetic, float64), other devices,
plain task arithmetic (no mask, no election: torch is as fast for its three operations a model), SCE's merge
pass, and any machine without numba (`available()` is then False and the callers take their torch path).
Inputs stored as bf16 are widened to float32 by torch (its conversion is as fast as a copy) before the loops.
A bf16 output is rounded from the float32 result chunk by chunk (`to_bfloat16`, bit for bit torch's rounding),
which saves a float32 output tensor and the separate conversion pass over it.

The loops compute, entry by entry, the float32 operations of the torch path in the same order, except that
a sum without sign election (Breadcrumbs, DARE and DELLA linear) rounds each weighted delta before adding it
(mergekit's `(deltas * weights).sum()`), where torch's `add_(d, alpha=w)` may fuse the multiply: the two
differ by at most an ulp of the sum. Zeros may differ in sign. `MERGESMITH_KERNELS=0` in the environment
turns the loops off.

Writing them: each loop runs over `range(n)` and indexes contiguous arrays with its own counter only. An
offset index (`x[start + i]`) could be negative as far as numba knows, and the wrap-around test it adds
stops LLVM from vectorising the loop (10x slower); so callers pass slices.
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import numpy as np

CHUNK = 1 << 18  # entries per chunk of the merge pass

_LOCK = threading.Lock()
_LOOPS: SimpleNamespace | None = None
_FAILED = False


def available() -> bool:
    """Whether the compiled loops can be used (numba importable, not turned off). The first call imports numba
    (~0.2 s) and defines the loops; numba compiles each one, or loads it from its cache, on its first use."""
    global _LOOPS, _FAILED
    if _LOOPS is not None:
        return True
    if _FAILED or os.environ.get("MERGESMITH_KERNELS", "1") == "0":
        return False
    with _LOCK:
        if _LOOPS is None and not _FAILED:
            try:
                _LOOPS = _compile()
            except ImportError:
                _FAILED = True
    return _LOOPS is not None


def loops() -> SimpleNamespace:
    """The compiled loops; call `available()` first."""
    assert _LOOPS is not None, "call available() first"
    return _LOOPS


def _compile() -> SimpleNamespace:
    from numba import njit

    # fastmath stays off: each float operation rounds as written, in this order. cache: compiled once per
    # machine (next to this file, or numba's user cache when that is read-only).
    jit = njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")

    @jit
    def weighted_delta(model, base, keep_ge, keep_gt, keep_split, drop_ge, drop_gt, drop_split, stored, scale, weight, out):
        """out = ((model - base) if kept else 0) * scale * weight. Kept: magnitude above the keep bound and not
        above the drop bound (each bound is `ge` before its split position and `gt` from it on: how a Cut
        breaks ties by position), and stored[i] != 0 when `stored` is not empty. A NaN is kept, as the torch
        path's mask multiply keeps it."""
        n = out.size
        zero = np.float32(0)
        if stored.size == 0:
            for i in range(n):
                d = model[i] - base[i]
                a = abs(d)
                kb = keep_ge if i < keep_split else keep_gt
                xb = drop_ge if i < drop_split else drop_gt
                keep = (not a <= kb) & (not a > xb)
                out[i] = ((d if keep else zero) * scale) * weight
        else:
            for i in range(n):
                d = model[i] - base[i]
                a = abs(d)
                kb = keep_ge if i < keep_split else keep_gt
                xb = drop_ge if i < drop_split else drop_gt
                keep = (not a <= kb) & (not a > xb) & (stored[i] != 0)
                out[i] = ((d if keep else zero) * scale) * weight

    @jit
    def sum_rows(deltas, n, out):
        """out[:n] = the rows of `deltas` (first n columns) added from the first to the last."""
        first = deltas[0]
        for i in range(n):
            out[i] = first[i]
        for j in range(1, deltas.shape[0]):
            row = deltas[j]
            for i in range(n):
                out[i] += row[i]

    @jit
    def consensus_into(deltas, n, weights, by_count, normalize, scale, base, votes, divisor, out):
        """TIES' elect and disjoint merge of the weighted deltas (rows of `deltas`, first n columns):
        out = base + scale * (Σ agreeing deltas) / (Σ agreeing weights, 0 -> 1, when normalize).
        The majority sign is that of the sum of the deltas (or of their signs, `by_count`); >= 0 elects +.
        `votes` and `divisor` are scratch of length >= n."""
        k = deltas.shape[0]
        zero, one = np.float32(0), np.float32(1)
        first = deltas[0]
        if by_count:
            for i in range(n):
                votes[i] = np.sign(first[i])
            for j in range(1, k):
                row = deltas[j]
                for i in range(n):
                    votes[i] += np.sign(row[i])
        else:
            sum_rows(deltas, n, votes)
        for i in range(n):
            votes[i] = one if votes[i] >= zero else -one
            out[i] = zero
            divisor[i] = zero
        for j in range(k):
            row = deltas[j]
            w = weights[j]
            for i in range(n):
                agree = row[i] * votes[i] > zero  # same sign as the majority, and not zero
                out[i] += row[i] if agree else zero
                divisor[i] += w if agree else zero
        if normalize:
            for i in range(n):
                out[i] = out[i] / (divisor[i] if divisor[i] != zero else one)
        for i in range(n):
            out[i] = out[i] * scale + base[i]

    @jit
    def sum_into(deltas, n, divide, divisor, scale, base, out):
        """out = base + scale * (Σ weighted deltas) / divisor (when divide): task arithmetic's combination."""
        sum_rows(deltas, n, out)
        if divide:
            for i in range(n):
                out[i] = out[i] / divisor
        for i in range(n):
            out[i] = out[i] * scale + base[i]

    @jit
    def window_count(model, base, lo, hi):
        """(entries with |model - base| > hi, entries with lo <= |model - base| <= hi, non-zero entries)."""
        above = 0
        inside = 0
        nonzero = 0
        zero = np.float32(0)
        for i in range(model.size):
            a = abs(model[i] - base[i])
            above += a > hi
            inside += (a >= lo) & (a <= hi)
            nonzero += a != zero
        return above, inside, nonzero

    @jit
    def window_gather(model, base, lo, hi, offset, values, positions):
        """The magnitudes in [lo, hi] and their positions (+ offset), in order, into values and positions (one
        entry longer than the count: writes are made before the exact test decides to keep them). Few
        entries are in a window, so one float test, true around the window only, guards the writes: two
        tests would make the first a coin flip for the branch predictor."""
        j = 0
        if not (np.isfinite(lo) and np.isfinite(hi)):  # an open side: no middle to measure from
            for i in range(model.size):
                a = abs(model[i] - base[i])
                values[j] = a
                positions[j] = offset + i
                j += (a >= lo) & (a <= hi)
            return j
        # every magnitude in [lo, hi] is within reach of the middle, rounding included (a few ulps of hi)
        middle = (lo + hi) * np.float32(0.5)
        reach = (hi - lo) * np.float32(0.5) + hi * np.float32(2.0**-20) + np.float32(1e-38)
        for i in range(model.size):
            a = abs(model[i] - base[i])
            if abs(a - middle) <= reach:
                values[j] = a
                positions[j] = offset + i
                j += (a >= lo) & (a <= hi)
        return j

    @jit
    def to_bfloat16(bits, out):
        """out = the float32 values whose bit patterns are `bits` (uint32) rounded to bfloat16 bit patterns (uint16),
        to nearest, ties to even, as PyTorch's conversion rounds; a NaN becomes the quiet NaN 0x7FC0."""
        for i in range(out.size):
            b = bits[i]
            rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            out[i] = np.uint16(0x7FC0) if nan else np.uint16(rounded)

    @jit
    def sfc64(s0, s1, s2, s3):
        """numpy's sfc64_next: (the drawn 64-bit word, the next state)."""
        drawn = s0 + s1 + s3
        return (drawn, s1 ^ (s1 >> np.uint64(11)), s2 + (s2 << np.uint64(3)),
                ((s2 << np.uint64(24)) | (s2 >> np.uint64(40))) + drawn, s3 + np.uint64(1))

    # A stream's state (`_sparsify.word_state`) is numpy SFC64's four words, then a flag and the upper half of
    # a word drawn but half used. Its int32 words are each drawn word's lower half, then its upper half: the
    # words, and so the keeps below, are those `_sparsify.RandomWords` hands out.

    @jit
    def ranked_keep(bits, rows, state, alpha, beta, high, out):
        """DELLA's keep test (see `_sparsify.RankedKeep`) of the (r, c) magnitudes whose int32 bit patterns are
        `bits`, against their rows sorted and padded in `rows` (r, c + 3), into the bool `out` (r, c), an entry
        a word from `state`, which it advances."""
        s0, s1, s2, s3, pending, half = state[0], state[1], state[2], state[3], state[4], state[5]
        low32 = np.uint64(0xFFFFFFFF)
        r, c = bits.shape
        for i in range(r):
            row, b, o = rows[i], bits[i], out[i]
            for j in range(c):
                if pending:
                    word, pending = half, np.uint64(0)
                else:
                    drawn, s0, s1, s2, s3 = sfc64(s0, s1, s2, s3)
                    word, half, pending = drawn & low32, drawn >> np.uint64(32), np.uint64(1)
                w = np.int64(np.int32(np.uint32(word)))
                coin = w & 1
                position = min(max(np.float64(w >> 1) * alpha + beta, 0.0), high)
                o[j] = b[j] > row[np.int64(position) + coin] - coin
        state[0], state[1], state[2], state[3], state[4], state[5] = s0, s1, s2, s3, pending, half

    @jit
    def bernoulli_keep(state, threshold, out):
        """out[i] = (the next int32 word from `state` < threshold): DARE's independent keeps."""
        s0, s1, s2, s3, pending, half = state[0], state[1], state[2], state[3], state[4], state[5]
        low32 = np.uint64(0xFFFFFFFF)
        n, j = out.size, 0
        if pending and n:
            out[0], j, pending = np.int32(np.uint32(half)) < threshold, 1, np.uint64(0)
        for k in range((n - j) // 2):
            drawn, s0, s1, s2, s3 = sfc64(s0, s1, s2, s3)
            out[j + 2 * k] = np.int32(np.uint32(drawn & low32)) < threshold
            out[j + 2 * k + 1] = np.int32(np.uint32(drawn >> np.uint64(32))) < threshold
        if (n - j) % 2:
            drawn, s0, s1, s2, s3 = sfc64(s0, s1, s2, s3)
            out[n - 1], half, pending = np.int32(np.uint32(drawn & low32)) < threshold, drawn >> np.uint64(32), np.uint64(1)
        state[0], state[1], state[2], state[3], state[4], state[5] = s0, s1, s2, s3, pending, half

    return SimpleNamespace(
        weighted_delta=weighted_delta, consensus_into=consensus_into, sum_into=sum_into,
        window_count=window_count, window_gather=window_gather, to_bfloat16=to_bfloat16, ranked_keep=ranked_keep,
        bernoulli_keep=bernoulli_keep,
    )
