"""Compiled CPU loops (numba) for the two streamed passes of the task-vector methods on float32.

Why: a streamed TIES merge chunk made ~30 PyTorch passes (subtract, magnitude, mask, sign, vote, agree,
divide, add), each a trip through memory and an OpenMP region: ~5 ns an entry for two models on this
2-core machine. One compiled loop per model and one to combine them do the same float operations at
~0.7 ns. The selection pass counts each window in one vectorised loop a chunk, and gathers the entries of
all its windows in one more (flagged by vectorised tests, then listed from the flags' set bits); up to
three windows are counted and flagged together in a single pass (`windows_tally`), which stores the chunk's
magnitudes for the gather to read back. DARE's
and DELLA's keep masks are drawn by loops that run numpy's SFC64 generator themselves, so they make the
very masks of the numpy path without its passes.

RAM and RAM+ (count and merge passes) and Arcee Fusion (row divergences, selection and output passes) use
them too; the divergences' loop (`_divergence_loops`) is the one that does not repeat torch's roundings.

What stays in PyTorch: every other dtype (16-bit compute for mergekit's arithmetic, float64), other devices,
and any machine without numba (`available()` is then False and the callers take their torch path). Two to
twelve models merge in one pass from the inputs (`pair_delta_merge_into`, and a loop generated per count:
`_generated_loops`, which also elects by count); more, or two elected by count, on rows a block of entries at
a time (`rows_merge_into`).
Inputs stored as bf16 are read by the loops as they are (uint16 bit patterns, widened exactly entry by entry:
`_kernel_loops.widen`), which saves the float32 copy of every input chunk that torch made before.
A bf16 output is rounded from the float32 result chunk by chunk (`to_bfloat16`, bit for bit torch's rounding),
which saves a float32 output tensor and the separate conversion pass over it; a loop that rounds each result
as it stores it (`_kernel_loops.narrow`) saves the float32 chunk too.

The loops compute, entry by entry, the float32 operations of the torch path in the same order, except that
a sum without sign election (Breadcrumbs, DARE and DELLA linear) rounds each weighted delta before adding it
(mergekit's `(deltas * weights).sum()`), where torch's `add_(d, alpha=w)` may fuse the multiply: the two
differ by at most an ulp of the sum. Zeros may differ in sign. `MERGESMITH_KERNELS=0` in the environment
turns the loops off.

Writing them: each loop runs over `range(n)` and indexes contiguous arrays with its own counter only. An
offset index (`x[start + i]`) could be negative as far as numba knows, and the wrap-around test it adds
stops LLVM from vectorising the loop (10x slower); so callers pass slices. The loops live at module level in
`_kernel_loops` (imported on first use, so a merge that needs none never imports numba): numba cannot
reuse its cache for a closure that calls another compiled function.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from types import SimpleNamespace

import numpy as np
import torch

from mergesmith import runtime
from mergesmith.methods import _generated_loops

CHUNK = 1 << 18  # entries per chunk of the merge pass
LANES = 8  # DELLA's random streams, stepped together (`_sparsify.LaneWords`, `_kernel_loops.partner_keep`)
KEEP_BLOCK = 1 << 14  # DARE's keep words come in blocks of this many entries (`_sparsify.LaneWords.block_words`)
ROWS_BLOCK = 1024  # entries per block of the loops on rows (`rows_merge_into`, `ram_rows_merge_into`): five models' rows, 20 KB, stay in L1

LOOPS = (
    "weighted_delta", "consensus_into", "pair_delta_merge_into", "sum_into", "window_count", "windows_gather", "windows_tally", "gather_flagged", "gather_stored", "to_bfloat16", "partner_keep",
    "della_rows", "bernoulli_rows", "weighted_consensus_into", "cut_mask", "magnitudes_into", "scaled_magnitudes_into", "choose_scaled_into",
    "contribution_into", "contributor_tallies", "ram_combine_into", "ram_rows_merge_into", "ram_rows_tallies", "contribution_rows", "pair_product_sums", "stock_into", "pair_combine_into", "pair_tallies", "pair_square_sums",
    "row_divergences_into", "welford_variance_into", "triple_product_sums", "triple_combine_into", "square_sums", "variance_into", "product_sums", "above_into", "triple_tallies", "rows_merge_into",
)

# Loops that only other loops call (compiled into them: their own cache entries are never loaded), listed in
# LOOPS so that tests can check a one-pass loop against them.
INNER_LOOPS = (
    "weighted_delta", "consensus_into", "weighted_consensus_into", "sum_into", "welford_variance_into", "gather_flagged",
    "contribution_into", "contributor_tallies", "ram_combine_into", "contribution_rows",
)

_LOCK = threading.Lock()
_LOOPS: SimpleNamespace | None = None
_FAILED = False


def available() -> bool:
    """Whether the compiled loops can be used (numba importable, not turned off). The first call imports numba
    and `_kernel_loops` (~0.2 s); numba compiles each loop, or loads it from its cache, on its first use (the
    first load in a process costs ~0.2-0.3 s more: numba installs its typing and lowering registries; see
    `runtime.NUMBA_SKIPS_SCIPY` for the SciPy import it used to add)."""
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


_GATHER_DATA_SAMPLING = "/sys/devices/system/cpu/vulnerabilities/gather_data_sampling"


@functools.cache
def vector_gathers() -> bool:
    """Whether DELLA's keep test loads its partners' magnitudes with vector gathers
    (`_kernel_loops.partner_test_blocks`): yes, unless Linux reports the Gather Data Sampling mitigation,
    whose microcode makes gathers several times slower (Intel cores from Skylake to Ice Lake); those take
    scalar loads. `MERGESMITH_GATHER=0` or `1` in the environment decides instead. Both give the same masks."""
    forced = os.environ.get("MERGESMITH_GATHER")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open(_GATHER_DATA_SAMPLING, encoding="ascii") as status:
            return not status.read().startswith("Mitigation")
    except OSError:
        return True


def result_dtype(dtype: torch.dtype, output_dtype: torch.dtype | None, compiled: bool) -> torch.dtype:
    """The dtype a merge computed in `dtype` returns: a bf16 `output_dtype` when the compiled loops write it
    (`OutputChunks`), else `dtype` (the caller converts)."""
    return output_dtype if compiled and output_dtype == torch.bfloat16 else dtype


def loop_operand(tensor: torch.Tensor) -> np.ndarray:
    """A CPU float32 or bf16 tensor as the compiled loops read and write it, a numpy view: float32 as is, bf16
    as its bit patterns (uint16), which the loops widen entry by entry (`_kernel_loops.widen`, exact) or
    store through `_kernel_loops.narrow`. A float32 copy made by torch first cost a pass per input and chunk
    (0.16 ns an entry on two inputs). Converting a torch slice costs ~7 us, slicing the view ~0.3: make the
    view of a whole tensor once, and slice it per chunk."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


