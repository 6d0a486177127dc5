import numpy as np
import pytest

import _tv_ref as ref


@pytest.mark.parametrize("shape", [(12, 10), (97,), (2, 5, 6)])
@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.5, 0.0), (0.9, 0.5), (0.3, 0.3)])
def test_breadcrumbs_matches_reference(shape, density, gamma):
    base, models = ref.finetunes(1, shape, 2)
    w = [0.6, 0.9]
    out = ref.call("breadcrumbs", base, models, weight=w, density=[density, 0.7], gamma=[gamma, 0.02])
    exp = ref.gta(base, models, w, lambda x, i: ref.outliers(x, [density, 0.7][i], [gamma, 0.02][i]))
    np.testing.assert_allclose(out, exp, atol=1e-12)


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_breadcrumbs_ties_matches_reference(consensus):
    base, models = ref.finetunes(2, (20, 15), 3)
    w, d, g = [1, 0.5, 0.8], [0.8, 0.6, 0.9], [0.05, 0.0, 0.1]
    out = ref.call("breadcrumbs_ties", base, models, weight=w, density=d, gamma=g, normalize=True, rescale=True,
                   consensus_method=consensus)
    exp = ref.gta(base, models, w, lambda x, i: ref.rescale(x, ref.outliers(x, d[i], g[i])), consensus, True)
    np.testing.assert_allclose(out, exp, atol=1e-12)


def test_large_tensor():
    base, models = ref.finetunes(3, (400, 200), 1)
    out = ref.call("breadcrumbs", base, models, weight=[1], density=[0.6], gamma=[0.03])
    np.testing.assert_allclose(out, ref.gta(base, models, [1], lambda x, i: ref.outliers(x, 0.6, 0.03)), atol=1e-12)


def test_counts_and_gamma_zero():
    base = np.zeros(100)
    delta = np.arange(1.0, 101.0)  # distinct magnitudes 1..100
    out = ref.call("breadcrumbs", base, [delta], weight=[1], density=[0.5], gamma=[0.1])
    np.testing.assert_array_equal(np.nonzero(out)[0], np.arange(40, 90))  # drop the top 10, keep the next 50
    out = ref.call("breadcrumbs", base, [delta], weight=[1], density=[0.5], gamma=[0.0])
    np.testing.assert_array_equal(np.nonzero(out)[0], np.arange(50, 100))  # gamma 0: plain top 50, not nothing


def test_edge_cases():
    base, models = ref.finetunes(4, (5, 4), 2)
    # density 1: unsparsified task arithmetic
    out = ref.call("breadcrumbs", base, models, weight=[1, 1], density=[1, 1], gamma=[0.1, 0.1])
    np.testing.assert_allclose(out, ref.gta(base, models, [1, 1]), atol=1e-12)
    # int(density * n) = 0 keeps nothing (no crash, no NaN)
    out = ref.call("breadcrumbs", base, models, weight=[1, 1], density=[0.01, 0.01], gamma=[0.01, 0.01])
    np.testing.assert_array_equal(out, base)
    # zero task vectors
    out = ref.call("breadcrumbs_ties", base, [base, base], weight=[1, 1], density=[0.5, 0.5], gamma=[0.1, 0.1],
                   normalize=True, rescale=True)
    np.testing.assert_array_equal(out, base)
    # tied magnitudes: exact counts
    out = ref.call("breadcrumbs", np.zeros(10), [np.ones(10)], weight=[1], density=[0.5], gamma=[0.2])
    assert np.count_nonzero(out) == 5
