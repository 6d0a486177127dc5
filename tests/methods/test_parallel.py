"""`_parallel.together` and `guided_pieces`: which jobs share the cores, and in what order results come back."""

import threading

import pytest
import torch

from mergesmith.methods import _parallel


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _where() -> tuple[bool, int]:
    """(on the calling thread, torch threads this job may use)."""
    return threading.current_thread() is threading.main_thread(), torch.get_num_threads()


@pytest.mark.parametrize("count, alone", [(2, 0), (3, 1), (4, 0), (5, 1)])
def test_jobs_past_the_last_whole_round_run_alone_with_every_thread(count, alone, two_threads):
    # three plans on two threads: two side by side on the workers (one torch thread each), the third after them
    # on the calling thread with both, so that its own in_parts can split it
    results = _parallel.together([lambda i=i: (i, *_where()) for i in range(count)], torch.device("cpu"))
    assert [r[0] for r in results] == list(range(count))  # in job order
    assert all(not main and threads == 1 for _, main, threads in results[: count - alone])
    assert all(main and threads == 2 for _, main, threads in results[count - alone:])
    assert torch.get_num_threads() == 2


def test_fewer_jobs_than_threads_all_run_on_the_workers():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        results = _parallel.together([_where for _ in range(3)], torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert all(not main and threads == 1 for main, threads in results)


def test_guided_pieces_shrink_and_cover_every_chunk_once():
    pieces = _parallel.guided_pieces(list(range(44)), 2)
    assert [len(p) for p in pieces] == [22, 11, 6, 3, 1, 1]
    assert sum(pieces, []) == list(range(44))
