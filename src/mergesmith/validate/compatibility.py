"""Compare the input models' config.json fields that decide whether their weights can be merged.

Fields that shape tensors (hidden_size, intermediate_size, heads, head_dim, experts) must agree: one
problem line per field, naming each model's value. A different model_type is mergekit's "crime" (allowed
with --allow-crimes when the tensors match). Positional-encoding settings that change what the weights
mean (rope_theta, the rotary fraction) are problems too, overridable with --allow-crimes; context-length
settings (rope scaling, max_position_embeddings) and tied embeddings only warn, because the
output simply follows its donor and the tensor checks still apply.

Values are compared only where both configs set them (a missing key means the transformers default, and
the tensor shape checks of the planner catch what that hides). Vision-language models are compared on
their `text_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mergesmith.errors import CompatibilityError
from mergesmith.io.source_model import SourceModel

# canonical name -> config.json spellings across architectures
SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"),
    "num_attention_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "num_local_experts": ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
    "moe_intermediate_size": ("moe_intermediate_size",),
}
MEANING_FIELDS: dict[str, tuple[str, ...]] = {
    "rope_theta": ("rope_theta", "rotary_emb_base"),
    "partial_rotary_factor": ("partial_rotary_factor", "rotary_pct"),
    "hidden_act": ("hidden_act", "activation_function"),
}
WARNING_FIELDS: dict[str, tuple[str, ...]] = {
    "rope_scaling": ("rope_scaling",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "tie_word_embeddings": ("tie_word_embeddings",),
}


@dataclass
class CompatibilityReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _holder(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text = config.get("text_config")
    return ("text_config.", text) if isinstance(text, dict) else ("", config)


def _rope_parameters(holder: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 folds rope_theta and rope_scaling into `rope_parameters`; unfold it."""
    params = holder.get("rope_parameters")
    return dict(params) if isinstance(params, dict) else {}


def field_value(config: dict[str, Any], canonical: str, spellings: Sequence[str]) -> tuple[str, Any] | None:
    """(the key as written, its value) for a canonical field, or None when the config does not set it."""
    prefix, holder = _holder(config)
    rope = _rope_parameters(holder)
    if canonical == "rope_theta" and rope.get("rope_theta") is not None:
        return f"{prefix}rope_parameters.rope_theta", rope["rope_theta"]
    if canonical == "partial_rotary_factor" and rope.get("partial_rotary_factor") is not None:
        return f"{prefix}rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"]
    if canonical == "rope_scaling":
        scaling = holder.get("rope_scaling")
        if not isinstance(scaling, dict):
            scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        scaling = dict(scaling)
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        if scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}:
            scaling = None  # no scaling, stated or not, compares as "none"
        return f"{prefix}rope_scaling", scaling
    for key in spellings:
        if holder.get(key) is not None:
            return prefix + key, holder[key]
    return None


def _describe(field_name: str, values: list[tuple[str, Any]]) -> str:
    groups: dict[str, list[str]] = {}
    for model, value in values:
        groups.setdefault(_show(value), []).append(f"'{model}'")
    return f"{field_name}: " + ", ".join(f"{value} in {' and '.join(models)}" for value, models in groups.items())


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(value.items())) + "}"
    return "none" if value is None else str(value)


def config_differences(models: Sequence[SourceModel], fields: dict[str, tuple[str, ...]]) -> list[str]:
    """One line per field on which models that set it disagree, e.g. "hidden_size: 4096 in 'a', 5120 in 'b'"."""
    lines = []
    for canonical, spellings in fields.items():
        found = [(m.name, field_value(m.config, canonical, spellings)) for m in models]
        present = [(name, kv) for name, kv in found if kv is not None]
        if len(present) < 2:
            continue
        values = [(name, kv[1]) for name, kv in present]
        if len({_show(v) for _, v in values}) > 1:
            keys = dict.fromkeys(kv[0] for _, kv in present)
            lines.append(_describe("/".join(keys), values))
    return lines


def check_compatibility(models: Sequence[SourceModel], *, allow_crimes: bool = False) -> list[str]:
    """Raise CompatibilityError listing every config difference that forbids the merge; return the warnings."""
    report = compatibility_report(models, allow_crimes=allow_crimes)
    if report.problems:
        raise CompatibilityError(report.problems)
    return report.warnings


def compatibility_report(models: Sequence[SourceModel], *, allow_crimes: bool = False) -> CompatibilityReport:
    report = CompatibilityReport()
    if len(models) < 2:
        return report
    report.problems.extend(f"{line} (tensor shapes differ; these models cannot be merged)" for line in config_differences(models, SHAPE_FIELDS))
    crimes = config_differences(models, MEANING_FIELDS)
    architectures = {",".join(m.config.get("architectures") or ["?"]) for m in models}
    if len(architectures) == 1:  # a different class is reported by the planner, which also names model_type's cause
        crimes = config_differences(models, {"model_type": ("model_type",)}) + crimes
    for line in crimes:
        if allow_crimes:
            report.warnings.append(f"{line} (merged anyway: --allow-crimes)")
        else:
            report.problems.append(f"{line}; pass --allow-crimes to merge them anyway")
    for line in config_differences(models, WARNING_FIELDS):
        report.warnings.append(f"{line} (the output config follows the base model, or the first model without one)")
    return report
