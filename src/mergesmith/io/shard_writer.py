"""Write output shards whose layout is fixed before any tensor is computed.

The plan knows every output tensor's name, shape and dtype, so each shard's safetensors header is written
first and each tensor's bytes go straight to their final offset (`os.pwrite`) as soon as they are computed,
in any order, even in row chunks. No shard is ever buffered in memory. The bytes go around the page cache
where the file system allows (`direct_write`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesmith.io.safetensors_format import encode_header
from mergesmith.io.direct_write import DirectWriter


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ShardSlot:
    """Where one tensor goes: which file and at which absolute offset."""

    shard_index: int
    offset: int
    nbytes: int
    row_bytes: int


def split_into_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Fill shards in plan order, starting a new one when the next tensor would exceed the limit."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_file_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Owns the output shard files of one merge; `write` may be called from any thread."""

    def __init__(self, folder: Path, tensors: list[PlannedTensor], max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.folder = folder
        self.shards = split_into_shards(tensors, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self.slots: dict[str, ShardSlot] = {}
        self._fds: list[int] = []
        self._writers: list[DirectWriter] = []
        metadata = {"format": "pt", **(metadata or {})}
        for index, (shard, fname) in enumerate(zip(self.shards, self.file_names)):
            header, offsets = encode_header([(t.name, t.dtype, t.shape) for t in shard], metadata)
            fd = os.open(folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, header, 0)
            total = (offsets[-1] + shard[-1].nbytes) if shard else len(header)
            os.ftruncate(fd, total)
            self._writers.append(DirectWriter(folder / fname, fd))
            for tensor, offset in zip(shard, offsets):
                rows = tensor.shape[0] if tensor.shape else 1
                self.slots[tensor.name] = ShardSlot(index, offset, tensor.nbytes, tensor.nbytes // max(rows, 1))

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> int:
        """Write a whole tensor, or rows starting at `first_row`; returns the bytes written."""
        slot = self.slots[name]
        data = tensor.detach().contiguous()
        if data.device.type != "cpu":
            data = data.cpu()
        raw = memoryview(data.reshape(-1).view(torch.uint8).numpy())
        offset = slot.offset + first_row * slot.row_bytes
        if first_row == 0 and len(raw) != slot.nbytes and tensor.dim() and tensor.shape[0] * slot.row_bytes == slot.nbytes:
            raise ValueError(f"tensor {name}: {len(raw)} bytes, planned {slot.nbytes}")
        if offset + len(raw) > slot.offset + slot.nbytes:
            raise ValueError(f"tensor {name}: write past its planned end")
        self._writers[slot.shard_index].write(raw, offset)
        return len(raw)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []

    def write_index(self) -> None:
        """Write model.safetensors.index.json when there is more than one shard."""
        if len(self.shards) < 2:
            return
        weight_map = {t.name: fname for shard, fname in zip(self.shards, self.file_names) for t in shard}
        total = sum(t.nbytes for shard in self.shards for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
