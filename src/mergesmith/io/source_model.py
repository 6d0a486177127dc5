"""One input model's files: its config, its tensor inventory from headers only, and reads of single tensors.

Safetensors (single file or sharded with an index) are read tensor by tensor with positioned reads.
`pytorch_model*.bin` files are opened with `torch.load(weights_only=True, mmap=True)`: pickled code is never
executed, and the memory map means a tensor's bytes are only touched when it is read.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import InputError
from mergesmith.io.safetensors_format import SafetensorsFormatError, StoredTensor, read_header, read_tensor


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, known without reading its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path


@dataclass
class SourceModel:
    """An input model folder. `name` is how the config refers to it, used in every message."""

    name: str
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _stored: dict[str, StoredTensor] = field(default_factory=dict, repr=False)
    _bin_files: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, name: str, folder: Path) -> "SourceModel":
        config_path = folder / "config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(f"model '{name}': {config_path} is not valid JSON ({exc.msg})") from None
        model = cls(name=name, folder=folder, config=config, tensors={})
        model._index_weights()
        return model

    def _index_weights(self) -> None:
        st_files = self._weight_files("model.safetensors.index.json", "*.safetensors")
        if st_files:
            for path in st_files:
                try:
                    stored, _ = read_header(path)
                except (OSError, SafetensorsFormatError) as exc:
                    raise InputError(f"model '{self.name}': cannot read {path.name}: {exc}") from None
                for tname, info in stored.items():
                    self._stored[tname] = info
                    self.tensors[tname] = TensorInfo(info.dtype, info.shape, path)
            return
        bin_files = self._weight_files("pytorch_model.bin.index.json", "pytorch_model*.bin")
        if not bin_files:
            raise InputError(f"model '{self.name}': no *.safetensors or pytorch_model*.bin weights in {self.folder}")
        for path in bin_files:
            state = self._load_bin(path)
            for tname, tensor in state.items():
                self.tensors[tname] = TensorInfo(tensor.dtype, tuple(tensor.shape), path)

    def _weight_files(self, index_name: str, pattern: str) -> list[Path]:
        index_path = self.folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise InputError(f"model '{self.name}': {index_path.name} is not a valid index ({exc})") from None
            files = []
            for fname in dict.fromkeys(weight_map.values()):
                path = self.folder / fname
                if not path.is_file():
                    raise InputError(f"model '{self.name}': {index_path.name} lists {fname}, which is missing")
                files.append(path)
            return files
        return sorted(p for p in self.folder.glob(pattern) if p.is_file())

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if path not in self._bin_files:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:  # torch raises many types for bad or unsafe pickles
                    raise InputError(f"model '{self.name}': cannot read {path.name} safely: {str(exc).splitlines()[0]}") from None
                if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                    state = state["state_dict"]
                if not isinstance(state, dict):
                    raise InputError(f"model '{self.name}': {path.name} does not hold a state dict")
                self._bin_files[path] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            return self._bin_files[path]

    def read(self, tensor_name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read a tensor (or rows [a, b) of it) into CPU memory in its stored dtype."""
        if tensor_name in self._stored:
            return read_tensor(self._stored[tensor_name], rows)
        info = self.tensors.get(tensor_name)
        if info is None:
            raise InputError(f"model '{self.name}': has no tensor {tensor_name}")
        tensor = self._load_bin(info.file)[tensor_name]
        if rows is not None:
            tensor = tensor[rows[0] : rows[1]]
        return tensor.clone()

    def tensor_bytes(self, tensor_name: str) -> int:
        info = self.tensors[tensor_name]
        return info.dtype.itemsize * _numel(info.shape)

    def file_listing(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