# model counts merged in one pass from the inputs: `pair_delta_merge_into` for two, a generated loop for more
ONE_PASS_COUNTS = range(2, _generated_loops.MAX_MODELS + 1)


def one_pass_merge_into(models, base, bounds, stored, apart, factors, weights, how, divisor, scale, out,
                        by_count: bool = False) -> None:
    """Two to `_generated_loops.MAX_MODELS` models' masked deltas merged into `out` in one pass from the
    inputs: the pair loop for two (`_kernel_loops.pair_delta_merge_into`, which also tests SCE's distance
    bounds `apart`), else the loop generated for the count (`_generated_loops.merge_loop`; `apart` must then
    pass every distance). bounds, stored: one a model; factors: each model's (rescale, weight), flat;
    weights: the election's, one a model; how: (elect, weigh, normalize); `by_count`: the sign elected by
    one vote a model (three or more models: see `one_pass`)."""
    if len(models) == 2 and not by_count:
        loops().pair_delta_merge_into(*models, base, *bounds, *stored, apart, factors, weights, how, divisor, scale, out)
        return
    _generated_loops.merge_loop(len(models), by_count)(tuple(models), base, tuple(bounds), tuple(stored), factors,
                                                      weights, how, divisor, scale, out)


def one_pass(count: int, by_count: bool = False) -> bool:
    """Whether `one_pass_merge_into` merges `count` models (two elected by count take the rows: the pair loop
    elects by sum only)."""
    return count in ONE_PASS_COUNTS and not (by_count and count == 2)


