import numpy as np
import pytest
import torch

from mergesmith.methods import get_method

import _tv_ref as ref

ties = get_method("ties").func


@pytest.mark.parametrize("shape", [(9, 7), (50,), (3, 4, 5)])
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(shape, consensus, normalize):
    base, models = ref.finetunes(1, shape, 3)
    w, d = [0.7, 1.0, -0.4], [0.3, 0.6, 0.5]
    out = ref.call("ties", base, models, weight=w, density=d, normalize=normalize, lambda_=1.2,
                   consensus_method=consensus)
    exp = ref.gta(base, models, w, lambda x, i: ref.magnitude(x, d[i]), consensus, normalize, 1.2)
    np.testing.assert_allclose(out, exp, atol=1e-12)


def test_rescale_matches_reference():
    base, models = ref.finetunes(2, (8, 8), 2)
    out = ref.call("ties", base, models, weight=[1, 1], density=[0.25, 0.5], rescale=True)
    exp = ref.gta(base, models, [1, 1], lambda x, i: ref.rescale(x, ref.magnitude(x, [0.25, 0.5][i])), "sum", True)
    np.testing.assert_allclose(out, exp, atol=1e-12)


def test_large_tensor_selection_is_exact():
    # > 65,536 entries: the sampled-window threshold path
    base, models = ref.finetunes(3, (300, 250), 2)
    out = ref.call("ties", base, models, weight=[1, 1], density=[0.1, 0.37])
    exp = ref.gta(base, models, [1, 1], lambda x, i: ref.magnitude(x, [0.1, 0.37][i]), "sum", True)
    np.testing.assert_allclose(out, exp, atol=1e-12)


def test_ties_at_threshold_keep_exactly_k_earliest_first():
    base = np.zeros(10)
    model = np.array([1.0, 2, 2, 2, 2, 0.5, 2, 3, 0, 0])
    out = ref.call("ties", base, [model], weight=[1], density=[0.4])  # k = 4: the 3, then the first three 2s
    np.testing.assert_array_equal(out, [0, 2, 2, 2, 0, 0, 0, 3, 0, 0])


def test_consensus_count_differs_from_sum():
    base = np.zeros(1)
    models = [np.array([-10.0]), np.array([1.0]), np.array([1.0])]
    w = [1, 1, 1]
    assert ref.call("ties", base, models, weight=w, consensus_method="sum")[0] == -10
    assert ref.call("ties", base, models, weight=w, consensus_method="count")[0] == 1


def test_edge_cases():
    base, models = ref.finetunes(4, (6, 5), 2)
    # density 1: plain sign-elected mean
    out = ref.call("ties", base, models, weight=[1, 1], density=[1, 1])
    np.testing.assert_allclose(out, ref.gta(base, models, [1, 1], None, "sum", True), atol=1e-12)
    # density tiny: k = max(1, floor) = 1 entry kept per model, no crash
    out = ref.call("ties", base, models, weight=[1, 1], density=[1e-6, 1e-6])
    assert np.count_nonzero(out - base) <= 2
    # density 0 keeps nothing
    np.testing.assert_array_equal(ref.call("ties", base, models, weight=[1, 1], density=[0, 0]), base)
    # zero task vectors and identical models: NaN-free, base back / the common model back
    np.testing.assert_array_equal(ref.call("ties", base, [base, base], weight=[1, 1], density=[0.5, 0.5]), base)
    np.testing.assert_allclose(ref.call("ties", base, [models[0]] * 3, weight=[1] * 3, density=[1] * 3), models[0], atol=1e-12)
    z = torch.zeros(4, 4)
    assert torch.equal(ties([z, z], base=z, weight=[1, 1], density=[0.5, 0.5]), z)
    # no models
    assert torch.equal(ties([], base=z, weight=[]), z)


def test_float32_and_bfloat16_inputs():
    base, models = ref.finetunes(5, (16, 16), 2)
    for dtype in (torch.float32, torch.bfloat16):
        out = ties([torch.tensor(m, dtype=dtype) for m in models], base=torch.tensor(base, dtype=dtype),
                   weight=[1, 1], density=[0.5, 0.5])
        assert out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "della", "task_arithmetic", "sce"])
def test_work_split_across_threads_equals_work_in_turn(method, monkeypatch):
    # with several torch threads the merge pass splits its chunks across threads (and TIES and breadcrumbs
    # build their models' plans at once); the output must be bit-identical to one thread doing it all
    from mergesmith.methods import _parallel, _task_vectors

    split = []
    together = _parallel.together
    counting = lambda jobs, device: split.append(len(jobs)) or together(jobs, device)  # noqa: E731
    monkeypatch.setattr(_parallel, "together", counting)
    monkeypatch.setattr(_task_vectors, "together", counting)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1500, 800, generator=g)  # several streaming chunks
    models = [base + torch.randn(base.shape, generator=g) * 0.01 for _ in range(3)]
    method_info = get_method(method)
    kwargs = {"weight": [0.5, 0.3, 0.2]}
    if method not in ("task_arithmetic", "sce"):
        kwargs["density"] = [0.4, 0.5, 0.6]
    if method == "sce":  # energy weights on every tensor: their sums must not depend on the threads either
        kwargs = {"select_topk": 0.5, "energy_floor": 0.0}
    if method_info.random:
        kwargs["generator"] = None
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            if method_info.random:
                kwargs["generator"] = torch.Generator().manual_seed(5)
            outputs.append(method_info.func(models, base=base, **kwargs))
    finally:
        torch.set_num_threads(before)
    assert max(split) > 1  # the first run did split its work
    assert torch.equal(outputs[0], outputs[1])
