import numpy as np
import torch

from mergesmith.methods import get_method

from _methods_ref import finetunes, t

nearswap = get_method("nearswap").func


def reference(tt, a, b):
    out = np.empty_like(a).ravel()
    for i, (x, y) in enumerate(zip(a.ravel(), b.ravel())):
        w = min(max(tt / max(abs(x - y), 1e-6), 0.0), 1.0)
        out[i] = w * y + (1 - w) * x
    return out.reshape(a.shape)


def test_matches_elementwise_formula():
    for shape, tt in [((5, 7), 0.01), ((30,), 0.003), ((2, 3, 4), 1.0)]:
        base, (m,) = finetunes(len(shape), shape, 1)
        out = nearswap([t(m)], base=t(base), t=tt)
        np.testing.assert_allclose(out.numpy(), reference(tt, base, m), atol=1e-14)


def test_limits():
    base, (m,) = finetunes(1, (6, 6), 1)
    assert torch.equal(nearswap([t(m)], base=t(base), t=0.0), t(base))
    assert torch.equal(nearswap([t(m)], base=t(base), t=-1.0), t(base))
    assert torch.allclose(nearswap([t(m)], base=t(base), t=1e3), t(m))
    assert torch.equal(nearswap([t(base)], base=t(base), t=0.5), t(base))
    z = torch.zeros(3)
    assert torch.equal(nearswap([z], base=z, t=0.1), z)
