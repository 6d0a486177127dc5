import numpy as np
import torch

from mergesmith.methods import get_method

from _methods_ref import rng, t

ram = get_method("ram").func
ramplus = get_method("ramplus_tl").func


def sparse_finetunes(seed, shape, n, density=0.4):
    r = rng(seed)
    base = r.normal(size=shape)
    ms = [base + r.normal(size=shape) * (r.random(size=shape) < density) for _ in range(n)]
    return base, ms


def reference(base, ms, eps=1e-5, plus=False, r_=0.1, alpha=0.2):
    tvs = [(m - base).ravel() for m in ms]
    nz = [np.abs(v) > eps for v in tvs]
    count = np.sum(nz, axis=0)
    lam = []
    for z in nz:
        shared = int(np.sum(z & (count > 1)))
        unique = int(np.sum(z & (count == 1)))
        rho = shared / max(unique, eps)
        lam.append(1 + r_ * min(max(rho, 0), alpha) if plus else 1.0)
    out = base.ravel().copy()
    for j in range(out.size):
        if count[j] == 1:
            out[j] += sum(lam[i] * tvs[i][j] for i in range(len(ms)) if nz[i][j])
        elif count[j] > 1:
            out[j] += sum(tvs[i][j] for i in range(len(ms)) if nz[i][j]) / count[j]
    return out.reshape(base.shape)


def test_ram_matches_reference():
    for n in (1, 2, 4):
        base, ms = sparse_finetunes(n, (7, 9), n)
        out = ram([t(m) for m in ms], base=t(base))
        np.testing.assert_allclose(out.numpy(), reference(base, ms), atol=1e-12)
    base, ms = sparse_finetunes(9, (50,), 3)
    out = ram([t(m) for m in ms], base=t(base), epsilon=0.5)
    np.testing.assert_allclose(out.numpy(), reference(base, ms, eps=0.5), atol=1e-12)


def test_ramplus_matches_reference():
    for n, kw in [(2, {}), (3, {"r": 0.5, "alpha": 1.5}), (4, {"epsilon": 0.3})]:
        base, ms = sparse_finetunes(10 + n, (6, 11), n)
        out = ramplus([t(m) for m in ms], base=t(base), **kw)
        ref = reference(base, ms, eps=kw.get("epsilon", 1e-5), plus=True,
                        r_=kw.get("r", 0.1), alpha=kw.get("alpha", 0.2))
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


def test_edge_cases():
    base, ms = sparse_finetunes(3, (5, 5), 2)
    b = t(base)
    assert ram([], base=b) is b and ramplus([], base=b) is b
    for f in (ram, ramplus):
        assert torch.equal(f([b.clone(), b.clone()], base=b), b)
        z = torch.zeros(4)
        assert torch.equal(f([z, z], base=z), z)


def _ramplus_whole_tensor(models, base, epsilon=1e-5, r=0.1, alpha=0.2):
    """The RAM+ formula on whole tensors in their own dtype, counts exact (count_nonzero)."""
    deltas = [m - base for m in models]
    flags = [(d.abs() > epsilon).to(d.dtype) for d in deltas]
    deltas = [d * f for d, f in zip(deltas, flags)]
    counts = sum(flags[1:], flags[0].clone())
    unique = counts == 1
    unique_sum = torch.zeros_like(base)
    for d, f in zip(deltas, flags):
        contributing = int(torch.count_nonzero(f))
        unique_count = int(torch.count_nonzero(f.bool() & unique))
        rho = torch.tensor(contributing - unique_count, dtype=torch.float32) / max(unique_count, epsilon)
        unique_sum.addcmul_(d, (1 + r * rho.clamp(0.0, alpha)).to(base.dtype))
    shared = sum(deltas[1:], deltas[0].clone()) / counts.clamp(min=1)
    return torch.where(unique, unique_sum, shared) + base


def test_ramplus_in_bf16_arithmetic_counts_exactly_across_chunks():
    # mergekit's arithmetic on bf16 models: every step rounds to bf16, but the counts behind each λ must stay
    # exact (thousands of contributing entries a chunk; bf16 sums of 0/1 would stop at 256)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(700, 600, generator=g).to(torch.bfloat16)
    models = [(base.float() + torch.randn(base.shape, generator=g) * (torch.rand(base.shape, generator=g) < p)).to(torch.bfloat16)
              for p in (0.3, 0.6)]
    out = ramplus(models, base=base, compute_dtype=torch.bfloat16, r=0.5, alpha=1.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _ramplus_whole_tensor(models, base, r=0.5, alpha=1.5))