def rows_scratch(count: int) -> tuple[np.ndarray, np.ndarray]:
    """`_kernel_loops.rows_merge_into`'s buffers for `count` models: their rows of a block, and the scratch rows
    for the votes, the divisors and the block's result (one pair a thread)."""
    return np.empty((count, ROWS_BLOCK), dtype=np.float32), np.empty((3, ROWS_BLOCK), dtype=np.float32)


class OutputChunks:
    """Where a compiled merge writes each chunk of its flat output: straight into a float32 output, or into a
    float32 scratch that `to_bfloat16` then rounds into a bf16 output (`target`, then `done`); or, for a loop
    that stores its results through `_kernel_loops.narrow`, straight into either (`direct`). Holds a buffer:
    one per thread."""

    def __init__(self, flat_out: torch.Tensor, width: int):
        self.flat_out = flat_out
        self.out = loop_operand(flat_out)  # float32, or a bf16 output's bit patterns
        self.width = width
        self._scratch: np.ndarray | None = None

    @property
    def scratch(self) -> np.ndarray | None:
        """The float32 chunk a bf16 output is rounded from (made on first use: `direct` needs none)."""
        if self._scratch is None and self.flat_out.dtype == torch.bfloat16:
            self._scratch = np.empty(self.width, dtype=np.float32)
        return self._scratch

    def target(self, start: int, end: int) -> np.ndarray:
        """The float32 array the loops write the chunk [start, end) into."""
        return self.out[start:end] if self.scratch is None else self.scratch[: end - start]

    def direct(self, start: int, end: int) -> np.ndarray:
        """The output's chunk [start, end) itself: float32, or a bf16 output's bit patterns (uint16)."""
        return self.out[start:end]

    def done(self, start: int, end: int) -> None:
        """The chunk is written: round it into the bf16 output (nothing to do for a float32 one)."""
        if self.scratch is not None:
            loops().to_bfloat16(self.scratch[: end - start], self.direct(start, end))


def _array_support_without_scipy() -> None:
    """Import numba's array-math support with SciPy hidden (unless already imported), so that its check for
    BLAS does not import `scipy.linalg` (see `runtime.NUMBA_SKIPS_SCIPY`): an entry of None in `sys.modules`
    makes the check's import fail, and it is removed right after."""
    import numba  # noqa: F401  (first: numba's own import loads SciPy's top level, which must stay loaded)

    hidden = next((name for name in ("scipy", "scipy.linalg") if name not in sys.modules), None)
    if hidden is None or "numba.np.arraymath" in sys.modules:
        return
    sys.modules[hidden] = None
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if sys.modules.get(hidden, 0) is None:
            del sys.modules[hidden]


def loops() -> SimpleNamespace:
    """The compiled loops; call `available()` first."""
    assert _LOOPS is not None, "call available() first"
    return _LOOPS


def _compile() -> SimpleNamespace:
    if runtime.NUMBA_SKIPS_SCIPY:
        _array_support_without_scipy()
    from mergesmith.methods import _divergence_loops, _kernel_loops

    modules = (_kernel_loops, _divergence_loops)
    return SimpleNamespace(**{name: getattr(next(m for m in modules if hasattr(m, name)), name) for name in LOOPS})
