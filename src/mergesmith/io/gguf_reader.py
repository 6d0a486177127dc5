"""A GGUF file seen as a Hugging Face model folder: same interface as `SourceModel`, so the planner needs nothing new.

Tensors are memory-mapped by `gguf.GGUFReader` and dequantized on read (F32/F16/BF16 keep their dtype; every
quantized type that `gguf.quants.dequantize` knows — Q8_0, Q4_0/1, Q5_0/1, the K-quants — becomes float32).
Names are mapped to Hugging Face names and llama.cpp's Q/K row permutation is undone, row by row: a read of
rows [a, b) gathers just the quantized rows it needs. config.json, generation_config.json and the tokenizer are
rebuilt from the metadata into a private side folder, which becomes `.folder` (so tokenizer copying, chat
templates and everything else that looks at a model's folder work unchanged).
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergesmith.errors import InputError, NotYetSupportedError
from mergesmith.io.gguf_arch import GGUFArch, arch_for_gguf, config_from_metadata, gguf_to_hf_name, hf_row_order, qk_heads
from mergesmith.io.gguf_vocab import write_hf_tokenizer
from mergesmith.io.source_model import TensorInfo


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("GGUF files need the optional 'gguf' package: pip install 'mergesmith[gguf]'") from None
    return gguf


@dataclass
class _Entry:
    tensor: Any  # gguf ReaderTensor
    shape: tuple[int, ...]  # Hugging Face shape
    row_order: np.ndarray | None  # HF row r is stored at GGUF row row_order[r]


@dataclass
class GGUFModel:
    """An input `.gguf` file. `name` is how the config refers to it; `path` is the file; `folder` the side folder."""

    name: str
    path: Path
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, Any] = field(repr=False)
    warnings: list[str] = field(default_factory=list)
    _entries: dict[str, _Entry] = field(default_factory=dict, repr=False)
    _reader: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, name: str, path: Path) -> "GGUFModel":
        gguf = import_gguf()
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # gguf raises ValueError/struct.error/… for damaged files
            raise InputError(f"model '{name}': cannot read GGUF file {path}: {exc}") from None
        meta = read_metadata(reader)
        arch = arch_for_gguf(str(meta.get("general.architecture", "?")))
        folder = _side_folder(path)
        model = cls(name=name, path=path, folder=folder, config={}, tensors={}, metadata=meta, _reader=reader)
        model._index(reader, arch)
        model._write_side_files(arch)
        return model

    # -- inventory ---------------------------------------------------------------------------------------
    def _index(self, reader: Any, arch: GGUFArch) -> None:
        gguf = import_gguf()
        q = gguf.GGMLQuantizationType
        p = arch.gguf_name + "."
        heads_config = {
            "num_attention_heads": int(self.metadata[p + "attention.head_count"]),
            "num_key_value_heads": int(self.metadata.get(p + "attention.head_count_kv", self.metadata[p + "attention.head_count"])),
        }
        skipped = []
        for t in reader.tensors:
            hf_name = gguf_to_hf_name(t.name)
            if hf_name is None:
                skipped.append(t.name)
                continue
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
            if t.tensor_type == q.F32:
                dtype = torch.float32
            elif t.tensor_type == q.F16:
                dtype = torch.float16
            elif t.tensor_type == q.BF16:
                dtype = torch.bfloat16
            elif t.tensor_type in gguf.quants._type_traits or t.tensor_type in (q.F64,):
                dtype = torch.float32
            else:
                raise NotYetSupportedError(f"model '{self.name}': tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize")
            heads = qk_heads(hf_name, heads_config) if arch.permute_qk else None
            order = hf_row_order(shape[0], heads) if heads else None
            self._entries[hf_name] = _Entry(t, shape, order)
            self.tensors[hf_name] = TensorInfo(dtype, shape, self.path)
        if skipped:
            self.warnings.append(f"model '{self.name}': GGUF tensors without a Hugging Face counterpart were skipped: {', '.join(skipped)}")
        if "model.embed_tokens.weight" not in self.tensors:
            raise InputError(f"model '{self.name}': GGUF file has no token_embd.weight")

    def _write_side_files(self, arch: GGUFArch) -> None:
        meta = self.metadata
        vocab_size = self.tensors["model.embed_tokens.weight"].shape[0]
        kinds = {info.dtype for n, info in self.tensors.items() if len(info.shape) > 1}
        dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(next(iter(kinds)), "float32") if len(kinds) == 1 else "float32"
        tied = "lm_head.weight" not in self.tensors
        self.config = config_from_metadata(arch, meta, vocab_size=vocab_size, tied=tied, torch_dtype=dtype)
        _write_json(self.folder / "config.json", self.config)
        generation = {k: self.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in self.config}
        _write_json(self.folder / "generation_config.json", generation)
        self.warnings.extend(write_hf_tokenizer({**meta, "_context_length": self.config["max_position_embeddings"]}, self.folder))

    # -- reads -------------------------------------------------------------------------------------------
    def read(self, tensor_name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read a tensor (or rows [a, b) of it), dequantized, in Hugging Face layout."""
        entry = self._entries.get(tensor_name)
        if entry is None:
            raise InputError(f"model '{self.name}': has no tensor {tensor_name}")
        n_rows = entry.shape[0]
        a, b = rows if rows is not None else (0, n_rows)
        if len(entry.shape) == 1:  # small: read whole, then select
            flat = _to_torch(entry.tensor, np.array(entry.tensor.data).reshape(1, -1)).reshape(-1)
            index = torch.from_numpy(entry.row_order[a:b]) if entry.row_order is not None else slice(a, b)
            return flat[index].clone()
        data = np.asarray(entry.tensor.data).reshape(n_rows, -1)  # one GGUF row (quantized bytes or values) per HF row
        raw = data[entry.row_order[a:b]] if entry.row_order is not None else np.array(data[a:b])
        return _to_torch(entry.tensor, raw).reshape((b - a, *entry.shape[1:]))

    def tensor_bytes(self, tensor_name: str) -> int:
        info = self.tensors[tensor_name]
        return info.dtype.itemsize * math.prod(info.shape)

    def file_listing(self) -> list[Path]:
        return [self.path]


