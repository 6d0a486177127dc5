"""Turn a config and the models' headers into one task per output tensor, before any tensor data is read.

Each task knows its output name, shape and dtype, its inputs as (model, tensor name) pairs, the method, and
every parameter already resolved to plain values. Everything that can be wrong with a merge short of the
tensor values themselves is found here, so `--dry-run`, validation, the progress bar's total and the shard
headers all come from the plan.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mergesmith.config.schema import MergeConfiguration
from mergesmith.errors import CompatibilityError, ConfigError, InputError, MergesmithError, NotYetSupportedError, did_you_mean
from mergesmith.io.model_ref import ModelReference
from mergesmith.io.open_model import open_model
from mergesmith.io.shard_writer import PlannedTensor
from mergesmith.io.source_model import SourceModel
from mergesmith.methods.registry import MethodSpec, get_method, method_names
from mergesmith.plan.architecture import (
    OUTPUT_HEAD_NAMES,
    infer_layout,
    remap_per_layer_lists,
    tied_embedding_name,
    with_layer_count,
)
from mergesmith.plan.parameters import MissingParameter, resolve_parameter
from mergesmith.tokenizer.build import VocabularyPlan, plan_vocabulary

DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInput:
    model: int  # index into MergePlan.models
    name: str


@dataclass
class TensorTask:
    output: PlannedTensor
    inputs: tuple[TensorInput, ...]  # the tensors the method receives, in config order
    base: TensorInput | None
    method: MethodSpec
    kwargs: dict[str, Any]
    keep_rows: int | None = None  # trim every input to its first rows (embeddings of different vocab sizes)
    seed: int | None = None
    copy_only: bool = False  # non-float tensors (buffers, masks) are copied from the first input
    # Vocabulary-indexed tensors rebuilt for the output tokenizer: per input (then the base), output row ->
    # input row (-1 where that model lacks the token); rows forced by `tokenizer: tokens:` as
    # (output row, input position or None for zeros, input row). The executor gathers; see tokenizer.embed.
    row_maps: tuple[torch.Tensor, ...] | None = None
    base_row_map: torch.Tensor | None = None
    explicit_rows: tuple[tuple[int, int | None, int], ...] = ()


@dataclass
class MergePlan:
    config: MergeConfiguration
    method: MethodSpec
    models: list[SourceModel]
    tasks: list[TensorTask]
    out_config: dict[str, Any]
    num_layers: int
    donor: int  # model whose config.json, tokenizer and generation config the output takes
    base: int | None
    warnings: list[str] = field(default_factory=list)
    tokenizer_donor: int | None = None  # set once the tokenizer source is resolved; None means `donor`
    vocabulary: VocabularyPlan | None = None  # the output tokenizer, when the config asks for one

    @property
    def output_bytes(self) -> int:
        return sum(t.output.nbytes for t in self.tasks)

    @property
    def input_bytes(self) -> int:
        total = 0
        for task in self.tasks:
            for tin in task.inputs + ((task.base,) if task.base else ()):
                total += self.models[tin.model].tensor_bytes(tin.name)
        return total


@dataclass(frozen=True)
class _Source:
    """One input of a slice: a model and its layer range, with its own parameters."""

    model: int
    start: int
    end: int
    parameters: dict[str, Any] | None


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    parameters: dict[str, Any] | None
    base: int | None  # index into sources


def parse_dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = DTYPE_ALIASES.get(name.lower())
    if dtype is None:
        raise ConfigError(f"'{key}': unknown dtype '{name}'{did_you_mean(name, ['float32', 'float16', 'bfloat16'])}")
    return dtype


def plan_merge(
    config: MergeConfiguration,
    *,
    base_dir: Path | None = None,
    random_seed: int = 0,
    out_dtype_override: str | None = None,
    allow_crimes: bool = False,
    check_models: Callable[[list[SourceModel]], list[str]] | None = None,
) -> MergePlan:
    """Build the plan, or raise a MergesmithError listing every problem found.

    `check_models` (the validate layer's compatibility check, passed in by the API) runs on the opened
    models before any tensor is planned; it raises on problems and returns warnings.

    The output dtype is `out_dtype_override` (the CLI's --dtype), else `out_dtype`, else `dtype`, else each
    tensor's stored dtype. Computation itself always happens in float32.
    """
    method = _method_for(config)
    compute_dtype = parse_dtype(config.dtype, "dtype")
    out_dtype = parse_dtype(out_dtype_override, "--dtype") or parse_dtype(config.out_dtype, "out_dtype") or compute_dtype
    if config.modules:
        raise NotYetSupportedError("'modules:' configs (per-module merges of multimodal models) are not supported yet; use 'models:' or 'slices:'")
    _check_parameter_names(config, method)
    names, models = open_models(config, base_dir)
    crime = _architecture_mismatch(models)
    problems: list[str] = []
    if crime and not allow_crimes:
        problems.append(f"{crime}; pass --allow-crimes to merge them anyway (tensor names and shapes must still match)")
    checked_warnings: list[str] = []
    if check_models is not None:
        try:
            checked_warnings = check_models(models)
        except CompatibilityError as exc:
            problems.extend(exc.problems)
    if problems:
        raise CompatibilityError(problems)
    builder = _PlanBuilder(config, method, models, out_dtype, random_seed)
    builder.vocabulary = plan_vocabulary(config, models)
    if builder.vocabulary is not None:
        builder.warnings.extend(builder.vocabulary.warnings)
    if crime:
        builder.warnings.append(crime)
    builder.warnings.extend(checked_warnings)
    builder.warnings.extend(w for m in models for w in getattr(m, "warnings", []))  # e.g. GGUF tensors skipped
    slices = builder.slices(names)
    return builder.build(slices)


def _method_for(config: MergeConfiguration) -> MethodSpec:
    method = get_method(config.merge_method)
    if method is None:
        hint = did_you_mean(config.merge_method, method_names())
        raise ConfigError(f"unknown merge_method '{config.merge_method}'{hint} (see `mergesmith methods`)")
    return method


def _check_parameter_names(config: MergeConfiguration, method: MethodSpec) -> None:
    problems = []
    known = [p.name for p in method.params]
    scopes: list[tuple[str, dict | None, bool]] = [("parameters", config.parameters, False)]
    for i, m in enumerate(config.models or []):
        scopes.append((f"models[{i}] ({m.model}).parameters", m.parameters, True))
    for i, s in enumerate(config.slices or []):
        scopes.append((f"slices[{i}].parameters", s.parameters, False))
        for j, src in enumerate(s.sources):
            scopes.append((f"slices[{i}].sources[{j}] ({src.model}).parameters", src.parameters, True))
    for where, params, per_model in scopes:
        for name in params or {}:
            spec = method.param(name)
            if spec is None:
                accepted = ", ".join(known) if known else "no parameters"
                problems.append(
                    f"{where}: merge_method {method.name} has no parameter '{name}'{did_you_mean(name, known)} (it takes: {accepted})"
                )
            elif per_model and not spec.per_model:
                problems.append(f"{where}: '{name}' is a global parameter of {method.name}; set it under the top-level 'parameters:'")
    if problems:
        raise ConfigError(problems)


def _architecture_mismatch(models: list[SourceModel]) -> str | None:
    """Describe differing `architectures` classes (mergekit calls merging them a crime), or None."""
    classes = {m.name: ",".join(m.config.get("architectures") or ["?"]) for m in models}
    if len(set(classes.values())) <= 1:
        return None
    return "architectures differ: " + ", ".join(f"'{name}' {cls}" for name, cls in classes.items())


def open_models(config: MergeConfiguration, base_dir: Path | None) -> tuple[list[str], list[SourceModel]]:
    """Open every model the config names (headers only), reporting every unreadable one at once."""
    names = config.referenced_models()
    models: list[SourceModel] = []
    problems: list[str] = []
    for name in names:
        try:
            ref = ModelReference.parse(name)
            models.append(open_model(name, ref, base_dir=base_dir))  # a HF folder or a GGUF file
        except MergesmithError as exc:
            problems.extend(exc.problems)
            if isinstance(exc, NotYetSupportedError) and len(names) == 1:
                raise
    if problems:
        raise InputError(problems)
    return names, models


class _PlanBuilder:
    def __init__(self, config: MergeConfiguration, method: MethodSpec, models: list[SourceModel], out_dtype: torch.dtype | None, seed: int):
        self.config = config
        self.method = method
        self.models = models
        self.out_dtype = out_dtype
        self.seed = seed
        self.layouts = [infer_layout(m.tensors, m.config) for m in models]
        self.tasks: list[TensorTask] = []
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._missing_reported: set[tuple[str, str]] = set()
        self._checked_problems: set[str] = set()
        self.vocabulary: VocabularyPlan | None = None

    # -- slices --------------------------------------------------------------------------------------
    def slices(self, names: list[str]) -> list[_Slice]:
        index = {name: i for i, name in enumerate(names)}
        config = self.config
        if config.models:
            sources = [self._full_range(index[m.model], m.parameters) for m in config.models]
            base = index.get(config.base_model) if config.base_model else None
            # As in mergekit, a base_model missing from `models:` is added as an input, for every method
            # (so linear with a base_model averages the base too, and needs its weight).
            if base is not None and all(s.model != base for s in sources):
                sources.append(self._full_range(base, None))
            out = [self._make_slice(0, sources, None, config.base_model)]
        else:
            out = []
            for i, sdef in enumerate(config.slices or []):
                sources = [_Source(index[src.model], *src.layer_range, src.parameters) for src in sdef.sources]
                out.append(self._make_slice(i, sources, sdef.parameters, sdef.base_model or config.base_model))
        if self.problems:
            raise CompatibilityError(self.problems)
        return out

    def _full_range(self, model: int, params: dict | None) -> _Source:
        return _Source(model, 0, self.layouts[model].num_layers, params)

    def _make_slice(self, i: int, sources: list[_Source], params: dict | None, base_name: str | None) -> _Slice:
        where = f"slices[{i}]" if self.config.slices else "models"
        lengths = []
        for s in sources:
            model, layout = self.models[s.model], self.layouts[s.model]
            if s.end > layout.num_layers:
                self.problems.append(
                    f"{where}: layer_range [{s.start}, {s.end}] is beyond model '{model.name}', which has {layout.num_layers} layers (the end is exclusive)"
                )
            lengths.append(s.end - s.start)
        if len(set(lengths)) > 1:
            desc = ", ".join(f"'{self.models[s.model].name}' {s.end - s.start}" for s in sources)
            self.problems.append(f"{where}: sources must have the same number of layers to be merged together ({desc})")
        base = None
        if base_name is not None and self.method.base != "ignored":
            base = next((j for j, s in enumerate(sources) if self.models[s.model].name == base_name), None)
            if base is None:
                self.problems.append(f"{where}: base_model '{base_name}' is not among the sources; add it with a layer_range")
        if self.method.base == "required" and base_name is None:
            self.problems.append(f"merge_method {self.method.name} needs a base_model")
        count = len(sources) - (1 if base is not None else 0)
        if count < self.method.min_models or (self.method.max_models is not None and count > self.method.max_models):
            role = " besides the base model" if self.method.base != "ignored" else ""
            self.problems.append(
                f"{where}: merge_method {self.method.name} takes {self.method.describe_model_count()}{role}, got {count}"
                + (" (methods that take N models: linear, task_arithmetic, ties, dare_ties, multislerp, karcher, model_stock)" if self.method.max_models else "")
            )
        return _Slice(tuple(sources), params, base)

    # -- tensors -------------------------------------------------------------------------------------
    def build(self, slices: list[_Slice]) -> MergePlan:
        first, last = slices[0], slices[-1]
        donor = self._template(first)
        donor_layout = self.layouts[donor]
        for name in donor_layout.pre_weights:
            self._plan_tensor(name, first, [name] * len(first.sources), t=0.0, outside_layers=True)
        out_layer = 0
        for sl in slices:
            tsource = sl.sources[sl.base if sl.base is not None else 0]
            template = tsource.model
            n = sl.sources[0].end - sl.sources[0].start
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                suffixes = self.layouts[template].layer_suffixes.get(tsource.start + offset, ())
                for suffix in suffixes:
                    out_name = donor_layout.layer_tensor(out_layer, suffix)
                    in_names = [self.layouts[s.model].layer_tensor(s.start + offset, suffix) for s in sl.sources]
                    self._plan_tensor(out_name, sl, in_names, t=t)
                out_layer += 1
        last_template = self._template(last)
        for name in self.layouts[last_template].post_weights:
            self._plan_tensor(name, last, [name] * len(last.sources), t=0.0, outside_layers=True)
        if self.problems:
            raise CompatibilityError(self.problems)
        out_config = self._output_config(donor, slices, out_layer)
        base = first.sources[first.base].model if first.base is not None else None
        plan = MergePlan(self.config, self.method, self.models, self.tasks, out_config, out_layer, donor, base, self.warnings)
        plan.vocabulary = self.vocabulary
        return plan

    def _template(self, sl: _Slice) -> int:
        """The model whose tensor names define the output: the base when it is an input, else the first source."""
        return sl.sources[sl.base].model if sl.base is not None else sl.sources[0].model

    def _input_name(self, model: int, name: str) -> str | None:
        tensors = self.models[model].tensors
        if name in tensors:
            return name
        if name in OUTPUT_HEAD_NAMES:  # a tied model has no head; its input embedding plays that role
            return tied_embedding_name(tensors)
        return None

    def _plan_tensor(self, out_name: str, sl: _Slice, in_names: Sequence[str], t: float, outside_layers: bool = False) -> None:
        resolved: list[TensorInput] = []
        for s, name in zip(sl.sources, in_names):
            actual = self._input_name(s.model, name)
            if actual is None:
                self.problems.append(f"model '{self.models[s.model].name}' has no tensor {name} (needed for {out_name})")
                return
            resolved.append(TensorInput(s.model, actual))
        infos = [self.models[r.model].tensors[r.name] for r in resolved]
        shapes = [i.shape for i in infos]
        keep_rows = None
        vocab = self.vocabulary if self.vocabulary is not None and self.vocabulary.remap else None
        remap = vocab is not None and outside_layers and all(self._is_vocab_tensor(r, s) for r, s in zip(resolved, shapes))
        if remap and len({s[1:] for s in shapes}) == 1:
            shapes = [(vocab.num_rows, *s[1:]) for s in shapes]
        elif len(set(shapes)) > 1:
            keep_rows = self._reconcile_shapes(out_name, resolved, shapes)
            if keep_rows is None:
                return
        shape = (keep_rows, *shapes[0][1:]) if keep_rows is not None else shapes[0]
        template = resolved[sl.base if sl.base is not None else 0]
        stored_dtype = self.models[template.model].tensors[template.name].dtype
        copy_only = not stored_dtype.is_floating_point
        out_dtype = stored_dtype if copy_only else (self.out_dtype or stored_dtype)
        base = resolved[sl.base] if sl.base is not None else None
        members = [(s, r) for j, (s, r) in enumerate(zip(sl.sources, resolved)) if j != sl.base]
        kwargs = {} if copy_only else self._resolve_kwargs(out_name, sl, members, t)
        if kwargs is None:
            return
        seed = zlib.crc32(f"{self.seed}:{out_name}".encode()) if self.method.random else None
        task = TensorTask(
            output=PlannedTensor(out_name, out_dtype, tuple(shape)),
            inputs=tuple(r for _, r in members) if not copy_only else (resolved[0],),
            base=base if not copy_only else None,
            method=self.method,
            kwargs=kwargs,
            keep_rows=keep_rows,
            seed=seed,
            copy_only=copy_only,
        )
        if remap:
            self._add_row_maps(task, resolved, sl.base, vocab)
        self.tasks.append(task)

    def _is_vocab_tensor(self, tin: TensorInput, shape: tuple[int, ...]) -> bool:
        """A non-layer tensor indexed by token: its first dimension is the model's vocab_size (not positions)."""
        config = self.models[tin.model].config
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        vocab_size = config.get("vocab_size") or text.get("vocab_size")
        if not shape or shape[0] != vocab_size or any(h in tin.name for h in ("position", "wpe", "token_type")):
            return False
        return True

    def _add_row_maps(self, task: TensorTask, resolved: list[TensorInput], base_pos: int | None, vocab: VocabularyPlan) -> None:
        def clamp(tin: TensorInput) -> torch.Tensor:
            row_map = vocab.row_maps[tin.model]
            rows = self.models[tin.model].tensors[tin.name].shape[0]
            return torch.where(row_map < rows, row_map, torch.full_like(row_map, -1))

        if task.copy_only:
            self.problems.append(f"tensor {task.output.name}: cannot rebuild a non-float vocabulary tensor for the output tokenizer")
            return
        task.row_maps = tuple(clamp(t) for t in task.inputs)
        task.base_row_map = clamp(task.base) if task.base is not None else None
        positions = {t.model: j for j, t in enumerate(task.inputs)}
        if task.base is not None:
            positions.setdefault(task.base.model, len(task.inputs))
        explicit = []
        for entry in vocab.explicit:
            if entry.model is not None and entry.model not in positions:
                self.problems.append(
                    f"tokenizer.tokens: the row of token {entry.row} comes from '{self.models[entry.model].name}', which is not an input of {task.output.name}"
                )
                continue
            explicit.append((entry.row, None if entry.model is None else positions[entry.model], entry.source_row or 0))
        task.explicit_rows = tuple(explicit)

    def _reconcile_shapes(self, out_name: str, inputs: list[TensorInput], shapes: list[tuple[int, ...]]) -> int | None:
        """Embeddings of different vocab sizes merge on their common rows (as mergekit does); other mismatches are errors."""
        same_tail = len({s[1:] for s in shapes}) == 1 and all(len(s) >= 1 for s in shapes)
        is_vocab = any(h in out_name for h in ("embed", "wte", "lm_head", "embed_out", "word_embeddings", "output.weight"))
        if same_tail and is_vocab:
            rows = min(s[0] for s in shapes)
            sizes = ", ".join(f"'{self.models[i.model].name}' {s[0]}" for i, s in zip(inputs, shapes))
            self.warnings.append(f"{out_name}: vocabulary sizes differ ({sizes}); merging the first {rows} rows")
            return rows
        desc = ", ".join(f"'{self.models[i.model].name}' {list(s)}" for i, s in zip(inputs, shapes))
        self.problems.append(f"tensor {out_name}: shapes differ ({desc})")
        return None

    def _resolve_kwargs(self, out_name: str, sl: _Slice, members: list[tuple[_Source, TensorInput]], t: float) -> dict[str, Any] | None:
        kwargs: dict[str, Any] = {}
        global_scopes = [sl.parameters, self.config.parameters]
        try:
            for p in self.method.global_params:
                kwargs[p.arg] = resolve_parameter(p, global_scopes, out_name, t)
        except MissingParameter as missing:
            self._report_missing(missing.param, None)
            return None
        except ValueError as exc:
            self.problems.append(f"parameters: {exc} (tensor {out_name})")
            return None
        for p in self.method.model_params:
            values = []
            for source, tin in members:
                try:
                    values.append(resolve_parameter(p, [source.parameters, sl.parameters, self.config.parameters], tin.name, t))
                except MissingParameter:
                    self._report_missing(p.name, self.models[source.model].name)
                    return None
                except ValueError as exc:
                    self.problems.append(f"model '{self.models[source.model].name}': parameter '{p.name}': {exc}")
                    return None
            kwargs[p.arg] = values
        if self.method.check is not None:
            problem = self.method.check(kwargs)
            if problem and problem not in self._checked_problems:
                self._checked_problems.add(problem)
                self.problems.append(f"merge_method {self.method.name}: {problem} (first at tensor {out_name})")
            if problem:
                return None
        return kwargs

    def _report_missing(self, param: str, model: str | None) -> None:
        key = (param, model or "")
        if key in self._missing_reported:
            return
        self._missing_reported.add(key)
        if model is None:
            self.problems.append(f"merge_method {self.method.name} needs parameter '{param}' (set it under 'parameters:')")
        else:
            self.problems.append(f"merge_method {self.method.name} needs parameter '{param}' for model '{model}'")

    # -- output config -------------------------------------------------------------------------------
    def _output_config(self, donor: int, slices: list[_Slice], out_layers: int) -> dict[str, Any]:
        config = dict(self.models[donor].config)
        donor_layers = self.layouts[donor].num_layers
        if out_layers != donor_layers and donor_layers:
            config = with_layer_count(config, donor_layers, out_layers)
            config = remap_per_layer_lists(config, donor_layers, self._layer_origins(slices, donor))
        dtypes = {t.output.dtype for t in self.tasks if not t.copy_only}
        if len(dtypes) == 1:
            name = str(next(iter(dtypes))).removeprefix("torch.")
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for key in keys:
                config[key] = name
        config.pop("_name_or_path", None)
        if self.vocabulary is not None and self.vocabulary.remap:
            rows = self.vocabulary.num_rows
            text = config.get("text_config")
            if "vocab_size" in config or not isinstance(text, dict):
                config["vocab_size"] = rows
            if isinstance(text, dict) and "vocab_size" in text:
                config["text_config"] = {**text, "vocab_size": rows}
        return config

    def _layer_origins(self, slices: list[_Slice], donor: int) -> list[int]:
        """For each output layer, the source layer index it is built from (for per-layer config lists)."""
        origins = []
        for sl in slices:
            src = sl.sources[sl.base if sl.base is not None else 0]
            origins.extend(range(src.start, src.end))
        return origins

