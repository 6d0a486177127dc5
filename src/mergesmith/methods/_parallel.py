"""Running a method's independent pieces of work on the CPU's cores: whole plans or contiguous shares of
chunks, one per torch thread (shared by the task-vector family, SCE, RAM, Arcee Fusion and the selection)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_WORKERS: ThreadPoolExecutor | None = None


def together(jobs: list[Callable[[], object]], device: torch.device) -> list:
    """Run independent jobs on threads of their own, torch running one thread each meanwhile, when on CPU
    with several torch threads; otherwise in turn. Streamed passes are chains of small ops (and numpy
    scans) that OpenMP splits poorly between two cores that also serve the shard reader and writer; whole
    chunks or plans per thread use them better (1B, 2 cores: ties 14.7 -> 13.3 s, breadcrumbs 13.6 ->
    12.7 s from the plans alone)."""
    global _WORKERS
    threads = torch.get_num_threads()
    if len(jobs) < 2 or threads < 2 or device.type != "cpu":
        return [job() for job in jobs]
    if _WORKERS is None:
        _WORKERS = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergesmith-work")
    torch.set_num_threads(1)
    try:
        return [future.result() for future in [_WORKERS.submit(job) for job in jobs]]
    finally:
        torch.set_num_threads(threads)


def in_parts(chunks: list[tuple[int, int]], work: Callable[[list[tuple[int, int]]], object], device: torch.device) -> list:
    """`work` over contiguous shares of independent chunks, one share per torch thread, `together`; returns
    what `work` returned for each share, in chunk order."""
    parts = min(len(chunks), torch.get_num_threads()) if device.type == "cpu" else 1
    per = -(-len(chunks) // max(parts, 1))
    return together([lambda share=chunks[i : i + per]: work(share) for i in range(0, len(chunks), per)], device)
