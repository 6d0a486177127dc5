import numpy as np
import torch

from mergesmith.methods import get_method

from _methods_ref import finetunes, rng, t

arcee_fusion = get_method("arcee_fusion").func


def reference(base, other):
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p = softmax(other) + 1e-8
    q = softmax(base) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    imp = np.abs(other - base) * kl
    s = np.sort(imp.ravel())
    k = s.size - 1
    q1, med, q3 = s[k // 4], s[k // 2], s[(3 * k) // 4]
    mask = imp >= med + 1.5 * (q3 - q1)
    return np.where(mask, other, base)


def test_matches_reference():
    for shape in [(8, 16), (101,), (3, 4, 10)]:
        base, (m,) = finetunes(len(shape), shape, 1, scale=0.5)
        out = arcee_fusion([t(m)], base=t(base))
        np.testing.assert_allclose(out.numpy(), reference(base, m), atol=1e-14)


def test_keeps_only_outliers():
    r = rng(4)
    base = r.normal(size=(20, 20))
    other = base + 1e-3 * r.normal(size=(20, 20))
    other[3, 5] += 5.0  # one big change in a row whose distribution it shifts
    out = arcee_fusion([t(other)], base=t(base)).numpy()
    assert out[3, 5] == other[3, 5]
    assert (out == base).mean() > 0.8


def test_identical_and_zeros():
    base, _ = finetunes(5, (6, 6), 1)
    assert torch.equal(arcee_fusion([t(base)], base=t(base)), t(base))
    z = torch.zeros(6, 6)
    out = arcee_fusion([z], base=z)
    assert torch.equal(out, z)


def test_float32_large_uses_exact_quartiles():
    # n > 10^6: mergekit would sample; we are exact and deterministic
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 1000, generator=g)
    other = base + 0.1 * torch.randn(1100, 1000, generator=g)
    a = arcee_fusion([other], base=base)
    b = arcee_fusion([other], base=base)
    assert torch.equal(a, b)


def test_quartiles_of_large_tensors_are_the_exact_order_statistics():
    # past SELECT_FROM the quartiles come from the chunked selection: the same values as a full sort, also
    # when a quarter of the importances are 0 and the rest are heavily tied (a few hundred distinct values)
    from mergesmith.methods.arcee_fusion import SELECT_FROM, quartiles

    g = torch.Generator().manual_seed(1)
    n = 4 * SELECT_FROM + 12_345  # five selection chunks
    continuous = torch.rand(n, generator=g)
    tied = torch.round(torch.rand(n, generator=g) * 300) / 300
    tied[torch.randperm(n, generator=g)[: n // 4 + 7]] = 0
    signed = continuous.clone()
    signed[: n // 3] *= -1e-9  # rows whose KL rounded below 0: negative importances (np.partition's path)
    for values in (continuous, tied, tied.double(), signed):
        s = torch.sort(values).values
        last = n - 1
        expected = (s[last // 4], s[last // 2], s[(3 * last) // 4])
        assert all(torch.equal(got, want) for got, want in zip(quartiles(values), expected))


def test_quartiles_of_tensors_past_mergekits_sample_size_are_exact_at_any_size():
    # mergekit samples 10^6 values past 10^6 (unseeded); an earlier mergesmith sampled 2^24 past 2^24. Both
    # moved the fence by sampling error; here a 2^24 + 4099 tensor (65 selection chunks) gets the exact ranks
    from mergesmith.methods.arcee_fusion import quartiles

    n = (1 << 24) + 4099
    values = torch.rand(n, generator=torch.Generator().manual_seed(5))
    last = n - 1
    ranks = [last // 4, last // 2, (3 * last) // 4]
    expected = torch.from_numpy(np.partition(values.numpy(), ranks)[ranks])
    got = quartiles(values)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_sixteen_bit_compute_keeps_mergekits_divergence_formula():
    # --compute-dtype bfloat16 is mergekit's arithmetic: the divergences are its formula evaluated in bf16
    # (softmax, + 1e-8, divide, log, multiply, sum), not the accurate float64 ones of float32 compute
    from mergesmith.methods.arcee_fusion import row_divergences

    g = torch.Generator().manual_seed(6)
    base = (torch.randn(40, 300, generator=g) * 0.02).to(torch.bfloat16)
    other = (base.float() + torch.randn(base.shape, generator=g) * 0.002).to(torch.bfloat16)
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    mergekits = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    assert torch.equal(row_divergences(other, base, torch.bfloat16), mergekits)
    accurate = row_divergences(other, base, torch.float32)
    assert not torch.equal(accurate.to(torch.bfloat16), mergekits)
