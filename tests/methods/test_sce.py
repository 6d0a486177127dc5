import numpy as np
import pytest
import torch

from mergesmith.methods import get_method

import _tv_ref as ref

sce = get_method("sce").func


def reference(base, models, topk, consensus="sum", energy_floor=1e-6):
    tv = np.stack([m - base for m in models])
    if topk < 1 and len(models) == 2:
        # the variance of two models is (m1 - m2)^2 / 4: ranked by their difference, rounded once
        var = np.abs(models[0] - models[1]).ravel()
    elif topk < 1:
        # torch.var is mergekit's definition; its float64 Welford rounding decides ties that numpy's
        # two-pass formula would split differently on quantized deltas
        var = torch.var(torch.tensor(tv), dim=0, unbiased=False).numpy().ravel()
    if topk < 1:
        k = int(np.count_nonzero(var) * topk) if topk > 0 else 0
        mask = np.zeros(var.size, bool)
        mask[np.argsort(-var, kind="stable")[:k]] = True
        tv = tv * mask.reshape(base.shape)
    energy = (tv ** 2).reshape(len(models), -1).mean(axis=1)
    uniform = energy.sum() == 0 or energy.sum() < energy_floor
    eta = np.full(len(models), 1 / len(models)) if uniform else energy / energy.sum()
    votes = tv.sum(0) if consensus == "sum" else np.sign(tv).sum(0)
    agree = np.sign(tv) == np.where(votes >= 0, 1.0, -1.0)
    w = eta.reshape((-1,) + (1,) * base.ndim) * agree
    return base + (tv * w).sum(0) / np.maximum(w.sum(0), 1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("shape", [(10, 8), (60,)])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_matches_reference(topk, shape, consensus):
    base, models = ref.finetunes(1, shape, 3)
    out = ref.call("sce", base, models, select_topk=topk, consensus_method=consensus)
    np.testing.assert_allclose(out, reference(base, models, topk, consensus), atol=1e-12)


def test_large_and_small_scale_deltas():
    base, models = ref.finetunes(2, (300, 230), 2)
    np.testing.assert_allclose(ref.call("sce", base, models, select_topk=0.3), reference(base, models, 0.3), atol=1e-12)
    # tiny task vectors (mean square ~1e-10): uniform weights by default, as in mergekit; energy-weighted with
    # energy_floor 0; the two really differ here
    base, models = ref.finetunes(3, (10, 10), 2, scale=1e-5)
    models[1] = base + 3 * (models[1] - base)
    default = ref.call("sce", base, models, select_topk=1.0)
    weighted = ref.call("sce", base, models, select_topk=1.0, energy_floor=0.0)
    np.testing.assert_allclose(default, reference(base, models, 1.0), atol=1e-15)
    np.testing.assert_allclose(weighted, reference(base, models, 1.0, energy_floor=0.0), atol=1e-15)
    assert np.abs(default - weighted).max() > 1e-7


def test_edge_cases():
    base, models = ref.finetunes(4, (6, 6), 2)
    np.testing.assert_array_equal(ref.call("sce", base, [base, base], select_topk=0.5), base)
    np.testing.assert_allclose(ref.call("sce", base, [models[0]] * 3, select_topk=1.0), models[0], atol=1e-12)
    # identical models have zero variance everywhere, so a fraction < 1 of the non-zero-variance entries is
    # nothing: the base comes back (mergekit's semantics, kept)
    np.testing.assert_array_equal(ref.call("sce", base, [models[0]] * 3, select_topk=0.5), base)
    z = torch.zeros(3, 3)
    out = sce([z, z], base=z, select_topk=0.5)
    assert torch.equal(out, z)
    assert torch.equal(sce([], base=z), z)


def test_chunked_passes_match_reference_with_ties_across_chunks():
    # 600 x 700 entries span two streaming chunks; quantized deltas make many variances equal, so the
    # earliest-position tie-break has to carry across chunk boundaries
    r = np.random.default_rng(7)
    base = r.normal(size=(600, 700))
    models = [base + np.round(r.normal(size=base.shape) * 2) / 8 for _ in range(3)]
    for topk in (0.5, 0.37):
        np.testing.assert_allclose(ref.call("sce", base, models, select_topk=topk), reference(base, models, topk), atol=1e-12)


def test_variance_equals_torch_var_bit_for_bit():
    from mergesmith.methods._sparsify import TaskVector, variance_across

    g = torch.Generator().manual_seed(3)
    base = torch.randn(300_000, generator=g)
    models = [base + 1e-3 * torch.randn(300_000, generator=g) for _ in range(3)]
    expected = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False)
    assert torch.equal(variance_across([TaskVector(m, base) for m in models], 1 << 16), expected)


@pytest.mark.parametrize("count,dtype", [(3, torch.bfloat16), (3, torch.float32), (4, torch.float32), (4, torch.bfloat16),
                                         (5, torch.bfloat16), (5, torch.float32), (6, torch.bfloat16), (7, torch.float32),
                                         (13, torch.bfloat16)])
