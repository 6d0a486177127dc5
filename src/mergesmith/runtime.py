"""Process settings for the command line, made before torch is imported.

A streamed merge runs PyTorch's elementwise ops on the main thread while reader and writer threads copy
shards through the kernel. On a machine with few cores some defaults of the C and Python runtimes then cost time
(1B models, 2-core EPYC, `bench/speed.py`):

* libgomp's idle OpenMP threads spin for about 300,000 iterations before sleeping, on the cores the reader
  and writer need. A spin count of 3,000 took a linear merge from 8.6 to 7.0 s. Waiting passively (0)
  made each of SCE's thousands of small parallel regions pay a futex wake: 14 s became 25 s.
* glibc serves each tensor-sized allocation with a fresh mmap and returns it on free, so every read buffer
  and intermediate is page-faulted in again (1.6-2.2 million faults a merge). Serving them from the heap
  and trimming only past 1 GiB took DELLA from 20.5-22 to 17.3-17.6 s and linear from 7-8 to 6.4-6.7 s,
  for about 150 MB more peak RSS. (Raising the mmap threshold alone is worse: the heap is then trimmed
  after every free, and DELLA took 9 million faults.) glibc caps that threshold at 32 MB, and each reader
  and worker thread got an arena of its own whose heaps come and go, so with the compiled task-vector
  loops half of a TIES merge's faults remained. One arena and no mmap at all (every buffer from the one
  heap) halved them again: TIES 9.8-10.3 -> 9.3 s, DELLA 20.3 -> 18.6 s, linear unchanged, for 0.1-0.4 GB
  more peak RSS.
* Python's cyclic garbage collector runs a collection every 700 net allocations of container objects, and
  a merge makes many small ones (tensor views, numpy arrays, futures) per chunk. Each collection holds
  the GIL, so the reader, writer and worker threads all wait; the older generations hold everything
  torch and transformers loaded. A first threshold of 100,000 took TIES from 10.6-10.9 to 9.5-9.6 s
  (550 collections to 4). A merge's own objects rarely form cycles, so little waits longer to be freed.
* At exit the interpreter tears down every module torch, numba and transformers loaded, collecting garbage
  as it goes: 0.5-0.9 s after a 1B merge had finished (12% of a linear merge). The command line's entry
  point therefore leaves with `exit_now`: streams flushed and `atexit` handlers run, then no teardown.

* numba's array support, loaded with the first compiled loop a merge runs, checks that it could call BLAS
  by importing `scipy.linalg` when SciPy is installed: 0.15-0.33 s on the critical path of every merge
  that runs the loops (DELLA, TIES, SCE, Arcee Fusion...; 1B: 3-5% of their time), for BLAS calls the
  loops never make. With `NUMBA_SKIPS_SCIPY` the loops' first load hides SciPy from that check
  (`methods._kernels`); numba then computes a 1-D `np.dot` in compiled code with its own loop instead of
  BLAS, in this process only.

Not set: PyTorch's `THP_MEM_ALLOC_ENABLE` (huge pages for tensors of 2 MB and more). It took linear from 6.1
to 5.0 s but DELLA from 16.6 to 22.8 s and SCE from 13.1 to 14.6 s, the kernel compacting memory for the
huge pages as intermediates come and go.

Settings the user made (environment variables) win. Library callers (`mergesmith.merge` in their own
process) are not touched: these are process-wide choices that belong to whoever owns the process.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import sys

GOMP_SPINCOUNT = "3000"
TRIM_THRESHOLD = 1 << 30
GC_FIRST_THRESHOLD = 100_000
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters (malloc.h)
NUMBA_SKIPS_SCIPY = False  # set by `tune_for_streaming`, read by `methods._kernels`


def tune_for_streaming() -> None:
    """Apply the settings above; a no-op for each one the user set or the platform lacks. Must run before
    torch (and so libgomp) is loaded for the spin count to take effect."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    if sys.platform.startswith("linux") and not any(k.startswith("MALLOC_") for k in os.environ):
        _one_glibc_heap()
    global NUMBA_SKIPS_SCIPY
    NUMBA_SKIPS_SCIPY = True
    first, *older = gc.get_threshold()
    if 0 < first < GC_FIRST_THRESHOLD:  # 0: the collector is off; a larger one was the user's choice
        gc.set_threshold(GC_FIRST_THRESHOLD, *older)


def _one_glibc_heap() -> None:
    """Every allocation from one heap (no mmap: the mmap threshold then no longer matters), trimmed past 1 GiB."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_ARENA_MAX, 1)


def exit_now(code: int) -> None:
    """Leave the process with `code` without the interpreter's teardown of its modules: the output is
    already written and closed by then. Runs the `atexit` handlers (temporary folders, e.g. the GGUF
    reader's, are removed there) and flushes stdout and stderr first, so nothing a handler or a stream
    holds is lost. Worker threads still alive are idle pool threads; they end with the process."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)
