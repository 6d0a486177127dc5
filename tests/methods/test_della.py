import numpy as np
import pytest
import torch

from mergesmith.methods import get_method
from mergesmith.methods.registry import MethodInputError

import _tv_ref as ref

della = get_method("della").func
della_linear = get_method("della_linear").func


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ref_probs(x, density, eps):
    """Per-row (dim 1) rank-linear keep probabilities; equal magnitudes share their average rank."""
    rows = np.abs(x.reshape(1, -1) if x.ndim < 2 else x)
    below = (rows[:, None, :] < rows[:, :, None]).sum(-1)
    at_most = (rows[:, None, :] <= rows[:, :, None]).sum(-1)
    n = rows.shape[1]
    return (density - eps + 2 * eps * (below + at_most - 1) / 2 / (n - 1)).reshape(x.shape)


def test_spec_defaults():
    assert get_method("della").param("epsilon").default == 0.15
    assert get_method("della").param("normalize").default is True
    assert get_method("della_linear").param("normalize").default is False
    assert get_method("della").param("rescale").default is True


def test_mask_reference_with_same_words():
    base, models = ref.finetunes(1, (6, 11), 2)
    d, e = [0.5, 0.4], [0.2, 0.1]
    for consensus in ("sum", "count"):
        g = gen(5)
        ws = [ref.lane_words(g, 6, 11) for _ in models]
        exp = ref.gta(base, models, [1, 0.5],
                      lambda x, i: ref.rescale(x, np.where(ref.della_keep(x, ws[i], d[i], e[i]), x, 0.0)), consensus, True)
        out = ref.call("della", base, models, weight=[1, 0.5], density=d, epsilon=e, consensus_method=consensus,
                       generator=gen(5))
        np.testing.assert_allclose(out, exp, atol=1e-12)


