"""The chunked selection pass (tensors larger than one streaming chunk) against the whole-tensor reference.

Quantized deltas (as bf16 fine-tunes give: many entries share each magnitude) put a large block of ties at
the threshold, spanning chunk boundaries, so the single-value-window path and the tie cut-off position are
exercised; continuous deltas exercise the gathered-window path."""

import numpy as np
import pytest

import _tv_ref as ref

SHAPE = (800, 700)  # 560,000 entries: three chunks of 2^18


def quantized_finetunes(seed, n, step=1 / 64):
    r = np.random.default_rng(seed)
    base = r.normal(size=SHAPE)
    return base, [base + np.round(r.normal(size=SHAPE) * 3) * step for _ in range(n)]


@pytest.mark.parametrize("data", ["quantized", "continuous"])
@pytest.mark.parametrize("rescale", [False, True])
def test_ties(data, rescale):
    base, models = quantized_finetunes(1, 2) if data == "quantized" else ref.finetunes(1, SHAPE, 2)
    density = [0.3, 0.55]
    out = ref.call("ties", base, models, weight=[1, 0.5], density=density, rescale=rescale)
    trim = (lambda x, i: ref.rescale(x, ref.magnitude(x, density[i]))) if rescale else (lambda x, i: ref.magnitude(x, density[i]))
    np.testing.assert_allclose(out, ref.gta(base, models, [1, 0.5], trim, "sum", True), atol=1e-12)


@pytest.mark.parametrize("data", ["quantized", "continuous"])
def test_breadcrumbs(data):
    base, models = quantized_finetunes(2, 2) if data == "quantized" else ref.finetunes(2, SHAPE, 2)
    density, gamma = [0.5, 0.8], [0.05, 0.1]
    out = ref.call("breadcrumbs", base, models, weight=[1, 1], density=density, gamma=gamma)
    exp = ref.gta(base, models, [1, 1], lambda x, i: ref.outliers(x, density[i], gamma[i]), None, False)
    np.testing.assert_allclose(out, exp, atol=1e-12)


def test_quantized_deltas_do_tie_at_the_threshold():
    # guard for the test above: the threshold really falls inside a block of equal magnitudes
    base, models = quantized_finetunes(1, 1)
    mags = np.sort(np.abs(models[0] - base).ravel())[::-1]
    k = int(0.3 * mags.size)
    assert mags[k - 1] == mags[k] and (mags == mags[k - 1]).sum() > 10_000


@pytest.mark.parametrize("tied", [1000, 1 << 22])  # a window around the threshold; a window of one value
def test_counts_stay_exact_past_float32_integers(tied):
    # more than 2^24 entries above the threshold: counting them in float32 would round, and the kept tied
    # entries would end a few positions early or late
    import torch

    from mergesmith.methods._sparsify import CHUNK, TaskVector, select_top

    g = torch.Generator().manual_seed(0)
    above = (1 << 24) + (1 << 22) + 3
    mags = torch.cat([2 + torch.rand(above, generator=g), torch.full((tied,), 1.0), 0.5 * torch.rand(1 << 20, generator=g)])
    mags[::7] *= -1  # signs must not matter
    k = above + 501
    (cut,) = select_top(TaskVector(mags, torch.zeros_like(mags)), [k], CHUNK)
    assert cut.threshold == 1.0 and cut.tie_end == above + 501


@pytest.mark.parametrize("data", ["quantized", "continuous"])
@pytest.mark.parametrize("models", [2, 3])
def test_sce_selection_over_chunks(data, models):
    # SCE selects on its variance tensor with the chunked pass: the same entries as the stable-sort reference
    base, tuned = quantized_finetunes(3, models) if data == "quantized" else ref.finetunes(3, SHAPE, models)
    out = ref.call("sce", base, tuned, select_topk=0.4)
    import torch

    tv = np.stack([m - base for m in tuned])
    if models == 2:  # the variance of two is (m1 - m2)^2 / 4: ranked by the difference, rounded once
        var = np.abs(tuned[0] - tuned[1]).ravel()
    else:
        var = torch.var(torch.tensor(tv), dim=0, unbiased=False).numpy().ravel()
    k = int(np.count_nonzero(var) * 0.4)
    mask = np.zeros(var.size, bool)
    mask[np.argsort(-var, kind="stable")[:k]] = True
    kept = (tv * mask.reshape(SHAPE) != 0).any(axis=0)
    assert ((out - base) != 0).sum() <= kept.sum()
    assert not ((out - base) != 0)[~kept].any()  # nothing outside the reference selection moves
    if data == "quantized":
        ordered = np.sort(var)[::-1]
        assert ordered[k - 1] == ordered[k]  # the threshold falls inside a block of equal variances


def test_float64_threshold_of_a_single_value_window_is_not_rounded_to_float32():
    # magnitudes that are multiples of 1/3 in float64 (no float32 holds them): the window of one value must
    # keep its float64 threshold, or the Cut compares against a rounded one and keeps the wrong entries
    base = np.zeros(SHAPE)  # task vectors exactly k/3 (a nonzero base would round them apart)
    models = [np.round(np.random.default_rng(4).normal(size=SHAPE) * 3) / 3]
    density = [0.5]  # the 50% largest end inside the block of magnitude 2/3
    mags = np.sort(np.abs(models[0] - base).ravel())[::-1]
    assert mags[int(0.5 * mags.size) - 1] == 2 / 3 and float(np.float32(2 / 3)) != 2 / 3
    out = ref.call("ties", base, models, weight=[1], density=density)
    np.testing.assert_allclose(out, ref.gta(base, models, [1], lambda x, i: ref.magnitude(x, density[i]), "sum", True), atol=1e-12)


