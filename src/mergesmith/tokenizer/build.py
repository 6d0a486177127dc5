"""Plan the output vocabulary: which tokenizer is written and, per model, which input row feeds each output row.

Reads only tokenizer files. The output vocabulary is the base model's (`base`: base_model, else the first
model), a named model's, or the union of all of them (`union`); `tokenizer: tokens:` adds tokens and names
where their rows come from. Ids are those of the output tokenizer; the output has max id + 1 rows, rounded
up to `pad_to_multiple_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mergesmith.config.schema import MergeConfiguration, TokenSourceModelToken, TokenSourceZero
from mergesmith.errors import ConfigError, InputError, did_you_mean
from mergesmith.io.source_model import SourceModel
from mergesmith.tokenizer.files import load_tokenizer_json, vocabulary_of
from mergesmith.tokenizer.union import union_tokenizer_json, with_added_tokens


@dataclass(frozen=True)
class ExplicitRow:
    """Output row `row` is model `model`'s input row `source_row`, or zeros when `model` is None."""

    row: int
    model: int | None
    source_row: int | None


@dataclass
class VocabularyPlan:
    num_rows: int
    row_maps: list[torch.Tensor]  # per model (plan order): output row -> input row, -1 where absent
    explicit: list[ExplicitRow]
    donor: int  # whose tokenizer files (tokenizer_config.json, special tokens) the output copies
    tokenizer_json: dict[str, Any] | None  # written as tokenizer.json; None: the donor's files as they are
    remap: bool  # False when every model already has the output vocabulary at the same ids
    warnings: list[str] = field(default_factory=list)


def plan_vocabulary(config: MergeConfiguration, models: Sequence[SourceModel]) -> VocabularyPlan | None:
    """The vocabulary plan, or None when the config asks for no tokenizer handling."""
    block = config.tokenizer
    source = block.source if block is not None else config.tokenizer_source
    if source is None:
        return None
    names = [m.name for m in models]
    base = names.index(config.base_model) if config.base_model in names else 0
    warnings: list[str] = []
    jsons = [load_tokenizer_json(m.folder, m.name) for m in models]
    if jsons[base] is None:
        raise InputError(f"model '{names[base]}': no tokenizer files (tokenizer.json, tokenizer.model, vocab.json) in {models[base].folder}; tokenizer_source needs them")
    for i, data in enumerate(jsons):
        if data is None:
            warnings.append(f"model '{names[i]}' has no tokenizer files; assuming the vocabulary of '{names[base]}'")
            jsons[i] = jsons[base]

    if source == "union":
        donor = base
        others = [jsons[i] for i in range(len(models)) if i != base]
        out_json: dict[str, Any] | None = union_tokenizer_json(jsons[base], others)
    elif source == "base":
        if config.base_model is None:
            raise ConfigError("tokenizer source 'base' needs a base_model")
        donor, out_json = base, None
    elif source in names:
        donor, out_json = names.index(source), None
    else:
        raise ConfigError(f"tokenizer source '{source}' is not 'base', 'union' or one of the merged models{did_you_mean(source, names + ['base', 'union'])}")

    token_configs = dict(block.tokens or {}) if block is not None else {}
    if token_configs:
        out_json = with_added_tokens(out_json or jsons[donor], list(token_configs))
    out_vocab = vocabulary_of(out_json or jsons[donor])
    num_rows = max(out_vocab.values(), default=-1) + 1
    multiple = block.pad_to_multiple_of if block is not None else None
    if multiple:
        num_rows = -(-num_rows // multiple) * multiple

    vocabs = [vocabulary_of(j) for j in jsons]
    row_maps = []
    for vocab in vocabs:
        row_map = torch.full((num_rows,), -1, dtype=torch.long)
        pairs = [(out_id, vocab[token]) for token, out_id in out_vocab.items() if token in vocab]
        if pairs:
            index = torch.tensor(pairs, dtype=torch.long)
            row_map[index[:, 0]] = index[:, 1]
        row_maps.append(row_map)
    explicit = _explicit_rows(token_configs, out_vocab, vocabs, row_maps, names)
    remap = bool(token_configs) or any(v != out_vocab for v in vocabs) or bool(multiple)
    return VocabularyPlan(num_rows, row_maps, explicit, donor, out_json, remap, warnings)


def _explicit_rows(token_configs: dict, out_vocab: dict[str, int], vocabs: list[dict[str, int]], row_maps: list[torch.Tensor], names: list[str]) -> list[ExplicitRow]:
    problems, explicit = [], []
    for token, cfg in token_configs.items():
        row = out_vocab[token]
        if cfg.source is None or (not cfg.force and all(int(m[row]) >= 0 for m in row_maps)):
            continue  # present everywhere and not forced (or no source given): merged like any other token
        where = f"tokenizer.tokens[{token!r}]"
        if isinstance(cfg.source, TokenSourceZero):
            explicit.append(ExplicitRow(row, None, None))
            continue
        model_name = cfg.source.model if isinstance(cfg.source, TokenSourceModelToken) else str(cfg.source)
        if model_name not in names:
            problems.append(f"{where}: source model '{model_name}' is not one of the merged models{did_you_mean(model_name, names)}")
            continue
        m = names.index(model_name)
        if isinstance(cfg.source, TokenSourceModelToken):
            source_row = cfg.source.token_id if cfg.source.token_id is not None else vocabs[m].get(cfg.source.token)
            missing = cfg.source.token if cfg.source.token_id is None else f"id {cfg.source.token_id}"
        else:
            source_row, missing = vocabs[m].get(token), token
        if source_row is None or source_row < 0:
            problems.append(f"{where}: model '{model_name}' has no token {missing!r}")
            continue
        explicit.append(ExplicitRow(row, m, int(source_row)))
    if problems:
        raise ConfigError(problems)
    return explicit
