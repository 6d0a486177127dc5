import numpy as np
import pytest
import torch

from mergesmith.methods import get_method

import _tv_ref as ref


def polar(a):
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def ref_iso_c(base, models, lam=1.0):
    total = sum(m - base for m in models)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return base + lam * s.mean() * u @ vt


def ref_iso_cts(base, models, lam=1.0, frac=0.8):
    n, r = len(models), min(base.shape)
    c = int(r * frac)
    d = min(round((r - c) / n), r // n)
    c = r - n * d
    u, s, vt = np.linalg.svd(sum(m - base for m in models), full_matrices=False)
    us, ss, vs = [], [], []
    for m in models:
        delta = m - base
        spec = delta - u[:, :c] @ u[:, :c].T @ delta
        ut, st, vtt = np.linalg.svd(spec, full_matrices=False)
        us.append(ut[:, :d]); ss.append(st[:d]); vs.append(vtt[:d])
    U = polar(np.hstack(us + [u[:, :c]]))
    V = polar(np.vstack(vs + [vt[:c]]))
    return base + lam * np.concatenate(ss + [s[:c]]).mean() * U @ V


@pytest.mark.parametrize("shape,n", [((12, 9), 3), ((7, 14), 2)])
def test_iso_c_matches_reference(shape, n):
    base, models = ref.finetunes(1, shape, n)
    np.testing.assert_allclose(ref.call("iso_c", base, models, lambda_=1.3), ref_iso_c(base, models, 1.3), atol=1e-10)


@pytest.mark.parametrize("shape,n,frac", [((12, 9), 3, 0.8), ((16, 10), 2, 0.5), ((10, 10), 4, 0.0), ((9, 9), 2, 1.0)])
def test_iso_cts_matches_reference(shape, n, frac):
    base, models = ref.finetunes(2, shape, n)
    out = ref.call("iso_cts", base, models, lambda_=1.1, common_space_fraction=frac)
    np.testing.assert_allclose(out, ref_iso_cts(base, models, 1.1, frac), atol=1e-10)


def test_spectrum_is_flat():
    base, models = ref.finetunes(3, (10, 8), 3)
    for name in ("iso_c", "iso_cts"):
        s = np.linalg.svd(ref.call(name, base, models) - base, compute_uv=False)
        np.testing.assert_allclose(s, s.mean(), rtol=1e-9)


def test_non_matrices_and_edge_cases():
    base, models = ref.finetunes(4, (15,), 2)
    for name in ("iso_c", "iso_cts"):
        np.testing.assert_allclose(ref.call(name, base, models, lambda_=1.5),
                                   base + 1.5 * np.mean([m - base for m in models], axis=0), atol=1e-12)
        b2, _ = ref.finetunes(5, (6, 4), 1)
        out = ref.call(name, b2, [b2, b2])
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, b2, atol=1e-12)
        z = torch.zeros(3, 5)
        assert torch.equal(get_method(name).func([], base=z), z)
    assert get_method("iso_cts").check({"common_space_fraction": 1.2}) is not None
