"""Parameter settings resolve as in mergekit: gradients, filters, precedence; configs load strictly."""

from __future__ import annotations

import pytest

from mergesmith.config import load_config
from mergesmith.config.schema import ConditionalParameter
from mergesmith.errors import ConfigError
from mergesmith.methods.registry import Param
from mergesmith.plan.parameters import MissingParameter, evaluate_setting, resolve_parameter


@pytest.mark.parametrize(
    "points, t, expected",
    [([0.0, 1.0], 0.0, 0.0), ([0.0, 1.0], 1.0, 1.0), ([0.0, 1.0], 0.25, 0.25), ([0, 0.5, 0.3, 0.7, 1], 0.5, 0.3),
     ([0, 0.5, 0.3, 0.7, 1], 0.375, 0.4), ([1.0, 3.0, 2.0], 0.75, 2.5)],
)  # fmt: skip
def test_numeric_gradient_is_piecewise_linear(points, t, expected):
    assert evaluate_setting(points, "x", t) == pytest.approx(expected)


def test_non_numeric_list_selects_an_element():
    assert evaluate_setting(["a", "b", "c"], "x", 0.6) == "b"
    assert evaluate_setting([True, False], "x", 1.0) is False


def test_first_matching_filter_wins_and_catch_all():
    setting = [ConditionalParameter(filter="self_attn", value=[0, 1]), ConditionalParameter(filter="mlp", value=0.7),
               ConditionalParameter(value=0.5)]  # fmt: skip
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.7
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.5
    assert evaluate_setting([ConditionalParameter(filter="mlp", value=1)], "model.norm.weight", 0) is None


def test_precedence_falls_through_scopes_where_no_filter_matches():
    weight = Param("weight", float, per_model=True)
    source = {"weight": [ConditionalParameter(filter="mlp", value=0.1)]}
    slice_level = {"weight": 0.2}
    top = {"weight": 0.3}
    assert resolve_parameter(weight, [source, slice_level, top], "layers.0.mlp.up", 0) == 0.1
    assert resolve_parameter(weight, [source, slice_level, top], "layers.0.self_attn.q", 0) == 0.2
    assert resolve_parameter(weight, [None, None, top], "x", 0) == 0.3
    with pytest.raises(MissingParameter):
        resolve_parameter(weight, [None, {}, None], "x", 0)
    assert resolve_parameter(Param("normalize", bool, default=True), [None], "x", 0) is True


def test_values_are_coerced_and_bad_values_rejected():
    assert resolve_parameter(Param("normalize", bool, default=True), [{"normalize": "false"}], "x", 0) is False
    assert resolve_parameter(Param("max_iter", int, default=10), [{"max_iter": 5.0}], "x", 0) == 5
    with pytest.raises(ValueError, match="expected a number"):
        resolve_parameter(Param("weight", float), [{"weight": "heavy"}], "x", 0)


def test_mergekit_config_forms_load_unchanged():
    text = """
slices:
  - sources:
      - model: org/a
        layer_range: [0, 32]
      - model: org/b@v2
        layer_range: [0, 32]
merge_method: slerp
base_model: org/a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
out_dtype: float16
tokenizer_source: base
chat_template: chatml
"""
    config, _ = load_config(text)
    assert config.merge_method == "slerp" and config.slices[0].sources[1].model == "org/b@v2"
    assert config.referenced_models() == ["org/a", "org/b@v2"]
    assert config.parameters["t"][2].value == 0.5 and config.parameters["t"][2].filter is None
    tokenizer_block = "merge_method: linear\nmodels: [{model: a}]\ntokenizer:\n  source: union\n  pad_to_multiple_of: 64\n  tokens:\n    <|im_start|>: {source: {kind: model_token, model: a, token: <s>}}\n    <x>: {source: {kind: zero}, force: true}\n"
    config, _ = load_config(tokenizer_block)
    assert config.tokenizer.tokens["<x>"].force is True


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n", "exactly one of 'models', 'slices'"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {filtr: mlp, value: 1}}}]\n", "unknown key 'filtr'"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: mlp}]}}]\n", "needs a 'value'"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: base\ntokenizer: {source: base}\n", "not both"),
        ("models: [{model: a}]\n", "missing required key 'merge_method'"),
        ("merge_method: linear\nslices: [{sources: [{model: a, layer_rnage: [0, 2]}]}]\n", "did you mean 'layer_range'"),
    ],
)
def test_schema_errors_are_specific(text, message):
    with pytest.raises(ConfigError) as info:
        load_config(text)
    assert any(message in p for p in info.value.problems), info.value.problems
