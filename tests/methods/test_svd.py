"""The Gram-route decompositions behind TSV and the ISO merges (`methods/_svd.py`), against numpy's SVD."""

import numpy as np
import pytest
import torch

from mergesmith.methods import _svd, get_method
from mergesmith.methods.registry import MethodInputError


def spectrum_matrix(m, n, singular_values, seed=0):
    r = np.random.default_rng(seed)
    u, _ = np.linalg.qr(r.normal(size=(m, len(singular_values))))
    v, _ = np.linalg.qr(r.normal(size=(n, len(singular_values))))
    return (u * singular_values) @ v.T


@pytest.mark.parametrize("shape", [(9, 5), (5, 9), (6, 6)])
def test_top_singular_matches_numpy(shape, monkeypatch):
    monkeypatch.setattr(_svd, "ROWS", 4)  # several row blocks even on a small matrix
    a = np.random.default_rng(1).normal(size=shape)
    u, s, vh = _svd.top_singular(torch.tensor(a), 3)
    nu, ns, nvh = np.linalg.svd(a, full_matrices=False)
    assert u.shape == (shape[0], 3) and vh.shape == (3, shape[1])
    np.testing.assert_allclose(s.numpy(), ns[:3], rtol=1e-12)
    np.testing.assert_allclose((u * s) @ vh, (nu[:, :3] * ns[:3]) @ nvh[:3], atol=1e-12)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(vh @ vh.T, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("shape", [(11, 4), (4, 11)])
def test_polar_factor_matches_numpy(shape, monkeypatch):
    monkeypatch.setattr(_svd, "ROWS", 3)
    a = np.random.default_rng(2).normal(size=shape)
    p, s = _svd.polar_with_singular_values(torch.tensor(a))
    nu, ns, nvh = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(p.numpy(), nu @ nvh, atol=1e-12)
    np.testing.assert_allclose(s.numpy(), ns, rtol=1e-12)


def test_a_rank_deficient_matrix_has_the_partial_isometry_on_its_range_and_zero_singular_values():
    # rank 2 in 6 x 5: LAPACK would complete the basis with 3 arbitrary directions; here they are zero
    a = spectrum_matrix(6, 5, [3.0, 0.5])
    p, s = _svd.polar_with_singular_values(torch.tensor(a))
    nu, ns, nvh = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(p.numpy(), nu[:, :2] @ nvh[:2], atol=1e-12)
    np.testing.assert_allclose(s.numpy(), [3.0, 0.5, 0, 0, 0], atol=1e-12)
    u, s, vh = _svd.top_singular(torch.tensor(a), 4)
    np.testing.assert_array_equal(s[2:].numpy(), [0, 0])
    assert torch.all(u[:, 2:] == 0) and torch.all(vh[2:] == 0)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    zero = torch.zeros(4, 3)
    p, s = _svd.polar_with_singular_values(zero)
    assert torch.equal(p, zero) and torch.equal(s, torch.zeros(3, dtype=torch.float64))


def test_float32_factors_of_a_steep_spectrum_keep_float64_accuracy():
    # singular values spanning 1e4, as task vectors' do: the float64 Gram route loses nothing the float32
    # storage does not (a float32 SVD errs by ~1e-4 of the scale here)
    a = spectrum_matrix(300, 200, np.logspace(0, -4, 200), seed=3)
    p, s = _svd.polar_with_singular_values(torch.tensor(a, dtype=torch.float32))
    assert p.dtype == torch.float32
    nu, ns, nvh = np.linalg.svd(a.astype(np.float32).astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(p.numpy(), nu @ nvh, atol=2e-6)
    np.testing.assert_allclose(s.numpy(), ns, rtol=1e-5, atol=1e-7)


def test_many_equal_singular_values():
    # ISO-CTS's stacked bases: hundreds of singular values at exactly 1 (LAPACK's float32 SVD did not
    # converge on one of the bench's)
    q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(120, 100)))
    stacked = np.hstack([q[:, :90], q[:, 80:100] * 1.0])  # 90 + 20 columns, 10 of them repeated
    p = _svd.polar_factor(torch.tensor(stacked, dtype=torch.float32)).double().numpy()
    nu, ns, nvh = np.linalg.svd(stacked, full_matrices=False)
    keep = ns > 1e-6
    np.testing.assert_allclose(p, nu[:, keep] @ nvh[keep], atol=1e-5)


def test_a_decomposition_that_fails_is_a_clear_error(monkeypatch):
    def failing(matrix):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(MethodInputError, match=r"\(12, 7\) matrix's Gram matrix did not converge"):
        _svd.polar_factor(torch.randn(12, 7))
    with pytest.raises(MethodInputError, match=r"\(7, 12\) matrix's Gram matrix did not converge"):
        _svd.top_singular(torch.randn(7, 12), 2)
    with pytest.raises(MethodInputError):
        get_method("iso_c").func([torch.randn(5, 4)], base=torch.zeros(5, 4))


def test_non_finite_task_vectors_are_named_as_such():
    for shape in ((6, 4), (4, 6)):
        model = torch.randn(shape)
        model[2, 1] = float("nan")
        for name in ("tsv", "iso_c", "iso_cts"):
            with pytest.raises(MethodInputError, match=rf"\({shape[0]}, {shape[1]}\) matrix holds NaN or infinite values"):
                get_method(name).func([model, torch.randn(shape)], base=torch.zeros(shape))
