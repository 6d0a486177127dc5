import numpy as np
import pytest
import torch

from mergesmith.methods import get_method

import _tv_ref as ref


def polar(a):
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def reference(base, models, lam=1.0, frac=None):
    n = len(models)
    r = min(base.shape)
    k = int(r * (1 / n if frac is None else min(frac, 1 / n)))
    us, ss, vs = [], [], []
    for m in models:
        u, s, vt = np.linalg.svd(m - base, full_matrices=False)
        us.append(u[:, :k]); ss.append(s[:k]); vs.append(vt[:k])
    return base + lam * polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.vstack(vs))


@pytest.mark.parametrize("shape,n", [((12, 9), 3), ((8, 16), 2), ((10, 10), 4)])
def test_matches_reference(shape, n):
    base, models = ref.finetunes(1, shape, n)
    np.testing.assert_allclose(ref.call("tsv", base, models, lambda_=0.9), reference(base, models, 0.9), atol=1e-10)
    np.testing.assert_allclose(ref.call("tsv", base, models, sv_reduction=0.2), reference(base, models, frac=0.2), atol=1e-10)


def test_low_rank_orthogonal_tasks_are_recovered_exactly():
    # tasks in orthogonal rank-1 subspaces, k = their rank: TSV = plain sum of the task vectors
    r = np.random.default_rng(2)
    q1, _ = np.linalg.qr(r.normal(size=(8, 8)))
    q2, _ = np.linalg.qr(r.normal(size=(6, 6)))
    base = r.normal(size=(8, 6))
    d1 = 2.0 * np.outer(q1[:, 0], q2[:, 0])
    d2 = 0.5 * np.outer(q1[:, 1], q2[:, 1])
    out = ref.call("tsv", base, [base + d1, base + d2], sv_reduction=1 / 6)  # k = 1 = the tasks' rank
    np.testing.assert_allclose(out, base + d1 + d2, atol=1e-12)


def test_non_matrices_and_edge_cases():
    base, models = ref.finetunes(3, (20,), 3)
    np.testing.assert_allclose(ref.call("tsv", base, models, lambda_=2.0),
                               base + 2.0 * np.mean([m - base for m in models], axis=0), atol=1e-12)
    base, models = ref.finetunes(4, (6, 5), 2)
    out = ref.call("tsv", base, [base, base])
    np.testing.assert_allclose(out, base, atol=1e-12)
    assert np.isfinite(out).all()
    # rank smaller than the number of tasks: k = 0 falls back to the mean
    b, ms = ref.finetunes(5, (2, 9), 3)
    np.testing.assert_allclose(ref.call("tsv", b, ms), b + np.mean([m - b for m in ms], axis=0), atol=1e-12)
    z = torch.zeros(4, 4)
    assert torch.equal(get_method("tsv").func([z, z], base=z), z)
    assert get_method("tsv").check({"sv_reduction": 1.5}) is not None
