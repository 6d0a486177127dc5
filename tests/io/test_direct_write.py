"""Direct (O_DIRECT) writes: the file holds exactly the bytes written, in any order and at any alignment, and a
file system that refuses O_DIRECT gets ordinary writes."""

from __future__ import annotations

import errno
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from mergesmith.io import direct_write
from mergesmith.io.direct_write import ALIGN, DirectWriter
from mergesmith.io.shard_writer import PlannedTensor, ShardWriter


def _ranges(total: int, rng: random.Random) -> list[tuple[int, int]]:
    """Disjoint ranges covering [0, total): unaligned cuts, sizes from a few bytes to several staging buffers."""
    cuts = sorted({0, total, *(rng.randrange(1, total) for _ in range(12))})
    return list(zip(cuts, cuts[1:]))


def _write_all(path, data: bytes, ranges, order_seed: int) -> DirectWriter:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, len(data))
    writer = DirectWriter(path, fd)
    shuffled = list(ranges)
    random.Random(order_seed).shuffle(shuffled)
    view = memoryview(data)
    for s, e in shuffled:
        writer.write(view[s:e], s)
    writer.close()
    os.fsync(fd)
    os.close(fd)
    return writer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_file_holds_every_range_written_in_any_order(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(direct_write, "STAGING_BYTES", 5 * ALIGN)  # ranges span several staging buffers
    monkeypatch.setattr(direct_write, "MIN_DIRECT_BYTES", ALIGN)
    monkeypatch.setattr(direct_write, "_staging", direct_write.threading.local())
    rng = random.Random(seed)
    total = 37 * ALIGN + 123
    data = bytes(rng.randrange(256) for _ in range(total))
    path = tmp_path / "out.bin"
    _write_all(path, data, _ranges(total, rng), seed)
    assert path.read_bytes() == data


def test_direct_writes_are_used_where_the_file_system_takes_them(tmp_path, monkeypatch):
    calls = []
    real = os.pwrite
    monkeypatch.setattr(direct_write.os, "pwrite", lambda fd, data, offset: calls.append((fd, offset, len(data))) or real(fd, data, offset))
    data = os.urandom(3 * direct_write.MIN_DIRECT_BYTES)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    writer = DirectWriter(path, fd)
    if not writer.direct:
        os.close(fd)
        pytest.skip("this file system refuses O_DIRECT")
    direct_fd = writer.direct_fd
    writer.write(memoryview(data), 100)
    writer.close()
    os.close(fd)
    first = ALIGN  # the first whole block after offset 100
    assert calls[0] == (fd, 100, first - 100)  # the unaligned head through the page cache
    direct = [c for c in calls if c[0] == direct_fd]
    assert direct and direct[0][1] == first and all(c[1] % ALIGN == 0 and c[2] % ALIGN == 0 for c in direct)
    assert path.read_bytes()[100:] == data


def test_a_file_system_that_refuses_o_direct_gets_ordinary_writes(tmp_path, monkeypatch):
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fd == writer.direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    data = os.urandom(4 * direct_write.MIN_DIRECT_BYTES + 7)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    writer = DirectWriter(path, fd)
    if not writer.direct:  # a file system without O_DIRECT: stand in an ordinary descriptor, refused all the same
        writer.direct_fd = writer._direct_opened = os.open(path, os.O_WRONLY)
    half = len(data) // 2
    writer.write(memoryview(data)[:half], 0)
    assert not writer.direct and len(refused) == 1  # refused once, then ordinary writes only
    writer.write(memoryview(data)[half:], half)
    writer.close()
    os.close(fd)
    assert path.read_bytes() == data


def test_the_environment_can_turn_direct_writes_off(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_write, "_ENABLED", False)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    writer = DirectWriter(path, fd)
    assert not writer.direct
    os.close(fd)


def test_a_shard_of_large_tensors_reads_back_equal(tmp_path):
    """Tensors whose bytes straddle block boundaries at odd offsets, written in row chunks out of order."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(301, 517, generator=g).to(torch.bfloat16)
    b = torch.randn(77, 1031, generator=g)
    writer = ShardWriter(tmp_path, [PlannedTensor("b", b.dtype, tuple(b.shape)), PlannedTensor("a", a.dtype, tuple(a.shape))], 10**9)
    writer.write("a", a[150:], first_row=150)
    writer.write("b", b)
    writer.write("a", a[:150])
    writer.close()
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)


def test_a_direct_write_that_writes_nothing_is_an_error_not_a_hang(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    writer = DirectWriter(path, fd)
    if not writer.direct:
        writer.direct_fd = writer._direct_opened = os.open(path, os.O_WRONLY)
    real = os.pwrite
    monkeypatch.setattr(direct_write.os, "pwrite", lambda f, data, offset: 0 if f == writer.direct_fd else real(f, data, offset))
    with pytest.raises(OSError, match="wrote 0"):
        writer.write(memoryview(os.urandom(2 * direct_write.MIN_DIRECT_BYTES)), 0)
    writer.close()
    os.close(fd)
