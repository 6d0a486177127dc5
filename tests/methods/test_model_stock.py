import numpy as np
import pytest
import torch

from mergesmith.methods import get_method

from _methods_ref import finetunes, rng, t

model_stock = get_method("model_stock").func


def reference(base, ms, rows=False):
    """Paper formula, explicit loops over pairs (and rows)."""
    n = len(ms)
    b2 = base.reshape(-1, base.shape[-1]) if rows and base.ndim > 1 else base.reshape(1, -1)
    w2 = [m.reshape(b2.shape) for m in ms]
    out = np.empty_like(b2)
    for r in range(b2.shape[0]):
        ds = [w[r] - b2[r] for w in w2]
        cs = []
        for i in range(n):
            for j in range(i + 1, n):
                cs.append(np.clip(ds[i] @ ds[j] / max(np.linalg.norm(ds[i]) * np.linalg.norm(ds[j]), 1e-6), -1, 1))
        c = float(np.mean(cs))
        tt = min(max(n * c / (1 + (n - 1) * c), 0.0), 1.0) if c > 0 else 0.0
        out[r] = tt * np.mean([w[r] for w in w2], axis=0) + (1 - tt) * b2[r]
    return out.reshape(base.shape)


def correlated(seed, shape, n):
    r = rng(seed)
    base = r.normal(size=shape)
    shared = r.normal(size=shape)
    return base, [base + 0.01 * (shared + r.normal(size=shape)) for _ in range(n)]


def test_whole_tensor_and_filter_wise():
    for n in (2, 3, 4):
        base, ms = correlated(n, (6, 8), n)
        out = model_stock([t(m) for m in ms], base=t(base))
        np.testing.assert_allclose(out.numpy(), reference(base, ms), atol=1e-12)
        out = model_stock([t(m) for m in ms], base=t(base), filter_wise=True)
        np.testing.assert_allclose(out.numpy(), reference(base, ms, rows=True), atol=1e-12)


def test_paper_ratio_for_known_angle():
    # two orthonormal-ish task vectors at 60 degrees: cos = 0.5, t = 2*0.5/1.5 = 2/3
    base = np.zeros(3)
    m1, m2 = np.array([1.0, 0, 0]), np.array([0.5, np.sqrt(3) / 2, 0])
    out = model_stock([t(m1), t(m2)], base=t(base)).numpy()
    np.testing.assert_allclose(out, (2 / 3) * (m1 + m2) / 2, atol=1e-12)


def test_negative_cosine_is_clamped_to_base():
    base, (m,) = finetunes(5, (10,), 1)
    opposite = 2 * base - m  # task vector exactly -delta
    out = model_stock([t(m), t(opposite)], base=t(base))
    assert torch.allclose(out, t(base))  # mergekit: t = 2c/(1+c) singular at c = -1
    r = rng(6)
    d = r.normal(size=10)
    near = [base + d, base - 0.9 * d + 0.1 * r.normal(size=10)]
    out = model_stock([t(x) for x in near], base=t(base))
    assert torch.allclose(out, t(base))


def test_identical_and_zeros_nan_free():
    base, ms = finetunes(7, (4, 4), 3)
    assert torch.allclose(model_stock([t(base)] * 3, base=t(base)), t(base))
    same = [t(ms[0])] * 2
    assert torch.allclose(model_stock(same, base=t(base)), t(ms[0]))  # cos 1 -> t 1
    z = torch.zeros(4, 4)
    assert torch.equal(model_stock([z, z], base=z, filter_wise=True), z)


def test_tensors_larger_than_a_chunk():
    # 700 x 600 entries: several streaming chunks, and row blocks for filter_wise
    base, ms = correlated(9, (700, 600), 3)
    out = model_stock([t(m) for m in ms], base=t(base))
    np.testing.assert_allclose(out.numpy(), reference(base, ms), atol=1e-12)
    out = model_stock([t(m) for m in ms], base=t(base), filter_wise=True)
    np.testing.assert_allclose(out.numpy(), reference(base, ms, rows=True), atol=1e-12)


def test_same_result_on_one_thread_and_a_narrow_output_rounded_once():
    # the chunks' products are summed in chunk order whatever the threads; a bf16 output is the float32
    # result rounded once
    base, ms = correlated(10, (900, 700), 2)
    base, ms = t(base).to(torch.bfloat16), [t(m).to(torch.bfloat16) for m in ms]
    for filter_wise in (False, True):
        run = lambda **kw: model_stock(ms, base=base, filter_wise=filter_wise, compute_dtype=torch.float32, **kw)
        wide = run()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(run(), wide)
        finally:
            torch.set_num_threads(threads)
        narrow = run(output_dtype=torch.bfloat16)
        assert narrow.dtype == torch.bfloat16
        assert torch.equal(narrow.view(torch.int16), wide.to(torch.bfloat16).view(torch.int16))
        assert not torch.equal(narrow, base)


@pytest.mark.parametrize("count,output_dtype", [(3, torch.bfloat16), (4, None), (3, None), (5, torch.bfloat16)])
def test_three_or_more_models_on_the_loops_give_the_torch_paths_bits(count, output_dtype, monkeypatch):
    # the compiled loops (the products' block sums: `triple_product_sums`, `product_sums`; the output:
    # the loop generated for the count) against the torch path, on inputs stored as bf16 and a length spanning several chunks
    from mergesmith.methods import _kernels
    from mergesmith.methods._sparsify import TaskVector

    if not _kernels.available():
        pytest.skip("numba not available")
    g = torch.Generator().manual_seed(count)
    base = torch.randn(700, 1000, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(700, 1000, generator=g)).to(torch.bfloat16) for _ in range(count)]
    func = get_method("model_stock").func
    compiled = func(models, base=base, compute_dtype=torch.float32, output_dtype=output_dtype)
    monkeypatch.setattr(TaskVector, "compiled", lambda self: False)
    reference = func(models, base=base, compute_dtype=torch.float32, output_dtype=output_dtype)
    assert compiled.dtype == reference.dtype == (output_dtype or torch.float32)
    assert torch.equal(compiled, reference)
