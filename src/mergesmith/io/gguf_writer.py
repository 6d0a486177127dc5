"""Export a Hugging Face model folder (a merge, usually) to one GGUF file that llama.cpp runs.

Streams like the merge does: every tensor's GGUF type and byte size is known from the input's headers, so the
GGUF header and tensor directory are written first and each tensor is then read, permuted (llama.cpp's Q/K row
order), converted and appended one at a time; memory holds one tensor. Types: f32, f16, bf16, q8_0
(`gguf.quants.quantize`). As llama.cpp does, 1-D tensors (norms, biases) stay F32, and a q8_0 tensor whose rows
are not a multiple of 32 values falls back to F16. The file appears under its name only when complete.
The input may itself be a GGUF file (re-quantization).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergesmith.errors import NotYetSupportedError, OutputError
from mergesmith.io.gguf_arch import arch_for_hf, gguf_row_order, hf_to_gguf_name, metadata_from_config, qk_heads
from mergesmith.io.gguf_reader import import_gguf
from mergesmith.io.gguf_types import OUT_TYPES
from mergesmith.io.gguf_vocab import gguf_vocab_from_hf



@dataclass
class ExportResult:
    path: Path
    tensors: int
    bytes: int
    types: dict[str, int] = field(default_factory=dict)  # GGUF type name → tensor count
    warnings: list[str] = field(default_factory=list)


def export_gguf(model_ref: str | os.PathLike, out_path: str | os.PathLike, out_type: str = "f16", *, overwrite: bool = False, name: str | None = None) -> ExportResult:
    """Write the model at `model_ref` (HF folder or GGUF file) to `out_path` as GGUF with `out_type` weights."""
    from mergesmith.io.model_ref import ModelReference
    from mergesmith.io.open_model import open_model

    gguf = import_gguf()
    out_type = out_type.lower()
    if out_type not in OUT_TYPES:
        raise OutputError(f"GGUF type '{out_type}' is not supported (choose from {', '.join(OUT_TYPES)})")
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give a file name ending in .gguf")
    model = open_model(str(model_ref), ModelReference.parse(str(model_ref)))
    config = model.config
    arch = arch_for_hf(config)
    warnings = list(getattr(model, "warnings", []))

    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in model.tensors
    planned: list[tuple[str, str, tuple[int, ...], Any, int]] = []  # hf name, gguf name, shape, GGML type, nbytes
    unknown = []
    for hf_name in sorted(model.tensors, key=_tensor_order):
        gguf_name = hf_to_gguf_name(hf_name)
        if gguf_name is None:
            if not hf_name.endswith("rotary_emb.inv_freq"):
                unknown.append(hf_name)
            continue
        if hf_name == "lm_head.weight" and tied:
            continue
        shape = model.tensors[hf_name].shape
        qtype = _ggml_type(gguf, out_type, shape)
        if out_type == "q8_0" and len(shape) > 1 and qtype != gguf.GGMLQuantizationType.Q8_0:
            warnings.append(f"{hf_name}: rows of {shape[-1]} values are not a multiple of 32; written as F16")
        planned.append((hf_name, gguf_name, shape, qtype, _nbytes(gguf, qtype, shape)))
    if unknown:
        raise NotYetSupportedError(f"GGUF export: no GGUF name for tensor(s) {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")

    vocab_size = model.tensors["model.embed_tokens.weight"].shape[0]
    vocab_meta, vocab_warnings = gguf_vocab_from_hf(model.folder, config, vocab_size)
    warnings.extend(vocab_warnings)

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch.gguf_name)
    try:
        writer.add_name(name or _model_name(model_ref, config))
        writer.add_type("model")
        writer.add_file_type(_file_type(gguf, out_type))
        if out_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in {**metadata_from_config(config), **vocab_meta}.items():
            _add_value(writer, key, value)
        for _, gguf_name, shape, qtype, nbytes in planned:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        types: dict[str, int] = {}
        total = 0
        for hf_name, _, shape, qtype, nbytes in planned:
            data = _convert(gguf, _hf_to_gguf_rows(model.read(hf_name), hf_name, config, arch.permute_qk), qtype)
            writer.write_tensor_data(data)
            types[qtype.name] = types.get(qtype.name, 0) + 1
            total += nbytes
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out, len(planned), total, types, warnings)


def _hf_to_gguf_rows(tensor: torch.Tensor, hf_name: str, config: dict[str, Any], permute: bool) -> torch.Tensor:
    heads = qk_heads(hf_name, config) if permute else None
    if heads:
        tensor = tensor[torch.from_numpy(gguf_row_order(tensor.shape[0], heads))]
    return tensor


def _ggml_type(gguf: Any, out_type: str, shape: tuple[int, ...]):
    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or out_type == "f32":
        return q.F32
    if out_type == "q8_0":
        return q.Q8_0 if shape[-1] % 32 == 0 else q.F16
    return q.BF16 if out_type == "bf16" else q.F16


def _nbytes(gguf: Any, qtype: Any, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _convert(gguf: Any, tensor: torch.Tensor, qtype: Any) -> np.ndarray:
    q = gguf.GGMLQuantizationType
    if qtype == q.BF16:  # exact: round-to-nearest-even by torch, then the raw bits
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    array = tensor.to(torch.float32).contiguous().numpy()
    if qtype == q.F32:
        return array
    if qtype == q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def _file_type(gguf: Any, out_type: str) -> int:
    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[out_type]


def _add_value(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"metadata {key}: cannot store {type(value).__name__}")


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _tensor_order(name: str) -> tuple[int, int, str]:
    """llama.cpp's order: embeddings, then layer by layer, then the final norm and the head."""
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    match = _LAYER.match(name)
    if match:
        return (1, int(match[1]), name)
    return (2, 0 if name.startswith("model.norm") else 1, name)


def _model_name(ref: str | os.PathLike, config: dict[str, Any]) -> str:
    return str(config.get("_name_or_path") or Path(ref).name or "model")
