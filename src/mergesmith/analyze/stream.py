"""Stream the task vectors of a model family tensor by tensor and sum their statistics per layer and overall.

Only one tensor of each model is in memory at a time (read with `SourceModel.read`), so memory is bounded by
(models + 1) × the largest tensor in float32, whatever the model size. Tensors are visited in the base's
natural order; those missing from a model, or of a different shape (other than a shorter vocabulary, which is
trimmed to the common rows as the merge does), are skipped and listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mergesmith.analyze.stats import RANK_ROWS, TensorStats, tensor_stats
from mergesmith.config.loader import ConfigLike
from mergesmith.errors import ConfigError, InputError, MergesmithError
from mergesmith.io.model_ref import ModelReference, hf_cache_dir, resolve_model_folder
from mergesmith.io.source_model import SourceModel
from mergesmith.plan.architecture import OUTPUT_HEAD_NAMES, configured_layer_count, infer_layout

_EMBEDDING_WORDS = ("embed", "wte", "wpe", "word_embeddings", "lm_head")


@dataclass
class Family:
    """What is analysed: fine-tuned models and the base their task vectors are taken against (may be None)."""

    models: list[SourceModel]
    base: SourceModel | None
    config_label: str | None = None


def family_from_config(config: ConfigLike) -> Family:
    """The models of a merge config: its base_model (if any) and every other model it names."""
    from mergesmith.api import prepare  # the planner validates and opens the models

    plan = prepare(config)
    base = plan.models[plan.base] if plan.base is not None else None
    models = [m for i, m in enumerate(plan.models) if i != plan.base]
    label = str(config) if isinstance(config, (str, Path)) and "\n" not in str(config) and Path(str(config)).is_file() else None
    return Family(models, base, label)


def family_from_paths(models: Sequence[str], base: str | None = None) -> Family:
    """Open model references (folders or cached hub ids) directly, without a merge config."""
    if not models:
        raise ConfigError("analyze: name the models to analyse (a config file, or --models A B ...)")
    problems: list[str] = []
    opened: list[SourceModel] = []
    for name in ([base] if base else []) + list(models):
        try:
            opened.append(SourceModel.open(name, resolve_model_folder(ModelReference.parse(name))))
        except MergesmithError as exc:
            problems.extend(exc.problems)
    if problems:
        raise InputError(problems)
    if base:
        return Family(opened[1:], opened[0])
    return Family(opened, None)


def model_reference(model: SourceModel) -> str:
    """How a config written elsewhere should name the model: its hub id if cached, else its absolute folder."""
    try:
        model.folder.resolve().relative_to(hf_cache_dir().resolve())
        return model.name
    except ValueError:
        return str(model.folder.resolve())


def inventory(model: SourceModel, role: str) -> dict[str, Any]:
    """Name, path, architecture, layers, hidden size, vocabulary, dtype and parameter count, from headers only."""
    cfg = model.config
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    def key(*names: str) -> Any:
        for source in (cfg, text):
            for n in names:
                if source.get(n) is not None:
                    return source[n]
        return None
    dtypes: dict[str, int] = {}
    params = 0
    for info in model.tensors.values():
        count = 1
        for d in info.shape:
            count *= d
        params += count
        name = str(info.dtype).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + count
    layout = infer_layout(model.tensors, cfg)
    return {
        "name": model.name,
        "path": str(model.folder),
        "role": role,
        "architecture": ",".join(cfg.get("architectures") or []) or cfg.get("model_type") or "?",
        "layers": configured_layer_count(cfg) or layout.num_layers,
        "hidden_size": key("hidden_size", "n_embd", "d_model"),
        "vocab_size": key("vocab_size"),
        "dtype": max(dtypes, key=lambda d: dtypes[d]) if dtypes else None,
        "parameters": params,
    }


def is_embedding(name: str) -> bool:
    return name in OUTPUT_HEAD_NAMES or any(w in name for w in _EMBEDDING_WORDS)


def group_names(model: SourceModel) -> tuple[list[str], Callable[[str], str]]:
    """The report's row labels ('embeddings', 'layer 0', ..., 'final') and a function giving a tensor's label."""
    layout = infer_layout(model.tensors, model.config)
    pattern = re.compile(rf"^{re.escape(layout.layer_prefix)}\.(\d+)\.") if layout.layer_prefix else None
    pre = set(layout.pre_weights)

    def group(name: str) -> str:
        match = pattern.match(name) if pattern else None
        if match:
            return f"layer {int(match[1])}"
        return "embeddings" if name in pre else "final"

    labels = ["embeddings"] if layout.pre_weights else []
    labels += [f"layer {i}" for i in range(layout.num_layers)]
    labels += ["final"] if layout.post_weights else []
    return labels, group


def stream_statistics(
    family: Family,
    *,
    top_k: float = 0.1,
    rank: bool = True,
    rank_rows: int = RANK_ROWS,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[str], dict[str, TensorStats], TensorStats, list[str]]:
    """(group labels, per-group sums, overall sums, skipped-tensor notes)."""
    if not 0 < top_k <= 1:
        raise ConfigError(f"--top-k must be a fraction in (0, 1], got {top_k}")
    reference = family.base or family.models[0]
    labels, group_of = group_names(reference)
    n = len(family.models)
    groups = {label: TensorStats(n) for label in labels}
    total = TensorStats(n)
    skipped: list[str] = []
    names = [name for name in infer_order(reference) if reference.tensors[name].dtype.is_floating_point]
    for done, name in enumerate(names, 1):
        rows = _common_rows(family, name, skipped)
        if rows is not _SKIP:
            weights = [m.read(name, _rows(m, name, rows)) for m in family.models]
            base = family.base.read(name, _rows(family.base, name, rows)) if family.base is not None else None
            st = tensor_stats(weights, base, top_k=top_k, rank=rank, embedding=is_embedding(name), rank_rows=rank_rows, seed_key=name)
            del weights, base
            label = group_of(name)
            if label not in groups:
                groups[label] = TensorStats(n)
                labels.append(label)
            groups[label] += st
            total += st
        if on_progress is not None:
            on_progress(done, len(names), name)
    return labels, groups, total, skipped


def infer_order(model: SourceModel) -> list[str]:
    layout = infer_layout(model.tensors, model.config)
    ordered = list(layout.pre_weights)
    for i, suffixes in sorted(layout.layer_suffixes.items()):
        ordered += [layout.layer_tensor(i, s) for s in suffixes]
    ordered += list(layout.post_weights)
    return [n for n in ordered if n in model.tensors]


_SKIP = -1


def _rows(model: SourceModel, name: str, rows: int | None) -> tuple[int, int] | None:
    return None if rows is None or model.tensors[name].shape[0] == rows else (0, rows)


def _common_rows(family: Family, name: str, skipped: list[str]) -> int | None:
    """Rows shared by every model's `name` (a shorter vocabulary trims the rest), None to read it whole,
    or _SKIP."""
    everyone = ([family.base] if family.base is not None else []) + family.models
    shapes = []
    for m in everyone:
        info = m.tensors.get(name)
        if info is None:
            skipped.append(f"{name}: missing from '{m.name}'")
            return _SKIP
        if not info.dtype.is_floating_point:
            return _SKIP
        shapes.append(info.shape)
    if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
        skipped.append(f"{name}: shapes differ ({', '.join(str(list(s)) for s in shapes)})")
        return _SKIP
    if not shapes[0]:
        return None
    rows = min(s[0] for s in shapes)
    if any(s[0] != rows for s in shapes):
        skipped.append(f"{name}: compared on the first {rows} rows (the models' vocabularies differ)")
    return rows
