"""Every registered method runs through the whole engine on tiny Llama models and the result loads in transformers.

The numeric checks of each method against its paper's formula live in tests/methods/; here the written
tensors are compared with a direct call of the method's function, which proves the plumbing (parameter
resolution, base handling, seeds, dtype) hands each method exactly what it should.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import transformers

import mergesmith
from fixtures import read_state
from mergesmith.methods.registry import all_methods

SAMPLE_VALUES = {"weight": 0.6, "density": 0.5, "t": 0.3, "gamma": 0.01, "epsilon": 0.1}


def _value(param):
    if param.name in SAMPLE_VALUES:
        return SAMPLE_VALUES[param.name]
    return 0.5 if param.type in (int, float) else param.default


def _config(spec, family):
    per_model = {p.name: _value(p) for p in spec.model_params if p.required}
    global_params = {p.name: _value(p) for p in spec.global_params if p.required}
    max_models = spec.max_models if spec.max_models is not None else 2
    count = max(spec.min_models, min(2, max_models))
    others = [family["math"], family["code"]][:count]
    config = {"merge_method": spec.name, "dtype": "float32"}
    if spec.base in ("required", "optional"):
        config["base_model"] = str(family["base"])
    if spec.name == "passthrough":
        config["slices"] = [{"sources": [{"model": str(others[0]), "layer_range": [0, 4]}]}]
    else:
        config["models"] = [{"model": str(m), **({"parameters": per_model} if per_model else {})} for m in others]
    if global_params:
        config["parameters"] = global_params
    return config, others


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_method_through_engine_matches_direct_call_and_loads(spec, llama_family, tmp_path):
    config, others = _config(spec, llama_family)
    mergesmith.merge(config, tmp_path / "out", random_seed=7)
    out = read_state(tmp_path / "out")
    inputs = [read_state(m) for m in others]
    base = read_state(llama_family["base"])
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.isfinite(out[name]).all(), name
        kwargs = {}
        for p in spec.params:
            value = _value(p) if p.required else p.default
            kwargs[p.arg] = [value] * len(inputs) if p.per_model else value
        if spec.base in ("required", "optional"):
            kwargs["base"] = base[name]
        if spec.random:
            kwargs["generator"] = torch.Generator().manual_seed(zlib.crc32(f"7:{name}".encode()))
        expected = spec.func([t[name] for t in inputs], **kwargs)
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6, msg=f"{spec.name} {name}")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