def test_compiled_variance_of_three_or_more_equals_the_torch_loop_bit_for_bit(count, dtype, monkeypatch):
    # `_compiled_variance` (three to twelve: the loop generated for the count; more: rows; float32 task vectors
    # on CPU): inputs as stored (bf16 or float32),
    # magnitudes far apart, zeros, equal entries, a length that is a multiple of neither the chunk nor the
    # loop's block
    from mergesmith.methods import _kernels
    from mergesmith.methods._sparsify import TaskVector, variance_across

    if not _kernels.available():
        pytest.skip("numba not available")
    g = torch.Generator().manual_seed(10 + count)
    n = 70_001
    base = torch.randn(n, generator=g).to(dtype)
    models = []
    for _ in range(count):
        scale = torch.exp(torch.randn(n, generator=g) * 8).clamp(max=1e20)
        models.append((base.float() + torch.randn(n, generator=g) * scale).to(dtype))
    models[0][::5] = base[::5]
    models[1][::7] = models[0][::7]
    tvs = [TaskVector(m, base, torch.float32) for m in models]
    assert all(tv.compiled() for tv in tvs)
    compiled = variance_across(tvs, 1 << 14)
    expected = torch.var(torch.stack([m.float() - base.float() for m in models]), dim=0, unbiased=False)
    assert torch.equal(compiled, expected)
    monkeypatch.setattr(TaskVector, "compiled", lambda self: False)
    assert torch.equal(variance_across(tvs, 1 << 14), compiled)


def test_variance_of_two_equals_torch_var_bit_for_bit_at_extreme_scales():
    # the two-model path (its own sequence of float64 operations): magnitudes 1e-30 to 1e30 apart, zeros,
    # equal entries, float32 task vectors
    from mergesmith.methods._sparsify import TaskVector, variance_across

    g = torch.Generator().manual_seed(4)
    n = 300_000
    a = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 20).clamp(max=1e30)
    b = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 20).clamp(max=1e30)
    a[::5], b[::7] = 0, 0
    b[::11] = a[::11]
    zero = torch.zeros(n)
    expected = torch.var(torch.stack([a, b]), dim=0, unbiased=False)
    assert torch.equal(variance_across([TaskVector(a, zero), TaskVector(b, zero)], 1 << 16), expected)


@pytest.mark.parametrize("fraction, members", [(0.5, True), (0.999999, True), (1e-4, True), (1e-6, False), (0.0, False)])
def test_the_compiled_variance_mask_equals_the_torch_one(fraction, members, monkeypatch):
    # `_compiled_members` against the torch loop: ties at the cut split by position across chunks (integer
    # task vectors), NaN variances (never members of a cut), a cut near all, near none and none (k = 0)
    from mergesmith.methods import _kernels
    from mergesmith.methods._sparsify import TaskVector
    from mergesmith.methods.sce import _top_variance

    if not _kernels.available():
        pytest.skip("numba not available")
    g = torch.Generator().manual_seed(12)
    n = 200_003
    base = torch.zeros(n)
    models = [torch.randint(-20, 20, (n,), generator=g).float() for _ in range(3)]
    models[1][::997] = float("nan")
    tvs = [TaskVector(m, base, torch.float32) for m in models]
    compiled = _top_variance(tvs, fraction, 1 << 14, "position")
    monkeypatch.setattr(TaskVector, "compiled", lambda self: False)
    reference = _top_variance(tvs, fraction, 1 << 14, "position")
    assert compiled.dtype == reference.dtype == torch.uint8
    assert torch.equal(compiled, reference) and (0 < int(compiled.sum()) < n) == members


def test_two_models_select_by_their_difference_exactly_as_by_the_variance():
    # integer task vectors: torch.var is exact, and many entries tie. Two models are selected by |m1 - m2|
    # (streamed, no variance tensor); the kept set, ties by position across chunks included, must be the
    # one the variance gives
    r = np.random.default_rng(11)
    base = r.integers(-50, 50, size=(800, 700)).astype(np.float64)
    models = [base + r.integers(-6, 7, size=base.shape) for _ in range(2)]
    tv = np.stack([m - base for m in models])
    var = torch.var(torch.tensor(tv), dim=0, unbiased=False).numpy().ravel()
    k = int(np.count_nonzero(var) * 0.37)
    kept = np.zeros(var.size, bool)
    kept[np.argsort(-var, kind="stable")[:k]] = True
    assert np.sort(var)[::-1][k - 1] == np.sort(var)[::-1][k]  # the cut falls inside a block of ties
    out = ref.call("sce", base, models, select_topk=0.37)
    masked = tv * kept.reshape(base.shape)
    np.testing.assert_allclose(out, reference(base, [base + d for d in masked], 1.0), atol=1e-12)
