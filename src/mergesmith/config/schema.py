"""Pydantic models of the mergekit YAML schema.

Strict by design: an unknown key is an error (mergekit silently ignores many misspellings), reported by
`config.loader` with a suggestion. Field names match mergekit exactly so existing configs load unchanged.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator, model_validator
from typing_extensions import Annotated

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, List[Scalar]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalParameter(_Strict):
    """`- filter: self_attn` / `value: ...`: applies to tensors whose name contains `filter` (or all, when absent)."""

    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ConditionalParameter, List[ConditionalParameter], ScalarOrGradient]

_SETTING_FORMS = (
    "expected a value, a list of numbers (a gradient over the layers), "
    "or a list of {filter: <substring>, value: ...} entries"
)


def _check_scalar_or_gradient(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (bool, int, float, str)) for v in value):
        return value
    raise ValueError(_SETTING_FORMS)


def _check_setting(value: Any) -> ParameterSetting:
    """Normalise one parameter setting; a union in pydantic would report one error per alternative instead."""
    if isinstance(value, ConditionalParameter):
        return value
    if isinstance(value, dict):
        return _conditional(value)
    if isinstance(value, list) and value and all(isinstance(v, (dict, ConditionalParameter)) for v in value):
        return [v if isinstance(v, ConditionalParameter) else _conditional(v) for v in value]
    return _check_scalar_or_gradient(value)


def _conditional(entry: dict) -> ConditionalParameter:
    unknown = sorted(set(entry) - {"filter", "value"})
    if unknown:
        raise ValueError(f"unknown key '{unknown[0]}' in a filter entry (only 'filter' and 'value' are allowed)")
    if "value" not in entry:
        raise ValueError("a filter entry needs a 'value'")
    if entry.get("filter") is not None and not isinstance(entry["filter"], str):
        raise ValueError("'filter' must be a substring of tensor names")
    return ConditionalParameter(value=_check_scalar_or_gradient(entry["value"]), filter=entry.get("filter"))


def _check_parameters(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("'parameters' must be a mapping of parameter names to settings")
    checked = {}
    for name, setting in value.items():
        try:
            checked[str(name)] = _check_setting(setting)
        except ValueError as exc:
            raise ValueError(f"parameter '{name}': {exc}") from None
    return checked


Parameters = Annotated[Optional[Dict[str, Any]], BeforeValidator(_check_parameters)]


class InputModelDefinition(_Strict):
    model: str
    parameters: Parameters = None


class InputSliceDefinition(_Strict):
    model: str
    layer_range: Tuple[int, int]
    parameters: Parameters = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: Tuple[int, int]) -> Tuple[int, int]:
        start, end = value
        if start < 0 or end < start:
            raise ValueError(f"layer_range [{start}, {end}] must satisfy 0 <= start <= end (end is exclusive)")
        return value


class OutputSliceDefinition(_Strict):
    sources: List[InputSliceDefinition]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: Parameters = None

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, value: List[InputSliceDefinition]) -> List[InputSliceDefinition]:
        if not value:
            raise ValueError("a slice needs at least one source")
        return value


class TokenSourceModelToken(_Strict):
    """Take the embedding of `token` (or `token_id`) in `model`."""

    kind: Literal["model_token"]
    model: str
    token: Optional[str] = None
    token_id: Optional[int] = None

    @model_validator(mode="after")
    def _one_of_token_or_id(self) -> "TokenSourceModelToken":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class TokenSourceZero(_Strict):
    """An all-zero embedding row."""

    kind: Literal["zero"]


def _check_token_source(value: Any) -> Any:
    """Pick the token-source form by its `kind`, so an error names the one the user meant."""
    if value is None or isinstance(value, (str, TokenSourceZero, TokenSourceModelToken)):
        return value
    if isinstance(value, dict):
        kinds = {"zero": TokenSourceZero, "model_token": TokenSourceModelToken}
        if value.get("kind") not in kinds:
            raise ValueError(f"'kind' must be 'zero' or 'model_token', got {value.get('kind')!r}")
        unknown = sorted(set(value) - set(kinds[value["kind"]].model_fields))
        if unknown:
            raise ValueError(f"unknown key '{unknown[0]}' for kind {value['kind']}")
        if value["kind"] == "model_token":
            if "model" not in value:
                raise ValueError("kind model_token needs 'model'")
            if ("token" in value) == ("token_id" in value):
                raise ValueError("kind model_token needs exactly one of 'token' or 'token_id'")
            return TokenSourceModelToken(**value)
        return TokenSourceZero(**value)
    raise ValueError("expected a model name, {kind: zero} or {kind: model_token, model: ..., token: ...}")


class TokenEmbeddingConfig(_Strict):
    source: Annotated[Any, BeforeValidator(_check_token_source)] = None
    force: bool = False


class TokenizerConfig(_Strict):
    source: str = "union"
    tokens: Optional[Dict[str, TokenEmbeddingConfig]] = None
    pad_to_multiple_of: Optional[int] = None


class OutputModuleDefinition(_Strict):
    slices: Optional[List[OutputSliceDefinition]] = None
    models: Optional[List[InputModelDefinition]] = None
    parameters: Parameters = None


class MergeConfiguration(_Strict):
    merge_method: str
    slices: Optional[List[OutputSliceDefinition]] = None
    models: Optional[List[InputModelDefinition]] = None
    modules: Optional[Dict[str, OutputModuleDefinition]] = None
    parameters: Parameters = None
    base_model: Optional[str] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None

    @model_validator(mode="after")
    def _one_input_form(self) -> "MergeConfiguration":
        present = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(present) != 1:
            raise ValueError(
                "exactly one of 'models', 'slices' or 'modules' must be given"
                + (f" (found {', '.join(present)})" if present else "")
            )
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    def referenced_models(self) -> List[str]:
        """Every model named in the config, in order of first appearance (never a set: order is output order)."""
        seen: Dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def to_yaml_dict(self) -> Dict[str, Any]:
        return self.model_dump(exclude_none=True, mode="json")
