import math

import numpy as np
import torch

from mergesmith.methods import get_method

from _methods_ref import rng, t

karcher = get_method("karcher").func


def reference(xs, max_iter=10, tol=1e-5):
    """Explicit Riemannian gradient descent on the sphere, one input at a time."""
    n = len(xs)
    vs = [x.ravel() for x in xs]
    norms = [np.linalg.norm(v) for v in vs]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros_like(xs[0])
    us = [vs[i] / norms[i] for i in valid]
    a = [1.0 / len(valid)] * len(valid)
    m = sum(ai * u for ai, u in zip(a, us))
    m = us[0].copy() if np.linalg.norm(m) < tol else m / np.linalg.norm(m)
    for _ in range(max_iter):
        g = np.zeros_like(m)
        for ai, u in zip(a, us):
            d = float(np.clip(m @ u, -1, 1))
            th = math.acos(d)
            if th < tol:
                continue
            g += ai * th / math.sin(th) * (u - d * m)
        gn = np.linalg.norm(g)
        if gn < tol:
            break
        m = math.cos(gn) * m + math.sin(gn) * g / gn
        m = m / np.linalg.norm(m)
    return (sum(norms) / n * m).reshape(xs[0].shape)


def test_matches_reference():
    r = rng(0)
    for n, shape in [(2, (5, 6)), (3, (40,)), (5, (3, 3, 3)), (3, (700, 600))]:  # the last spans several chunks
        xs = [r.normal(size=shape) * (1 + i) for i in range(n)]
        out = karcher([t(x) for x in xs])
        np.testing.assert_allclose(out.numpy(), reference(xs), atol=1e-9)


def test_is_a_fixed_point_of_the_gradient():
    r = rng(1)
    xs = [r.normal(size=30) for _ in range(4)]
    out = karcher([t(x) for x in xs], max_iter=100, tol=1e-12).numpy()
    m = out / np.linalg.norm(out)
    tangent = np.zeros_like(m)
    for x in xs:
        u = x / np.linalg.norm(x)
        d = float(m @ u)
        th = math.acos(d)
        tangent += th / math.sin(th) * (u - d * m)  # Riemannian gradient of the squared distances
    assert np.linalg.norm(tangent) < 1e-8


def test_two_inputs_equal_norm_give_the_geodesic_midpoint():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    out = karcher([t(a), t(b)], max_iter=50).numpy()
    np.testing.assert_allclose(out, np.array([1, 1, 0]) / math.sqrt(2), atol=1e-6)


def test_identical_zero_and_partially_zero():
    x = t(rng(2).normal(size=(4, 4)))
    assert torch.allclose(karcher([x, x.clone(), x.clone()]), x)
    z = torch.zeros(4, 4)
    assert torch.equal(karcher([z, z]), z)
    # a zero input is left out of the direction but halves the radius
    assert torch.allclose(karcher([x, torch.zeros_like(x)]), x / 2)
    assert karcher([x]) is x
