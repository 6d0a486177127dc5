"""Float32 sums in numpy's pairwise order, the same bits on every numpy version.

numpy sums a contiguous float32 run pairwise: eight accumulators over a run of at most 128 entries, a
longer run halved at a multiple of 8 and its halves' sums added. Before numpy 2.3 a reduction handed its
loop at most 8192 entries at a time (the iterator's buffer), so a longer run was summed as 8192-entry
pieces added in sequence; from 2.3 on it is one pairwise run. The compiled loops
(`_kernel_loops.planned_sum`) take 2.3's order, and the numpy paths' rescale factors and energies must
equal theirs bit for bit: `run_sums` halves runs longer than 8192 itself, as numpy's pairwise sum does, so
that each piece numpy sums is short enough to be summed whole by every version.
"""

from __future__ import annotations

import numpy as np

PIECE = 8192  # the longest run every numpy version sums as one pairwise run


def run_sums(x: np.ndarray) -> np.ndarray | np.float32:
    """The float32 sums of the runs along the last axis of x (1-D: one run; 2-D: its rows) in numpy's
    pairwise order (numpy 2.3's, on any version)."""
    n = x.shape[-1]
    if n <= PIECE:
        return np.add.reduce(x, axis=-1)
    half = n // 2 - (n // 2) % 8
    return run_sums(x[..., :half]) + run_sums(x[..., half:])
