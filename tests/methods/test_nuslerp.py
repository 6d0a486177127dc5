import math

import numpy as np
import torch

from mergesmith.methods import get_method

from _methods_ref import rng, t

nuslerp = get_method("nuslerp").func


def slerp_rows(tt, a, b):
    """Row-by-row reference with mergekit's constants, explicit loop."""
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        ux = x / max(np.linalg.norm(x), 1e-7)
        uy = y / max(np.linalg.norm(y), 1e-7)
        c = np.clip(ux @ uy, -1, 1)
        if 1 - c * c <= 1e-16:
            out[i] = (1 - tt) * x + tt * y
        else:
            th = math.acos(c)
            out[i] = (math.sin((1 - tt) * th) * x + math.sin(tt * th) * y) / math.sin(th)
    return out


def test_flatten_with_base():
    r = rng(0)
    base, m0, m1 = (r.normal(size=(6, 5)) for _ in range(3))
    out = nuslerp([t(m0), t(m1)], base=t(base), weight=[1.0, 3.0])
    ref = base + slerp_rows(0.75, (m0 - base).reshape(1, -1), (m1 - base).reshape(1, -1)).reshape(6, 5)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


def test_per_row_and_row_wise():
    r = rng(1)
    m0, m1 = r.normal(size=(4, 9)), r.normal(size=(4, 9))
    out = nuslerp([t(m0), t(m1)], weight=[1.0, 1.0], nuslerp_flatten=False)
    np.testing.assert_allclose(out.numpy(), slerp_rows(0.5, m0, m1), atol=1e-12)
    out = nuslerp([t(m0), t(m1)], weight=[3.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    np.testing.assert_allclose(out.numpy(), slerp_rows(0.25, m0.T, m1.T).T, atol=1e-12)


def test_weights_summing_to_zero_use_half_and_1d():
    r = rng(2)
    m0, m1 = r.normal(size=20), r.normal(size=20)
    out = nuslerp([t(m0), t(m1)], weight=[1.0, -1.0], nuslerp_flatten=False)
    np.testing.assert_allclose(out.numpy(), slerp_rows(0.5, m0[None], m1[None])[0], atol=1e-12)


def test_endpoints_identical_zeros():
    r = rng(3)
    base, m0, m1 = (r.normal(size=(3, 3)) for _ in range(3))
    assert torch.allclose(nuslerp([t(m0), t(m1)], base=t(base), weight=[1.0, 0.0]), t(m0))
    assert torch.allclose(nuslerp([t(m0), t(m1)], base=t(base), weight=[0.0, 1.0]), t(m1))
    assert torch.allclose(nuslerp([t(base), t(base)], base=t(base), weight=[1.0, 2.0]), t(base))
    z = torch.zeros(3, 3)
    for flat in (True, False):
        assert torch.equal(nuslerp([z, z], weight=[1.0, 1.0], nuslerp_flatten=flat), z)
