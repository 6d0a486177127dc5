"""The shard writer asks the kernel to start writing each range it wrote through the page cache, and the bytes it
leaves are the tensors."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from mergesmith.io import direct_write, writeback
from mergesmith.io.shard_writer import PlannedTensor, ShardWriter


def _writer(folder):
    tensors = [PlannedTensor("a", torch.float32, (4, 3)), PlannedTensor("b", torch.bfloat16, (5,))]
    return ShardWriter(folder, tensors, 10**9)


def test_every_range_written_through_the_page_cache_is_handed_to_writeback_and_the_file_holds_the_tensors(tmp_path, monkeypatch):
    calls = []  # these writes are too small for O_DIRECT (direct_write.MIN_DIRECT_BYTES)
    monkeypatch.setattr(direct_write, "start_writeback", lambda fd, offset, length: calls.append((offset, length)))
    writer = _writer(tmp_path)
    a = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    b = torch.linspace(-1, 1, 5).to(torch.bfloat16)
    writer.write("a", a[:1])  # rows 0-0
    writer.write("a", a[1:], first_row=1)  # rows 1-3 in a second write
    writer.write("b", b)
    slot_a, slot_b = writer.slots["a"], writer.slots["b"]
    writer.close()
    assert calls == [(slot_a.offset, 12), (slot_a.offset + 12, 36), (slot_b.offset, 10)]
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_started_on_linux_and_leaves_the_bytes_alone(tmp_path):
    assert writeback._START is not None
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"mergesmith" * 1000, 0)
        writeback.start_writeback(fd, 0, 10_000)
        writeback.start_writeback(fd, 0, 0)  # an empty range is no call at all
    finally:
        os.close(fd)
    assert path.read_bytes() == b"mergesmith" * 1000


def test_the_environment_can_turn_early_writeback_off(monkeypatch):
    monkeypatch.setenv("MERGESMITH_EARLY_WRITEBACK", "0")
    try:
        assert importlib.reload(writeback)._START is None
    finally:
        monkeypatch.delenv("MERGESMITH_EARLY_WRITEBACK")
        importlib.reload(writeback)
