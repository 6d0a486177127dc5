"""Every method computed in a 16-bit dtype (`--compute-dtype bfloat16`, mergekit's arithmetic on bf16 models;
float16 likewise), called the way the executor calls it: methods flagged `converts_inputs` get the models
as read plus `compute_dtype`, the others get them converted. The result must come back in that dtype,
finite, and close to the float32 merge: 16-bit rounding moves a merge by a few of its ulps, not more
(selecting methods may flip a few entries at their thresholds; random ones draw other masks, so only
their dtype and finiteness are checked). Arcee Fusion's picks follow row KL divergences of near-uniform
softmaxes, which 16-bit rounding swamps (mergekit's too): its result must still take every entry from the
base or the model."""

import pytest
import torch

from mergesmith.methods import all_methods

PARAMS = {"weight": 0.6, "density": 0.4, "gamma": 0.02, "epsilon": 0.1, "select_topk": 0.5, "t": 0.3}
METHOD_PARAMS = {"ram": {"epsilon": 0.01}, "ramplus_tl": {"epsilon": 0.01}}  # RAM's epsilon is a magnitude floor
METHODS = sorted(spec.name for spec in all_methods())


def _kwargs(spec, n):
    kwargs = {}
    for p in spec.params:
        value = METHOD_PARAMS.get(spec.name, {}).get(p.name, PARAMS.get(p.name))
        if value is not None:
            kwargs[p.arg] = [value] * n if p.per_model else value
    return kwargs


def _merge(spec, models, base, dtype):
    kwargs = _kwargs(spec, len(models))
    if spec.random:
        kwargs["generator"] = torch.Generator().manual_seed(1)
    if spec.converts_inputs:
        kwargs["compute_dtype"] = dtype
    else:
        models, base = [m.to(dtype) for m in models], base.to(dtype)
    if spec.base != "ignored":
        kwargs["base"] = base
    return spec.func(models, **kwargs)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(300, 700), (37,)])
def test_sixteen_bit_compute_runs_and_stays_near_float32(name, dtype, shape):
    spec = next(s for s in all_methods() if s.name == name)
    g = torch.Generator().manual_seed(3)
    base = (0.05 * torch.randn(shape, generator=g)).to(dtype)
    shared = 0.01 * torch.randn(shape, generator=g)
    count = min(2, spec.max_models or 2) if spec.min_models <= 2 else spec.min_models
    models = [(base.float() + shared + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)]

    narrow = _merge(spec, models, base, dtype)
    assert narrow.dtype == dtype and narrow.shape == base.shape
    assert bool(torch.isfinite(narrow).all())
    if spec.random:
        return
    if name == "arcee_fusion":
        assert bool(((narrow == base) | (narrow == models[0])).all())
        assert not torch.equal(narrow, base)
        return
    wide = _merge(spec, models, base, torch.float32)
    change = (wide - base.float()).norm()
    assert change > 0
    # a few ulps of the merge (bf16: 2^-8 relative) over its change from the base, with room for flipped picks
    assert (narrow.float() - wide).norm() <= 0.25 * change