def test_mask_reference_blocks_ties_and_float32():
    # float32 task vectors with many tied magnitudes, ranked in two blocks of rows (174 rows of 1500, then 26):
    # rows either side of the block boundary get the masks of the naive rule with one stream of lanes
    r = np.random.default_rng(3)
    base = r.normal(size=(200, 1500)).astype(np.float32)
    model = base + np.round(r.normal(size=base.shape) * 8).astype(np.float32) / 1024
    delta = model - base
    out = della_linear([torch.tensor(model)], base=torch.tensor(base), weight=[1], density=[0.3], epsilon=[0.1],
                       rescale=False, generator=gen(8)).numpy()
    rows = [0, 1, 172, 173, 174, 175, 199]
    keep = ref.della_keep(delta[rows], ref.lane_words(gen(8), 200, 1500)[rows], 0.3, 0.1)
    np.testing.assert_array_equal(out[rows], np.where(keep, base[rows] + delta[rows], base[rows]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # float32: the compiled loop, where numba is installed
def test_mask_reference_more_dimensions(dtype):
    # N-d tensors rank along dim 1; the words follow the layout with dim 1 moved last
    base, (model,) = ref.finetunes(2, (3, 5, 4), 1)
    base, model = base.astype(dtype), model.astype(dtype)
    delta = model - base
    moved = np.moveaxis(delta, 1, -1)  # (3, 4, 5): rows of dim 1
    keep = np.moveaxis(ref.della_keep(moved, ref.lane_words(gen(4), 12, 5).reshape(*moved.shape, 2), 0.5, 0.2), -1, 1)
    out = ref.call("della_linear", base, [model], weight=[1], density=[0.5], epsilon=[0.2], rescale=False,
                   generator=gen(4))
    np.testing.assert_allclose(out, base + np.where(keep, delta, 0.0), atol=1e-15 if dtype == np.float64 else 1e-6)


def test_tied_magnitudes_keep_with_their_average_rank_probability():
    # a row of 4 distinct magnitudes, each 8 times: an entry's rank is uncertain within its group of 8, and its
    # keep probability is that of the group's average rank
    base = torch.zeros(1, 32, dtype=torch.float64)
    model = torch.tensor([[1.0, -2.0, 3.0, -4.0] * 8], dtype=torch.float64)
    g = gen(6)
    draws = 4000
    freq = torch.zeros(1, 32, dtype=torch.float64)
    for _ in range(draws):
        freq += (della_linear([model], base=base, weight=[1], density=[0.5], epsilon=[0.4], rescale=False,
                              generator=g) != 0).double()
    freq = (freq / draws).numpy().ravel()
    exp = ref_probs(model.numpy(), 0.5, 0.4).ravel()  # group of |1|: ranks 0-7, average 3.5 -> 0.1 + 0.8 * 3.5 / 31
    for value in range(4):
        group = slice(value, 32, 4)
        assert abs(freq[group].mean() - exp[group][0]) < 0.015
    assert np.abs(freq - exp).max() < 0.05


def test_same_seed_and_rank_statistics():
    base = torch.zeros(1, 101, dtype=torch.float64)
    model = torch.linspace(-1, 1, 101, dtype=torch.float64).reshape(1, 101)  # |x| smallest in the middle
    a = della_linear([model], base=base, weight=[1], density=[0.5], epsilon=[0.3], rescale=False, generator=gen(2))
    b = della_linear([model], base=base, weight=[1], density=[0.5], epsilon=[0.3], rescale=False, generator=gen(2))
    assert torch.equal(a, b)
    g = gen(3)
    freq = torch.zeros(1, 101, dtype=torch.float64)
    draws = 3000
    for _ in range(draws):
        freq += (della_linear([model], base=base, weight=[1], density=[0.5], epsilon=[0.3], rescale=False,
                              generator=g) != 0).double()
    freq = (freq / draws).numpy().ravel()
    exp = ref_probs(model.numpy(), 0.5, 0.3).ravel()
    assert abs(freq[0] - 0.8) < 0.04 and abs(freq[49] - 0.2) < 0.04
    assert np.abs(freq - exp).max() < 0.05
    assert abs(freq[exp > 0].mean() - exp[exp > 0].mean()) < 0.01


def test_expectation_with_rescale():
    # E[out] = p * delta * (L1 ratio): with rank-dependent p the L1 rescale is not per-entry unbiased (as in
    # mergekit); large entries are kept more often.
    base, models = ref.finetunes(4, (12, 12), 1)
    delta = models[0] - base
    p = ref_probs(delta, 0.5, 0.2)
    exp = p * delta * np.abs(delta).sum() / (p * np.abs(delta)).sum()
    g = gen(9)
    mean = np.mean([ref.call("della_linear", base, models, weight=[1], density=[0.5], epsilon=[0.2], generator=g) - base
                    for _ in range(1500)], axis=0)
    assert np.abs(mean - exp).mean() < 0.06 * np.abs(delta).mean()
    assert abs(np.abs(mean).sum() / np.abs(exp).sum() - 1) < 0.03


def test_epsilon_out_of_range():
    base, models = ref.finetunes(5, (4, 4), 1)
    with pytest.raises(MethodInputError):
        ref.call("della", base, models, weight=[1], density=[0.5], epsilon=[0.5], generator=gen(0))
    check = get_method("della").check
    assert check({"density": [0.5, 0.9], "epsilon": [0.1, 0.15]}) is not None
    assert check({"density": [0.5, 1.0], "epsilon": [0.1, 0.5]}) is None


def test_edge_cases():
    base, models = ref.finetunes(6, (5, 7), 2)
    # density 1: deterministic, unsparsified
    out = ref.call("della", base, models, weight=[1, 1], density=[1, 1], epsilon=[0.1, 0.1], generator=gen(0))
    np.testing.assert_allclose(out, ref.gta(base, models, [1, 1], None, "sum", True), atol=1e-12)
    # zero task vectors, 1-D, single-column rows: NaN-free
    out = ref.call("della", base, [base, base], weight=[1, 1], density=[0.5, 0.5], epsilon=[0.1, 0.1], generator=gen(0))
    np.testing.assert_array_equal(out, base)
    out = ref.call("della", base[0], [m[0] for m in models], weight=[1, 1], density=[0.5] * 2, epsilon=[0.1] * 2,
                   generator=gen(0))
    assert out.shape == (7,) and np.isfinite(out).all()
    col = ref.call("della_linear", base[:, :1], [m[:, :1] for m in models], weight=[1, 1], density=[0.5] * 2,
                   epsilon=[0.1] * 2, generator=gen(0))
    assert col.shape == (5, 1) and np.isfinite(col).all()
    out = ref.call("della", base, models, weight=[1, 1], density=[0, 0], epsilon=[0.1, 0.1], generator=gen(0))
    np.testing.assert_array_equal(out, base)
