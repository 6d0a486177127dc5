"""Running a method's independent pieces of work on the CPU's cores: whole plans, or contiguous pieces of
chunks that shrink towards the end (shared by the task-vector family, SCE, RAM, Arcee Fusion and the
selection)."""

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
    12.7 s from the plans alone).

    Jobs past the last whole round (the third of three plans on two threads) run after it, one at a time on
    the calling thread with every torch thread, so that their own `in_parts` splits them: run alongside the
    others, the last one had a core to itself while the other idled (1B, three fine-tunes: ties' selections)."""
    global _WORKERS
    threads = torch.get_num_threads()
    if len(jobs) < 2 or threads < 2 or device.type != "cpu":
        return [job() for job in jobs]
    if _WORKERS is None:
        _WORKERS = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergesmith-work")
    rounds = len(jobs) if len(jobs) <= threads else len(jobs) - len(jobs) % threads
    torch.set_num_threads(1)
    try:
        done = [future.result() for future in [_WORKERS.submit(job) for job in jobs[:rounds]]]
    finally:
        torch.set_num_threads(threads)
    return done + [job() for job in jobs[rounds:]]


def in_parts(chunks: list[tuple[int, int]], work: Callable[[list[tuple[int, int]]], object], device: torch.device) -> list:
    """`work` over contiguous pieces of independent chunks on the torch threads (`together`); returns what `work`
    returned for each piece, in chunk order. The pieces shrink (`guided_pieces`), so a thread that finishes
    early takes the small ones at the end instead of waiting for the other. With one half each, the thread
    that finished first waited 10-24% of a call's wall (SCE, Arcee Fusion at 1B; the reader and writer threads
    used part of that time): the workers' busy share went from 0.64-0.68 to 0.67-0.70 with the pieces."""
    threads = min(len(chunks), torch.get_num_threads()) if device.type == "cpu" else 1
    return together([lambda piece=piece: work(piece) for piece in guided_pieces(chunks, threads)], device)


def guided_pieces(chunks: list, threads: int) -> list[list]:
    """`chunks` cut into contiguous pieces of ceil(remaining / threads) chunks each (guided self-scheduling:
    44 chunks on two threads are pieces of 22, 11, 6, 3, 1, 1); one piece for one thread."""
    pieces, i = [], 0
    while i < len(chunks):
        size = -(-(len(chunks) - i) // max(threads, 1))
        pieces.append(chunks[i : i + size])
        i += size
    return pieces
