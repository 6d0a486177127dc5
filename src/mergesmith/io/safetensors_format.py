"""The safetensors file format, read and written directly.

A file is an 8-byte little-endian header length, a JSON header mapping tensor names to
`{dtype, shape, data_offsets}`, then raw little-endian tensor bytes. Reading the header alone tells us every
tensor's shape and dtype without touching data, which is what validation and planning need; reading a
tensor (or a range of its rows) is one `pread` of a contiguous byte range, which releases the GIL and lets
the reader thread overlap with compute.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFormatError(ValueError):
    """The file is not a valid safetensors file."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives in a file, known from the header alone."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first element
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse a safetensors header: tensors by name (in file order) and the `__metadata__` strings."""
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise SafetensorsFormatError(f"{path}: file too short to be safetensors")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES:
            raise SafetensorsFormatError(f"{path}: header length {header_len} is not plausible")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsFormatError(f"{path}: header is not valid JSON ({exc})") from None
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, StoredTensor] = {}
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsFormatError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        tensors[name] = StoredTensor(path, dtype, tuple(info["shape"]), data_start + begin, data_start + end)
    return tensors, metadata


# Inputs are mapped rather than copied: a 1B merge of three models copied 6.6 GB from the page cache into fresh
# buffers, CPU time and memory traffic that the merge's own passes (memory-bound on a small VM) then lacked
# (alternating 1B runs: ties 10.9-11.1 -> 10.0-10.1 s, DELLA 11.7-12.6 -> 10.4-11.2, SCE 11.8 -> 10.6, linear
# 4.75 -> 4.66; system CPU -2 s; peak RSS lower, since a tensor's mapping goes with it).
# MERGESMITH_MMAP_READ=0 reads with pread instead.
MAP_READS = os.environ.get("MERGESMITH_MMAP_READ", "1") != "0"
_POPULATE_READ = 22 if sys.platform.startswith("linux") else None  # MADV_POPULATE_READ (Linux 5.14+)


def _mapped(path: Path, start: int, end: int) -> torch.Tensor | None:
    """Bytes [start, end) of a file as a uint8 tensor over a private mapping of just that range (copy on write:
    the file is never written; the mapping is unmapped when the tensor is freed), its pages mapped now where
    the kernel can, so the reader thread takes the faults; None when the range cannot be mapped (a file
    shorter than its header says: the positioned read then reports it)."""
    page = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), end - page, offset=page, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    if _POPULATE_READ is not None:
        try:
            mapping.madvise(_POPULATE_READ)
        except OSError:  # older kernels: the pages fault in as the merge reads them
            pass
    return torch.frombuffer(mapping, dtype=torch.uint8, count=end - start, offset=start - page)


def read_tensor(stored: StoredTensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a tensor (or rows [a, b) of its first dimension): mapped (`MAP_READS`), else with one positioned read."""
    shape = list(stored.shape)
    start, end = stored.start, stored.end
    if rows is not None and shape:
        row_bytes = (end - start) // shape[0] if shape[0] else 0
        start, end = start + rows[0] * row_bytes, start + rows[1] * row_bytes
        shape[0] = rows[1] - rows[0]
    size = end - start
    if size == 0:
        return torch.empty(shape, dtype=stored.dtype)
    if MAP_READS:
        mapped = _mapped(stored.file, start, end)
        if mapped is not None:
            return mapped.view(stored.dtype).reshape(shape)
    # torch's allocator, not a bytearray: no zero-fill before the read, and huge pages where enabled
    buffer = torch.empty(size, dtype=torch.uint8)
    fd = os.open(stored.file, os.O_RDONLY)
    try:
        view = memoryview(buffer.numpy())
        done = 0
        while done < size:
            got = os.preadv(fd, [view[done:]], start + done)
            if got == 0:
                raise SafetensorsFormatError(f"{stored.file}: file ends inside tensor data")
            done += got
    finally:
        os.close(fd)
    return buffer.view(stored.dtype).reshape(shape)


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Build a header for tensors stored back to back in the given order.

    Returns the bytes to write at the start of the file (length prefix included, padded to 8 bytes so that
    the data is aligned) and each tensor's absolute offset.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    relative = 0
    relative_offsets = []
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [relative, relative + nbytes]}
        relative_offsets.append(relative)
        relative += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    return prefix, [len(prefix) + r for r in relative_offsets]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
