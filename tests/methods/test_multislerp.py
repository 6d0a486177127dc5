import math

import numpy as np
import pytest
import torch

from mergesmith.methods import get_method
from mergesmith.methods.linear import ZeroWeightSumError

from _methods_ref import finetunes, rng, t

multislerp = get_method("multislerp").func


def reference(xs, w, base=None, normalize=True, eps=1e-8):
    """Direct transcription of the tangent-space algorithm on explicit vectors."""
    X = np.stack([x.ravel() - (0 if base is None else base.ravel()) for x in xs])
    w = np.asarray(w, dtype=float)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(X, axis=1)
    U = X / (norms[:, None] + eps)
    m = (w[:, None] * U).sum(0)
    m = m / np.linalg.norm(m)
    T = U - (U @ m)[:, None] * m[None]
    tau = (w[:, None] * T).sum(0)
    th = np.linalg.norm(tau) + eps
    r = m * math.cos(th) + tau * math.sin(th) / th
    out = r * (norms @ w)
    if base is not None:
        out = out + base.ravel()
    return out.reshape(xs[0].shape)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_matches_reference_with_base(n):
    base, ms = finetunes(n, (6, 4), n)
    w = list(np.linspace(0.5, 2.0, n))
    out = multislerp([t(m) for m in ms], base=t(base), weight=w)
    np.testing.assert_allclose(out.numpy(), reference(ms, w, base), atol=1e-10)


def test_without_base_and_unnormalized_1d():
    r = rng(7)
    ms = [r.normal(size=40) for _ in range(3)]
    out = multislerp([t(m) for m in ms], weight=[0.2, 0.3, 0.1], normalize_weights=False)
    np.testing.assert_allclose(out.numpy(), reference(ms, [0.2, 0.3, 0.1], normalize=False), atol=1e-10)


def test_single_model_and_identical_and_zero():
    base, ms = finetunes(1, (5,), 3)
    x = t(ms[0])
    assert multislerp([x], base=t(base), weight=[1.0]) is x
    # identical fine-tunes with a base: all task vectors 0 -> base (mergekit raises for 3+)
    same = [t(base)] * 3
    assert torch.allclose(multislerp(same, base=t(base), weight=[1, 1, 1]), t(base))
    z = torch.zeros(5)
    assert torch.equal(multislerp([z, z, z], weight=[1, 2, 3]), z)
    # identical non-zero models without base merge to themselves
    assert torch.allclose(multislerp([x, x.clone()], weight=[1, 3]), x)


def test_zero_weight_sum_is_refused():
    with pytest.raises(ZeroWeightSumError):
        multislerp([torch.ones(3), torch.arange(3.0)], weight=[1.0, -1.0])
