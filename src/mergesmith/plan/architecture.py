"""Infer a model's layer structure from its tensor names and config.json, with no per-architecture table.

Decoder layers appear as `<prefix><index>.<rest>` (`model.layers.3.mlp.up_proj.weight`,
`transformer.h.3.attn.c_attn.weight`, `gpt_neox.layers.3...`). The stack whose length matches the
configured layer count is the one slices address; everything else (embeddings, final norm, lm_head, a
vision tower) is a non-layer tensor, mapped one to one by name.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|layer|blocks|block|decoder_layers))\.(?P<index>\d+)\.(?P<rest>.+)$")
_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings", "vision", "visual", "image", "mm_projector", "multi_modal")
OUTPUT_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")


@dataclass(frozen=True)
class LayerLayout:
    """Where a model's decoder layers are and which tensors each holds."""

    layer_prefix: str | None  # e.g. "model.layers"; None for a model with no layer stack
    num_layers: int
    layer_suffixes: dict[int, tuple[str, ...]]  # index -> tensor names relative to the layer
    pre_weights: tuple[str, ...]  # non-layer tensors written before the layers (embeddings)
    post_weights: tuple[str, ...]  # non-layer tensors written after them (final norm, head)

    def layer_tensor(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}.{index}.{suffix}"


def configured_layer_count(config: dict[str, Any]) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(source.get(key), int):
                return source[key]
    return None


def infer_layout(tensor_names: Iterable[str], config: dict[str, Any]) -> LayerLayout:
    names = list(tensor_names)
    stacks: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in names:
        match = _LAYER_NAME.match(name)
        if match:
            stacks[match["prefix"]][int(match["index"])].append(match["rest"])
    prefix = _main_stack(stacks, configured_layer_count(config))
    layer_suffixes: dict[int, tuple[str, ...]] = {}
    if prefix is not None:
        layer_suffixes = {i: tuple(sorted(s, key=natural_key)) for i, s in sorted(stacks[prefix].items())}
    in_stack = re.compile(rf"^{re.escape(prefix)}\.\d+\.") if prefix else None
    others = sorted((n for n in names if not (in_stack and in_stack.match(n))), key=natural_key)
    pre = tuple(n for n in others if any(h in n for h in _EMBEDDING_HINTS) and n not in OUTPUT_HEAD_NAMES)
    post = tuple(n for n in others if n not in pre)
    num_layers = (max(layer_suffixes) + 1) if layer_suffixes else 0
    return LayerLayout(prefix, num_layers, layer_suffixes, pre, post)


def _main_stack(stacks: dict[str, dict[int, list[str]]], configured: int | None) -> str | None:
    if not stacks:
        return None
    def score(prefix: str) -> tuple[int, int]:
        count = max(stacks[prefix]) + 1
        return (1 if configured is not None and count == configured else 0, sum(len(v) for v in stacks[prefix].values()))
    return max(sorted(stacks), key=score)


def natural_key(name: str) -> list[Any]:
    """Sort `layers.10` after `layers.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def tied_embedding_name(tensor_names: Iterable[str]) -> str | None:
    """The input-embedding tensor that a tied output head shares, if the model has one."""
    for name in tensor_names:
        if name.endswith(INPUT_EMBEDDING_SUFFIXES):
            return name
    return None


# Keys of lists with one entry per layer whose names do not say "layer" (Gemma3n-style per-layer widths,
# MiniMax attention kinds); lists whose key contains "layer" (layer_types, no_rope_layers) always qualify.
_PER_LAYER_LIST_KEYS = ("intermediate_size", "activation_sparsity_pattern", "attn_type_list", "block_types")
# Lists that hold layer *indices*, not one entry per layer: never treated as per-layer even at the right length.
_LAYER_INDEX_LIST_KEYS = ("mlp_only_layers", "full_attn_idxs", "swa_layers")


def remap_per_layer_lists(config: dict[str, Any], old_count: int, origins: list[int]) -> dict[str, Any]:
    """A copy of config.json whose per-layer lists (`layer_types`, `no_rope_layers`, ...) follow the layers they describe.

    `origins[k]` is the source layer index of output layer k. Only the top level and `text_config` are
    scanned: a vision tower's lists describe its own layers.
    """
    updated = dict(config)
    for key, value in list(updated.items()):
        if key == "text_config" and isinstance(value, dict):
            updated[key] = remap_per_layer_lists(value, old_count, origins)
        elif _is_per_layer_list(key, value, old_count):
            updated[key] = [value[min(o, old_count - 1)] for o in origins]
    return updated


def _is_per_layer_list(key: str, value: Any, old_count: int) -> bool:
    if not isinstance(value, list) or len(value) != old_count or key in _LAYER_INDEX_LIST_KEYS:
        return False
    if not all(isinstance(v, (str, int, float, bool)) or v is None for v in value):
        return False
    return "layer" in key or key in _PER_LAYER_LIST_KEYS


def with_layer_count(config: dict[str, Any], old: int, new: int) -> dict[str, Any]:
    """A copy of config.json with every layer-count key (and per-layer lists) rewritten for `new` layers."""
    updated = dict(config)
    for key in LAYER_COUNT_KEYS:
        if updated.get(key) == old:
            updated[key] = new
    if isinstance(updated.get("text_config"), dict):
        updated["text_config"] = with_layer_count(updated["text_config"], old, new)
    return updated