def _fraction_reference(values, fraction):
    """Positions of the int(fraction * non-zero count) largest magnitudes, ties to the earlier position."""
    mags = np.abs(values.ravel())
    k = int(np.count_nonzero(mags) * fraction)
    kept = np.zeros(mags.size, bool)
    kept[np.argsort(-mags, kind="stable")[:k]] = True
    return kept


def _fraction_kept(values, fraction):
    import torch

    from mergesmith.methods._sparsify import CHUNK, TaskVector, select_top_fraction

    t = torch.tensor(values.ravel())
    cut = select_top_fraction(TaskVector(t, torch.zeros_like(t)), fraction, CHUNK)
    member = cut.mask_into(t.abs(), 0, torch.empty_like(t))
    return np.ones(t.numel(), bool) if member is None else member.numpy() > 0


@pytest.mark.parametrize("data", ["quantized", "continuous", "hidden_zeros"])
@pytest.mark.parametrize("fraction", [0.5, 0.03, 0.97])
def test_top_fraction_of_nonzero_in_one_pass(data, fraction):
    # the non-zero count is estimated from the strided sample and counted exactly in the same pass; the cut
    # must be exact whatever the estimate, including zeros placed exactly where the sample does not look
    from mergesmith.methods._sparsify import _sample_step

    r = np.random.default_rng(5)
    n = SHAPE[0] * SHAPE[1]
    if data == "quantized":
        values = np.round(r.normal(size=n) * 3) / 64
    elif data == "continuous":
        values = r.normal(size=n) * (r.random(n) < 0.7)
    else:  # the sample sees no zero while 60% of the tensor is zero
        values = r.normal(size=n) + 5
        off_sample = np.ones(n, bool)
        off_sample[:: _sample_step(n)] = False
        values[off_sample & (r.random(n) < 0.6 / (1 - 1 / _sample_step(n)))] = 0
    np.testing.assert_array_equal(_fraction_kept(values, fraction), _fraction_reference(values, fraction))


def test_kth_smallest_is_kthvalues_value():
    # numpy's partition on CPU float32/float64, torch's kthvalue elsewhere: the same order statistic
    import torch

    from mergesmith.methods._sparsify import kth_smallest

    g = torch.Generator().manual_seed(6)
    tied = torch.round(torch.rand(50_001, generator=g) * 40)  # many equal values
    for values in (torch.rand(4097, generator=g), tied, tied.double(), tied.to(torch.bfloat16), tied[::3]):
        for rank in (1, 2, values.numel() // 3, values.numel() - 1, values.numel()):
            got = kth_smallest(values, rank)
            assert got.dtype == values.dtype and got.dim() == 0
            assert torch.equal(got, torch.kthvalue(values, rank).values)


@pytest.mark.parametrize("dtype", ["float32", "float64"])  # the compiled scan; torch's
def test_a_window_mostly_one_value_is_split_around_it(dtype, monkeypatch):
    # 60% of the magnitudes are exactly 1.0, the rest spread over (0.8, 1.2); the window [0.99, 1.01] (fixed
    # here instead of drawn from the sample) is mostly 1.0, so it is scanned as (1.0, 1.01], [1.0, 1.0] and
    # [0.99, 1.0): the k-th largest in each part, and outside the window, must give the whole-tensor cut
    import torch

    from mergesmith.methods import _sparsify

    scanned = []
    split_at_mode = _sparsify._split_at_mode
    monkeypatch.setattr(_sparsify, "_split_at_mode", lambda s, w: scanned.append(list(split_at_mode(s, w)[0])) or split_at_mode(s, w))
    monkeypatch.setattr(_sparsify, "_windows", lambda sample, n, ks, widen=1.0: [
        (torch.tensor(0.99, dtype=sample.dtype), torch.tensor(1.01, dtype=sample.dtype))] * len(ks))
    g = torch.Generator().manual_seed(2)
    n = 600_000
    mags = torch.where(torch.rand(n, generator=g) < 0.6, torch.tensor(1.0), 0.8 + 0.4 * torch.rand(n, generator=g))
    mags = mags.to(getattr(torch, dtype))
    tv = _sparsify.TaskVector(mags, torch.zeros_like(mags))
    above, tied = int((mags > 1).sum()), int((mags == 1).sum())
    inside = [above - 100, above - 1, above + 1, above + tied // 2, above + tied, above + tied + 1, above + tied + 100]
    outside = [above - 20_000, above + tied + 20_000]  # the whole-tensor fallback
    expected = {k: _sparsify.cut_from_values(mags.abs(), k) for k in inside + outside}
    whole = []
    cut_from_values = _sparsify.cut_from_values
    monkeypatch.setattr(_sparsify, "cut_from_values", lambda *a: whole.append(1) or cut_from_values(*a))
    for k in inside + outside:
        scanned.clear()
        whole.clear()
        (cut,) = _sparsify.select_top(tv, [k], _sparsify.CHUNK)
        assert [part for _, part in scanned[0]] == ["above", "tied", "below"]
        assert (cut.threshold, cut.tie_end) == (expected[k].threshold, expected[k].tie_end), k
        assert len(whole) == (k in outside), k  # a k inside the window is cut by its part