def _to_torch(tensor: Any, raw: np.ndarray) -> torch.Tensor:
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    kind = tensor.tensor_type
    if kind == q.F32:
        return torch.from_numpy(np.ascontiguousarray(raw.view(np.float32)))
    if kind == q.F16:
        return torch.from_numpy(np.ascontiguousarray(raw.view(np.float16)))
    if kind == q.BF16:
        return torch.from_numpy(np.ascontiguousarray(raw.view(np.int16))).view(torch.bfloat16)
    if kind == q.F64:
        return torch.from_numpy(np.ascontiguousarray(raw.view(np.float64))).float()
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, kind)))


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = fld.contents()
        except Exception:  # an exotic value type; metadata we do not use
            continue
    return meta


def find_gguf(path: Path) -> Path | None:
    """The GGUF file a reference means: the file itself, or the only `.gguf` in a folder without HF weights."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        return None
    found = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        raise InputError(f"folder {path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); name one of them")
    return found[0] if found else None


_SIDE_FOLDERS: list[Path] = []
_SIDE_LOCK = threading.Lock()


def _side_folder(path: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"mergesmith-gguf-{path.stem[:40]}-"))
    with _SIDE_LOCK:
        if not _SIDE_FOLDERS:
            atexit.register(_remove_side_folders)
        _SIDE_FOLDERS.append(folder)
    return folder


def _remove_side_folders() -> None:
    for folder in _SIDE_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass
class ConvertResult:
    path: Path
    tensors: int
    bytes: int
    warnings: list[str]


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "auto", overwrite: bool = False,
                       max_shard_bytes: int = 5 * 10**9) -> ConvertResult:  # fmt: skip
    """Write a GGUF model as a Hugging Face folder (safetensors, config, generation config, tokenizer).

    dtype "auto" keeps F32/F16/BF16 tensors as stored and writes dequantized ones as float32 (the only dtype
    that holds them exactly); "float16"/"bfloat16"/"float32" cast everything.
    """
    from mergesmith.io.output_folder import StagingFolder, check_output_target, copy_generation_config, copy_tokenizer_files
    from mergesmith.io.shard_writer import PlannedTensor, ShardWriter

    path = Path(gguf_path)
    found = find_gguf(path)
    if found is None:
        raise InputError(f"{path}: not a .gguf file (or a folder holding one)")
    casts = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in casts:
        raise InputError(f"--dtype: '{dtype}' is not one of {', '.join(casts)}")
    model = GGUFModel.open(found.name, found)
    out = Path(out_dir)
    check_output_target(out, overwrite)
    names = list(model.tensors)
    planned = [PlannedTensor(n, casts[dtype] or model.tensors[n].dtype, model.tensors[n].shape) for n in names]
    staging = StagingFolder(out)
    try:
        writer = ShardWriter(staging.path, planned, max_shard_bytes, metadata={"converted_from": found.name[:200]})
        try:
            for tensor in planned:
                writer.write(tensor.name, model.read(tensor.name).to(tensor.dtype))
        finally:
            writer.close()
        writer.write_index()
        config = dict(model.config)
        out_dtypes = {t.dtype for t in planned if len(t.shape) > 1}
        if len(out_dtypes) == 1:
            config["torch_dtype"] = str(next(iter(out_dtypes))).removeprefix("torch.")
        _write_json(staging.path / "config.json", config)
        copy_generation_config(model.folder, staging.path)
        copy_tokenizer_files(model.folder, staging.path)
        final = staging.commit()
    except BaseException:
        staging.discard()
        raise
    return ConvertResult(final, len(planned), sum(t.nbytes for t in planned), model.warnings)
