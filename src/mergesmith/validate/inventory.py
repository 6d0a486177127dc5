"""What each input model is: architecture, sizes, dtype, parameter count and a fingerprint of its tensors.

The fingerprint is a short hash of the sorted tensor names and shapes (not dtypes, not values): two models
with the same fingerprint can be merged tensor by tensor.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mergesmith.io.source_model import SourceModel
from mergesmith.plan.architecture import OUTPUT_HEAD_NAMES, infer_layout, tied_embedding_name

HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True)
class ModelInventory:
    name: str  # as the config names it
    path: Path
    architecture: str
    model_type: str
    layers: int
    hidden_size: int | None
    vocab_size: int | None
    dtype: str
    parameters: int
    tied_embeddings: bool | None  # None: the model has no token embedding
    fingerprint: str


def config_value(config: dict[str, Any], keys: Sequence[str]) -> Any:
    """The first of `keys` set in config.json, looking in `text_config` too (vision-language models)."""
    for holder in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in keys:
            if holder.get(key) is not None:
                return holder[key]
    return None


def fingerprint(model: SourceModel) -> str:
    digest = hashlib.sha256()
    for name in sorted(model.tensors):
        digest.update(f"{name}:{','.join(map(str, model.tensors[name].shape))}\n".encode())
    return digest.hexdigest()[:12]


def describe_model(model: SourceModel) -> ModelInventory:
    config = model.config
    layout = infer_layout(model.tensors, config)
    numel: Counter[str] = Counter()
    for info in model.tensors.values():
        count = 1
        for d in info.shape:
            count *= d
        numel[str(info.dtype).removeprefix("torch.")] += count
    has_head = any(n.endswith(OUTPUT_HEAD_NAMES) or n.endswith("predictions.decoder.weight") for n in model.tensors)
    tied = None if tied_embedding_name(model.tensors) is None else not has_head
    model_type = str(config.get("model_type") or "?")
    text_type = (config.get("text_config") or {}).get("model_type") if isinstance(config.get("text_config"), dict) else None
    if text_type and text_type != model_type:
        model_type = f"{model_type} (text: {text_type})"
    return ModelInventory(
        name=model.name,
        path=model.folder,
        architecture=",".join(config.get("architectures") or ["?"]),
        model_type=model_type,
        layers=layout.num_layers,
        hidden_size=config_value(config, HIDDEN_SIZE_KEYS),
        vocab_size=config_value(config, ("vocab_size",)),
        dtype="+".join(d for d, _ in numel.most_common()) or "?",
        parameters=sum(numel.values()),
        tied_embeddings=tied,
        fingerprint=fingerprint(model),
    )


def describe_models(models: Sequence[SourceModel]) -> list[ModelInventory]:
    return [describe_model(m) for m in models]


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_inventory(rows: Sequence[ModelInventory]) -> str:
    """A plain-text table, one line per model."""
    header = ("model", "path", "architecture", "model_type", "layers", "hidden", "vocab", "dtype", "params", "tied", "fingerprint")
    table = [header]
    for r in rows:
        tied = "-" if r.tied_embeddings is None else ("yes" if r.tied_embeddings else "no")
        table.append((
            r.name, str(r.path), r.architecture, r.model_type, str(r.layers), str(r.hidden_size or "?"), str(r.vocab_size or "?"),
            r.dtype, human_count(r.parameters), tied, r.fingerprint,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
