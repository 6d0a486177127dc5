"""Methods flagged `converts_inputs` take the models as read (bf16 here) and convert chunk by chunk: the
result must equal converting every model to the base's dtype first, bit for bit."""

import pytest
import torch

from mergesmith.methods import all_methods

PARAMS = {"weight": 0.6, "density": 0.4, "gamma": 0.02, "epsilon": 0.1, "select_topk": 0.5, "t": 0.3}
METHOD_PARAMS = {"ram": {"epsilon": 0.01}, "ramplus_tl": {"epsilon": 0.01}}  # RAM's epsilon is a magnitude floor
FLAGGED = sorted(spec.name for spec in all_methods() if spec.converts_inputs)


def test_the_streaming_methods_are_flagged():
    expected = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear", "sce", "model_stock", "slerp", "karcher", "ram", "ramplus_tl"}
    assert expected <= set(FLAGGED)


@pytest.mark.parametrize("name", FLAGGED)
@pytest.mark.parametrize("shape", [(700, 600), (37,)])
@pytest.mark.parametrize("stored, compute", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_narrower_inputs_give_the_converted_result(name, shape, stored, compute):
    spec = next(s for s in all_methods() if s.name == name)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g).to(stored)
    models = [(base.float() + 0.02 * torch.randn(shape, generator=g)).to(stored) for _ in range(3)]
    kwargs = {}
    for p in spec.params:
        value = METHOD_PARAMS.get(name, {}).get(p.name, PARAMS.get(p.name))
        if value is not None:
            kwargs[p.arg] = [value] * 3 if p.per_model else value

    models_used = models[: spec.max_models] if spec.max_models else models

    def run(tensors, base, **extra):
        if spec.random:
            extra["generator"] = torch.Generator().manual_seed(1)
        if spec.base != "ignored":
            extra["base"] = base
        return spec.func(tensors, **kwargs, **extra)

    as_read = run(models_used, base, compute_dtype=compute)
    converted = run([m.to(compute) for m in models_used], base.to(compute))
    assert as_read.dtype == compute
    assert torch.equal(as_read, converted)
    assert not torch.equal(as_read, base.to(compute))  # the merge did something
