import math

import numpy as np
import pytest
import torch

from mergesmith.methods import get_method

from _methods_ref import rng, t

slerp = get_method("slerp").func


def reference(t_, a, b):
    a, b = a.ravel(), b.ravel()
    na = np.linalg.norm(a) if np.linalg.norm(a) > 1e-8 else 1.0
    nb = np.linalg.norm(b) if np.linalg.norm(b) > 1e-8 else 1.0
    cos = np.clip(a @ b / (na * nb), -1, 1)
    if abs(cos) > 0.9995:
        return (1 - t_) * a + t_ * b
    th = math.acos(cos)
    return (math.sin((1 - t_) * th) * a + math.sin(t_ * th) * b) / math.sin(th)


@pytest.mark.parametrize("tt", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(7, 5), (33,), (2, 3, 4), (700, 600)])  # the last spans several chunks
def test_matches_formula(tt, shape):
    r = rng(1)
    a, b = r.normal(size=shape), r.normal(size=shape)
    out = slerp([t(b)], base=t(a), t=tt)
    assert out.shape == shape
    np.testing.assert_allclose(out.numpy().ravel(), reference(tt, a, b), atol=1e-12)


def test_endpoints_exact_and_geometry():
    r = rng(2)
    a, b = r.normal(size=50), r.normal(size=50)
    assert torch.equal(slerp([t(b)], base=t(a), t=0.0), t(a))
    assert torch.allclose(slerp([t(b)], base=t(a), t=1.0), t(b))
    # unit vectors stay on the sphere
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    mid = slerp([t(ub)], base=t(ua), t=0.5).numpy()
    assert abs(np.linalg.norm(mid) - 1) < 1e-12


def test_colinear_falls_back_to_lerp():
    a = np.arange(1.0, 11.0)
    out = slerp([t(3 * a)], base=t(a), t=0.5)
    np.testing.assert_allclose(out.numpy(), 2 * a)


def test_identical_and_zeros_are_nan_free():
    a = rng(3).normal(size=(4, 4))
    assert torch.allclose(slerp([t(a)], base=t(a), t=0.3), t(a))
    z = torch.zeros(4, 4)
    assert torch.equal(slerp([z], base=z, t=0.3), z)
    out = slerp([t(a)], base=torch.zeros(4, 4, dtype=torch.float64), t=0.3)
    assert torch.isfinite(out).all()


def test_float32_and_bf16_keep_dtype():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    assert slerp([b], base=a, t=0.5).dtype == torch.float32
    assert slerp([b.bfloat16()], base=a.bfloat16(), t=0.5).dtype == torch.bfloat16
