"""The compiled loops (`methods._kernels`) against the torch path they replace on float32 CPU merges.

Each case runs a method twice on the same inputs, with the loops and with them turned off, on tensors large
enough for several streaming chunks and for the chunked selection, with bf16-quantized task vectors so that
many magnitudes tie at the thresholds. Methods that elect signs must agree exactly; without an election the
loops round each weighted delta before summing (see `_kernels`), so there an ulp of the sum is allowed.
"""

import numpy as np
import pytest
import torch

from mergesmith.methods import _generated_loops, _kernels, _linalg, _sparsify, _task_vectors
from mergesmith.methods.registry import get_method

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="numba is not installed")


@pytest.fixture
def torch_path(monkeypatch):
    """A switch that turns the compiled loops off for the code called inside it."""
    available = _kernels.available

    class Switch:
        def __enter__(self):
            monkeypatch.setattr(_kernels, "available", lambda: False)

        def __exit__(self, *exc):
            monkeypatch.setattr(_kernels, "available", available)

    return Switch()


def _family(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(700, 640, generator=g) * 0.02).to(dtype)  # 448,000 entries: 2 chunks, chunked selection
    models = [(base.float() + torch.randn(base.shape, generator=g) * 0.002).to(dtype) for _ in range(3)]
    models[2][:50] = base[:50]  # rows where one task vector is zero: no vote, and a divisor without it
    return models, base


CASES = [
    ("ties", {"density": [0.4, 0.5, 0.6]}),
    ("ties", {"density": [0.3, 0.3, 0.9], "consensus_method": "count", "normalize": False, "lambda_": 0.7}),
    ("ties", {"density": [0.5, 0.5, 0.5], "rescale": True}),
    ("breadcrumbs", {"density": [0.6, 0.5, 0.7], "gamma": [0.02, 0.05, 0.0]}),
    ("breadcrumbs_ties", {"density": [0.6, 0.5, 0.7], "gamma": [0.02, 0.05, 0.01]}),
    ("dare_ties", {"density": [0.4, 0.5, 0.6]}),
    ("dare_linear", {"density": [0.4, 0.5, 0.6], "rescale": False}),
    ("della", {"density": [0.4, 0.5, 0.6], "epsilon": [0.1, 0.1, 0.2]}),
    ("della_linear", {"density": [0.4, 0.5, 0.6], "epsilon": [0.1, 0.1, 0.2]}),
    # two models: masks, election and merge run as one pass (`pair_delta_merge_into`)
    ("ties", {"density": [0.4, 0.6]}),
    ("ties", {"density": [0.5, 0.5], "normalize": False, "lambda_": 0.7}),
    ("ties", {"density": [0.5, 0.5], "consensus_method": "count"}),
    ("breadcrumbs_ties", {"density": [0.6, 0.5], "gamma": [0.02, 0.01]}),
    ("dare_ties", {"density": [0.4, 0.6]}),
    ("della", {"density": [0.4, 0.6], "epsilon": [0.1, 0.2]}),
    ("breadcrumbs", {"density": [0.6, 0.5], "gamma": [0.02, 0.01]}),  # two models summed, no election
    ("della_linear", {"density": [0.4, 0.6], "epsilon": [0.1, 0.2]}),
    ("dare_linear", {"density": [0.4, 0.6], "rescale": False, "normalize": True}),
    # three and four models: one pass too (the loop generated for the count); the flags not covered above
    ("ties", {"density": [0.5, 0.4, 0.6], "normalize": False, "lambda_": 0.7}),
    ("dare_linear", {"density": [0.4, 0.5, 0.6], "rescale": False, "normalize": True}),
    # four models: one pass (generated loop; by count, the loop that elects by count); every kind
    # of mask and both elections
    ("ties", {"density": [0.4, 0.5, 0.6, 0.3]}),
    ("ties", {"density": [0.4, 0.5, 0.6, 0.3], "consensus_method": "count", "normalize": False, "lambda_": 0.7}),
    ("breadcrumbs_ties", {"density": [0.6, 0.5, 0.7, 0.4], "gamma": [0.02, 0.05, 0.01, 0.0]}),
    ("dare_linear", {"density": [0.4, 0.5, 0.6, 0.7], "rescale": False, "normalize": True}),
    ("della", {"density": [0.4, 0.5, 0.6, 0.5], "epsilon": [0.1, 0.1, 0.2, 0.1]}),
    # five models: one pass too
    ("ties", {"density": [0.4, 0.5, 0.6, 0.3, 0.5]}),
    ("ties", {"density": [0.4, 0.5, 0.6, 0.3, 0.5], "normalize": False, "lambda_": 0.7}),
    ("ties", {"density": [0.4, 0.5, 0.6, 0.3, 0.5], "consensus_method": "count"}),
    ("breadcrumbs", {"density": [0.6, 0.5, 0.7, 0.4, 0.6], "gamma": [0.02, 0.05, 0.01, 0.0, 0.03]}),
    ("dare_ties", {"density": [0.4, 0.5, 0.6, 0.7, 0.5]}),
    ("della_linear", {"density": [0.4, 0.5, 0.6, 0.5, 0.3], "epsilon": [0.1, 0.1, 0.2, 0.1, 0.1]}),
    # six and seven: one pass too; more than `_generated_loops.MAX_MODELS`: rows a block at a time
    ("ties", {"density": [0.4, 0.5, 0.6, 0.3, 0.5, 0.45]}),
    ("della_linear", {"density": [0.4, 0.5, 0.6, 0.5, 0.3, 0.45, 0.55], "epsilon": [0.1] * 7}),
    ("ties", {"density": [0.4, 0.5, 0.6, 0.3, 0.5, 0.45, 0.35, 0.55, 0.4, 0.5, 0.6, 0.3, 0.45]}),
]

WEIGHTS = [0.5, 0.3, 0.4, 0.6, 0.35, 0.25, 0.45, 0.55, 0.2, 0.3, 0.4, 0.5, 0.65]  # up to thirteen models' weights


def _fourth(models, base, dtype=None, seed=99):
    """The family's models and one more fine-tune (in `dtype`, default the others')."""
    g = torch.Generator().manual_seed(seed)
    fourth = base.float() + torch.randn(base.shape, generator=g) * 0.002
    return [*models, fourth.to(dtype or base.dtype)]


def _models(count, models, base, seed=99):
    """`count` of the family's models: its first ones, or all of them and more fine-tunes (seeds from `seed`)."""
    for extra_seed in range(seed, seed + count - len(models)):
        models = _fourth(models, base, seed=extra_seed)
    return models[:count]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_loops_equal_the_torch_path(method, params, dtype, torch_path, monkeypatch):
    models, base = _family(dtype)
    info = get_method(method)
    used = []
    compiled_merge = _task_vectors._compiled_merge
    monkeypatch.setattr(_task_vectors, "_compiled_merge", lambda *a, **k: used.append(1) or compiled_merge(*a, **k))

    count = len(params["density"])
    models = _models(count, models, base)
    if count == 2:  # opposite deltas where both are kept: their sum is 0, and the election decides
        models[1][:40] = (2 * base[:40].float() - models[0][:40].float()).to(dtype)

    def run():
        kwargs = {"weight": WEIGHTS[:count], **params, "compute_dtype": torch.float32}
        if info.random:
            kwargs["generator"] = torch.Generator().manual_seed(11)
        return info.func(models, base=base, **kwargs)

    compiled = run()
    assert used  # the loops did the merge
    with torch_path:
        reference = run()
    assert len(used) == 1
    assert compiled.dtype == reference.dtype == torch.float32
    if method in ("breadcrumbs", "dare_linear", "della_linear"):
        # without an election the loops round each weighted delta before adding it, where torch may fuse the
        # multiply and the add: each of the count terms may differ by half an ulp of itself, which where the
        # terms cancel is more than an ulp of their sum (five models: 1.9e-9 at an output of 1.1e-3); so up to
        # count ulps of the largest merged delta
        largest = float((reference - base.float()).abs().max())
        torch.testing.assert_close(compiled, reference, rtol=2.4e-7, atol=count * torch.finfo(torch.float32).eps * largest)
    else:
        assert torch.equal(compiled, reference)
    assert not torch.equal(compiled, base.float())  # the merge did something


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selection_finds_the_same_cuts(torch_path, dtype):
    # quantized (bf16) magnitudes: the k-th largest is shared by many entries, and the cut must end at the same
    # tie; five windows at once (counted, then gathered), and each alone (its count pass flags the gather)
    models, base = _family(dtype, seed=3)
    tv = _sparsify.TaskVector(models[0], base, torch.float32)
    n = tv.numel()
    ks = [1, n // 3, n // 2, n - 5, 777]
    for together in (ks, *[[k] for k in ks]):
        compiled = _sparsify.select_top(tv, together, _sparsify.CHUNK)
        with torch_path:
            reference = _sparsify.select_top(tv, together, _sparsify.CHUNK)
        assert [(c.threshold, c.tie_end) for c in compiled] == [(c.threshold, c.tie_end) for c in reference]
    fraction = _sparsify.select_top_fraction(tv, 0.37, _sparsify.CHUNK)
    with torch_path:
        expected = _sparsify.select_top_fraction(tv, 0.37, _sparsify.CHUNK)
    assert (fraction.threshold, fraction.tie_end) == (expected.threshold, expected.tie_end)


@pytest.mark.parametrize("seed", [3, 4])
def test_selection_split_across_threads_finds_the_cuts_of_one_thread(seed):
    # the compiled scan runs contiguous shares of the chunks on the threads; the tallies must add up in chunk
    # order, or a cut among tied magnitudes would end at another position
    models, base = _family(torch.bfloat16, seed=seed)
    tv = _sparsify.TaskVector(models[0], base, torch.float32)
    n = tv.numel()
    ks = [1, n // 3, n // 2, n - 5, 777]
    before = torch.get_num_threads()
    cuts = []
    try:
        for threads in (3, 1):
            torch.set_num_threads(threads)
            cuts.append([(c.threshold, c.tie_end) for c in _sparsify.select_top(tv, ks, _sparsify.CHUNK // 8)]
                        + [(c.threshold, c.tie_end) for c in [_sparsify.select_top_fraction(tv, 0.37, _sparsify.CHUNK // 8)]])
    finally:
        torch.set_num_threads(before)
    assert cuts[0] == cuts[1]


def test_windows_gather_keeps_everything_inside_narrow_open_and_several_windows():
    loops = _kernels.loops()
    rng = np.random.default_rng(0)
    model = rng.standard_normal(5003).astype(np.float32)  # not a multiple of 8: the flags' last word is partial
    base = np.zeros(5003, dtype=np.float32)
    a = np.abs(model)
    v = np.sort(a)
    cases = [[(v[2000], v[2000])], [(v[2000], v[2001])], [(v[10], v[4000])], [(-np.inf, v[100])], [(v[4900], np.inf)],
             [(v[1000], v[1100]), (v[2500], v[2600]), (v[1050], v[3000])]]  # three at once, two overlapping
    for windows in cases:
        lows = np.array([lo for lo, _ in windows], np.float32)
        highs = np.array([hi for _, hi in windows], np.float32)
        inside = [np.flatnonzero((a >= lo) & (a <= hi)) for lo, hi in zip(lows, highs)]
        capacity = max(x.size for x in inside) + 1
        values, positions = np.empty((len(windows), capacity), np.float32), np.empty((len(windows), capacity), np.int64)
        counts = np.zeros(len(windows), np.int64)
        loops.windows_gather(model, base, lows, highs, 100, values, positions, counts, sum(x.size for x in inside),
                             np.empty(5008, np.uint8), np.empty(5003, np.int32), np.empty(5003, np.float32))
        for w, expected in enumerate(inside):
            assert counts[w] == expected.size
            assert np.array_equal(positions[w, : counts[w]], expected + 100)
            assert np.array_equal(values[w, : counts[w]], a[expected])
            above, count, nonzero = loops.window_count(model, base, lows[w], highs[w])
            assert (above, count, nonzero) == (int((a > highs[w]).sum()), expected.size, 5003)


def test_windows_tally_counts_and_flags_as_one_window_at_a_time():
    # the one-pass tally of up to three windows gives window_count's counts per window, flags exactly the
    # entries inside the windows it gathers (not those of a counted-only window), and NaN in none; it stores
    # every entry's magnitude, from which gather_stored gathers what windows_gather gathers from the inputs
    loops = _kernels.loops()
    rng = np.random.default_rng(4)
    model = rng.standard_normal(5003).astype(np.float32)
    model[[3, 4000]] = np.nan
    model[[7, 8, 9]] = -np.inf
    base = np.zeros(5003, dtype=np.float32)
    a = np.abs(model)
    v = np.sort(a[~np.isnan(a)])
    for windows, gathers in [([(v[1000], v[1100]), (v[2500], v[2600])], [1, 1]),
                             ([(v[1000], v[1100]), (v[2500], v[2500]), (-np.inf, v[50])], [1, 0, 1]),
                             ([(v[4900], np.inf), (v[10], v[4000]), (v[1050], v[3000])], [1, 1, 1]),
                             ([(v[1000], v[1100]), (v[2500], v[2600]), (np.inf, np.inf)], [1, 1, 0]),  # a tie group at inf
                             ([(v[2000], v[2300])], [1]), ([(v[2000], v[2000])], [0])]:  # one window, gathered or counted
        padded = windows + [(np.nan, np.nan)] * (3 - len(windows))
        lows = np.array([lo for lo, _ in padded], np.float32)
        highs = np.array([hi for _, hi in padded], np.float32)
        tallies = np.zeros(7, np.int64)
        flags = np.full(5008, 7, np.uint8)
        stored = np.full(5003, -1, np.float32)
        loops.windows_tally(model, base, lows, highs, np.array(gathers + [0] * (3 - len(gathers)), np.uint8), len(windows), tallies, flags, stored)
        assert np.array_equal(stored, a, equal_nan=True)
        flagged = np.zeros(5003, bool)
        for w, (lo, hi) in enumerate(windows):
            above, inside, nonzero = loops.window_count(model, base, lows[w], highs[w])
            assert (tallies[w], tallies[3 + w], tallies[6]) == (above, inside, nonzero)
            if gathers[w]:
                flagged |= (a >= lows[w]) & (a <= highs[w])
        assert tallies[len(windows):3].sum() == 0 and tallies[3 + len(windows):6].sum() == 0  # padding
        assert np.array_equal(flags[:5003], flagged.astype(np.uint8)) and not flags[5003:].any()
        ws = [w for w, g in enumerate(gathers) if g]
        if not ws:
            continue
        counts = [int(tallies[3 + w]) for w in ws]
        rows = [np.empty((len(ws), max(counts) + 1), dt) for dt in (np.float32, np.int64)] * 2
        found = [np.zeros(len(ws), np.int64) for _ in range(2)]
        loops.gather_stored(stored, lows[ws], highs[ws], 100, rows[0], rows[1], found[0], sum(counts), flags,
                            np.empty(5003, np.int32), np.empty(5003, np.float32))
        loops.windows_gather(model, base, lows[ws], highs[ws], 100, rows[2], rows[3], found[1], sum(counts),
                             np.empty(5008, np.uint8), np.empty(5003, np.int32), np.empty(5003, np.float32))
        assert found[0].tolist() == found[1].tolist() == counts
        for r, c in enumerate(counts):
            assert np.array_equal(rows[0][r, :c], rows[2][r, :c]) and np.array_equal(rows[1][r, :c], rows[3][r, :c])


@pytest.mark.parametrize("cut,expected", [
    (_sparsify.ALL, [True, True, True, True]),
    (_sparsify.NONE, [False, False, False, False]),
    (_sparsify.Cut(0.5, tie_end=12), [False, True, True, False]),  # 0.5 at positions 11 (in) and 12 (out)
    (_sparsify.Cut(0.0), [True, True, True, True]),
])
def test_cut_bounds_give_the_cut_membership(cut, expected):
    # magnitudes 0.25, 0.5, 0.75, 0.5 at flat positions 10..13: the bounds must say what mask_into says
    a = np.array([0.25, 0.5, 0.75, 0.5], dtype=np.float32)
    ge, gt, split = cut.bounds(10)
    members = [bool(x > (ge if i < split else gt)) for i, x in enumerate(a)]
    assert members == expected
    mask = cut.mask_into(torch.from_numpy(a.copy()), 10, torch.empty(4))
    assert members == ([True] * 4 if mask is None else mask.bool().tolist())



@pytest.mark.parametrize("consensus", ["sum", "weighted", None])
@pytest.mark.parametrize("masks", ["stored", "bounds"])
def test_the_two_model_pass_equals_the_per_model_loops_bit_for_bit(consensus, masks):
    # pair_delta_merge_into against weighted_delta on each model then the general consensus_into (TIES),
    # weighted_consensus_into (SCE) or sum_into,
    # on bf16 inputs as stored (ties at the bounds, deltas of opposite signs, zeros), both ways of masking
    loops = _kernels.loops()
    g = torch.Generator().manual_seed(3)
    n = 5000
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(n, generator=g) * 0.004).to(torch.bfloat16) for _ in range(2)]
    models[1][:300] = (2 * base[:300].float() - models[0][:300].float()).to(torch.bfloat16)  # sums of 0
    models[0][300:400] = base[300:400]
    inputs = [_sparsify.loop_operand(t) for t in (*models, base)]
    if masks == "stored":
        stored = [(torch.rand(n, generator=g) < p).numpy().view(np.uint8) for p in (0.4, 0.7)]
        bounds = [(np.float32(-np.inf), np.float32(-np.inf), 0, np.float32(np.inf), np.float32(np.inf), 0)] * 2
    else:
        stored = [np.empty(0, np.uint8)] * 2
        t = np.float32(0.004)
        bounds = [(np.nextafter(t, np.float32(0)), t, 2500, np.float32(0.01), np.float32(0.01), 0),
                  (np.float32(0.002), np.float32(0.002), 0, np.nextafter(np.float32(0.02), np.float32(0)), np.float32(0.02), 4000)]
    factors = np.array([1.25, 0.6, 0.8, 0.3], dtype=np.float32)
    weights = factors[1::2].copy() if consensus != "weighted" else np.array([0.45, 0.55], dtype=np.float32)
    apart = _sparsify.ANY_DISTANCE  # SCE: also a cut on the models' distance, with a tie split
    expected_masks = stored
    if consensus == "weighted":
        t = np.float32(0.006)
        apart = (np.nextafter(t, np.float32(0)), t, 2000)
        cut = np.empty(n, dtype=np.uint8)
        loops.cut_mask(inputs[0], inputs[1], *apart, cut)
        assert 0 < cut.mean() < 1
        expected_masks = [cut & mask if mask.size else cut for mask in stored]
    deltas = np.empty((2, n), dtype=np.float32)
    for j in range(2):
        loops.weighted_delta(inputs[j], inputs[2], *bounds[j], expected_masks[j], factors[2 * j], factors[2 * j + 1], deltas[j])
    scale, divisor = np.float32(0.7), np.float32(0.9)
    expected = np.empty(n, dtype=np.float32)
    votes, divisors = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    if consensus == "sum":
        loops.consensus_into(deltas, n, weights, False, True, scale, inputs[2], votes, divisors, expected)
    elif consensus == "weighted":
        scale, divisor = np.float32(1), np.float32(0.3)  # SCE: no scale; the divisor's floor, above some sums
        loops.weighted_consensus_into(deltas, n, weights, False, divisor, inputs[2], votes, divisors, expected)
    else:
        loops.sum_into(deltas, n, True, divisor, scale, inputs[2], expected)
    how = (consensus is not None, consensus == "weighted", True)
    got = np.empty(n, dtype=np.float32)
    loops.pair_delta_merge_into(*inputs, *bounds, *stored, apart, factors, weights, how, divisor, scale, got)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    rounded = torch.empty(n, dtype=torch.bfloat16)  # into a bf16 output: the same values rounded once
    loops.pair_delta_merge_into(*inputs, *bounds, *stored, apart, factors, weights, how, divisor, scale,
                                rounded.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(rounded.view(torch.int16), torch.from_numpy(expected).to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("stored", [False, True])
def test_pair_square_sums_are_numpys_sums_of_the_selected_squares(stored):
    # SCE's energies of two models: the selected deltas (distance cut with its tie split inside a span of
    # leaves, a stored mask) squared and summed, bit for bit as numpy sums the masked squares; a chunk of many
    # spans with a ragged end
    g = torch.Generator().manual_seed(8)
    n = (1 << 18) + 77
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(n, generator=g) * 0.004).to(torch.bfloat16) for _ in range(2)]
    inputs = [_sparsify.loop_operand(t) for t in (*models, base)]
    distance = np.abs((models[0].float() - models[1].float()).numpy())
    t = np.float32(np.median(distance))  # a distance many entries have: ties on both sides of the split
    assert (distance[:100_001] == t).sum() > 100 and (distance[100_001:] == t).sum() > 100
    apart = (np.nextafter(t, np.float32(0)), t, 100_001)
    selected = np.empty(n, dtype=np.uint8)
    _kernels.loops().cut_mask(inputs[0], inputs[1], *apart, selected)
    keep = (torch.rand(n, generator=g) < 0.6).numpy().view(np.uint8) if stored else np.empty(0, np.uint8)
    if stored:
        selected &= keep
    assert 0 < selected.mean() < 1
    sums = np.empty(2, dtype=np.float32)
    _kernels.loops().pair_square_sums(*inputs, keep, apart, sums)
    for j in range(2):
        delta = (models[j].float() - base.float()).numpy() * selected
        assert sums[j] == np.add.reduce(np.square(delta))


@pytest.mark.parametrize("count", [2, 3, 4, 5])
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_of_two_to_five_takes_the_one_pass_in_mergekits_order(count, normalize, monkeypatch):
    # plain task arithmetic of two to five models runs the one-pass loops: each weighted delta rounded, then
    # added in model order, divided, scaled and added to the base, one rounding each (mergekit's
    # (weights * deltas).sum(0)); a bf16 output is that result rounded once
    models, base = _family(torch.float32)
    models = _models(5, models, base)
    weights = [0.6, 0.3, 0.45, 0.2, 0.35][:count]
    used = []
    compiled_merge = _task_vectors._compiled_merge
    monkeypatch.setattr(_task_vectors, "_compiled_merge", lambda *a, **k: used.append(1) or compiled_merge(*a, **k))
    run = lambda **kw: get_method("task_arithmetic").func(models[:count], base=base, weight=weights, normalize=normalize,
                                                          lambda_=0.8, compute_dtype=torch.float32, **kw)
    got, rounded = run(), run(output_dtype=torch.bfloat16)
    assert len(used) == 2
    mixed = (models[0] - base) * weights[0]
    for model, w in zip(models[1:count], weights[1:]):
        mixed = mixed + (model - base) * w
    if normalize:
        mixed = mixed / torch.tensor(sum(weights), dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, mixed * 0.8 + base)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded.view(torch.int16), got.to(torch.bfloat16).view(torch.int16))


def test_weighted_delta_keeps_ties_before_the_split_only():
    # every magnitude equals the threshold: positions before the split are kept, from it on dropped; the
    # drop bound removes the largest; a stored mask removes what it says; the rest is scaled, then weighted
    loops = _kernels.loops()
    model = np.array([0.5, -0.5, 0.5, -0.5, 0.5, 0.5, 2.0, -0.5], dtype=np.float32)
    base = np.zeros(8, dtype=np.float32)
    keep_ge, keep_gt = np.nextafter(np.float32(0.5), np.float32(0)), np.float32(0.5)
    out = np.empty(8, dtype=np.float32)
    no_drop = (np.float32(np.inf), np.float32(np.inf), 0)
    loops.weighted_delta(model, base, keep_ge, keep_gt, 3, *no_drop, np.empty(0, np.uint8), np.float32(2), np.float32(0.25), out)
    assert out.tolist() == [0.25, -0.25, 0.25, 0, 0, 0, 1.0, 0]
    drop_top = (np.float32(1.0), np.float32(1.0), 0)
    stored = np.array([1, 0, 1, 1, 1, 1, 1, 1], dtype=np.uint8)
    loops.weighted_delta(model, base, keep_ge, keep_gt, 5, *drop_top, stored, np.float32(1), np.float32(1), out)
    assert out.tolist() == [0.5, 0, 0.5, -0.5, 0.5, 0, 0, 0]


@pytest.mark.parametrize("count,loop", [(6, "generated"), (13, "rows_merge_into")])
def test_plain_task_arithmetic_of_many_models_merges_in_mergekits_order(count, loop, monkeypatch):
    # no mask and no election: the generated loop's or `rows_merge_into`'s sum, each weighted delta rounded,
    # then added in model order and scaled, one rounding each (mergekit's (weights * deltas).sum(0))
    models, base = _family(torch.float32)
    models = _models(count, models, base)
    weights = WEIGHTS[:count]
    calls = []
    _count_calls(monkeypatch, loop, calls)
    got = get_method("task_arithmetic").func(models, base=base, weight=weights, lambda_=0.8, compute_dtype=torch.float32)
    assert calls
    mixed = (models[0] - base) * weights[0]
    for model, w in zip(models[1:], weights[1:]):
        mixed = mixed + (model - base) * w
    assert torch.equal(got, mixed * 0.8 + base)


def test_bfloat16_rounding_is_torchs_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    normal = torch.randn(100_000, generator=g) * torch.pow(2.0, torch.randint(-140, 128, (100_000,), generator=g).float())
    bf = torch.randn(1000, generator=g).to(torch.bfloat16).float()
    halfway = (bf.view(torch.int32) + 0x8000).view(torch.float32)  # exactly between two bf16 values: ties to even
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.4028235e38, -3.4028235e38, 1e-45, -1e-45,
                            1.1754942e-38, 3.3961776e38, 3.3961775e38])
    values = torch.cat([normal, bf, halfway, halfway.neg(), special])
    out = torch.empty(values.numel(), dtype=torch.bfloat16)
    _kernels.loops().to_bfloat16(values.numpy(), out.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(out.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))
    nan = torch.tensor([float("nan"), -float("nan")])
    _kernels.loops().to_bfloat16(nan.numpy(), out[:2].view(torch.int16).numpy().view(np.uint16))
    assert out[:2].isnan().all()


@pytest.mark.parametrize("method,params", [CASES[0], CASES[3], CASES[5], CASES[9], CASES[13], CASES[14], CASES[15], CASES[20], CASES[23],
                                           CASES[25], CASES[28], CASES[31]],
                         ids=["ties", "breadcrumbs", "dare_ties", "ties-pair", "dare_ties-pair", "della-pair", "breadcrumbs-pair",
                              "ties-four", "dare_linear-four", "ties-five", "breadcrumbs-five", "ties-six"])
def test_a_bfloat16_output_is_the_float32_result_rounded_once(method, params, torch_path):
    # every model count: the loops round each result as they store it (`narrow`)
    models, base = _family(torch.bfloat16)
    count = len(params["density"])
    models = _models(count, models, base)
    info = get_method(method)

    def run(**extra):
        kwargs = {"weight": [0.5, 0.3, 0.4, 0.6, 0.35, 0.25][:count], **params, "compute_dtype": torch.float32, **extra}
        if info.random:
            kwargs["generator"] = torch.Generator().manual_seed(11)
        return info.func(models, base=base, **kwargs)

    assert info.rounds_output
    rounded = run(output_dtype=torch.bfloat16)
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded.view(torch.int16), run().to(torch.bfloat16).view(torch.int16))
    with torch_path:  # the torch path leaves the rounding to the caller
        assert run(output_dtype=torch.bfloat16).dtype == torch.float32


def _count_calls(monkeypatch, loop: str, calls: list) -> None:
    """Append to `calls` on each call of the named compiled loop, or of a generated one-pass loop ("generated")."""
    if loop == "generated":
        load = _generated_loops.merge_loop
        monkeypatch.setattr(_generated_loops, "merge_loop",
                            lambda count, by_count=False: lambda *a: calls.append(loop) or load(count, by_count)(*a))
        return
    loops = _kernels.loops()
    monkeypatch.setattr(loops, loop, lambda *a, _loop=getattr(loops, loop): calls.append(loop) or _loop(*a))


@pytest.mark.parametrize("count,loop", [(4, "generated"), (6, "generated"), (13, "rows_merge_into")])
def test_models_of_mixed_dtypes_stay_on_the_loops_as_on_torch(count, loop, torch_path, monkeypatch):
    # the one-pass loop takes each model's dtype, and `rows_merge_into` unrolls its loop over the models, so a
    # float32 fine-tune among bf16 ones stays on them
    models, base = _family(torch.bfloat16)
    models = _models(count, _fourth(models, base, torch.float32), base, seed=7)
    calls = []
    _count_calls(monkeypatch, loop, calls)
    run = lambda: get_method("ties").func(models, base=base, weight=WEIGHTS[:count],
                                          density=([0.4, 0.5, 0.6, 0.3, 0.5, 0.45] * 3)[:count], compute_dtype=torch.float32)
    compiled = run()
    assert calls
    with torch_path:
        reference = run()
    assert torch.equal(compiled, reference) and not torch.equal(compiled, base.float())


_ELECTIONS = [(True, False, True), (True, False, False), (True, True, True)]  # elect, weigh (SCE), normalize


@pytest.mark.parametrize("how,by_count", [(how, False) for how in _ELECTIONS + [(False, False, True), (False, False, False)]]
                         + [(how, True) for how in _ELECTIONS])  # the sign elected by sum, or by count
@pytest.mark.parametrize("count", [3, 4, 5, 6, 8])
def test_the_generated_one_pass_loops_equal_the_rows_bit_for_bit(how, by_count, count):
    # the loop generated for the count against rows_merge_into (each model's weighted_delta row, then consensus_into,
    # weighted_consensus_into or sum_into) on bf16 inputs as stored: cuts with ties split by position, stored
    # masks, deltas summing to zero, unchanged entries
    loops = _kernels.loops()
    g = torch.Generator().manual_seed(5)
    n = 5000
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(n, generator=g) * 0.004).to(torch.bfloat16) for _ in range(count)]
    models[1][:300] = (2 * base[:300].float() - models[0][:300].float()).to(torch.bfloat16)
    models[2][300:400] = base[300:400]
    inputs = [_sparsify.loop_operand(t) for t in models]
    below = _sparsify.loop_operand(base)
    inf, t = np.float32(np.inf), np.float32(0.004)
    bounds = [(np.nextafter(t, np.float32(0)), t, 2500, np.float32(0.01), np.float32(0.01), 0),
              (np.float32(0.002), np.float32(0.002), 0, np.nextafter(np.float32(0.02), np.float32(0)), np.float32(0.02), 4000),
              (-inf, -inf, 0, inf, inf, 0), (np.float32(0.003), np.float32(0.003), 0, inf, inf, 0),
              (np.float32(0.001), np.float32(0.002), 1200, np.float32(0.015), np.float32(0.015), 0)] * 2
    bounds = bounds[:count]
    stored = [np.empty(0, np.uint8), np.empty(0, np.uint8), (torch.rand(n, generator=g) < 0.6).numpy().view(np.uint8),
              (torch.rand(n, generator=g) < 0.3).numpy().view(np.uint8),
              (torch.rand(n, generator=g) < 0.5).numpy().view(np.uint8)] * 2
    stored = stored[:count]
    pairs = ([(1.25, 0.6), (0.8, 0.3), (1.0, 0.45), (1.1, 0.2), (0.9, 0.35)] * 2)[:count]
    weights = np.array(([0.45, 0.55, 0.35, 0.25, 0.4] * 2)[:count], dtype=np.float32)
    elect, weigh, normalize = how
    scale, divisor = (np.float32(1), np.float32(0.3)) if weigh else (np.float32(0.7), np.float32(0.9))
    limits = np.array([(b[0], b[1], b[3], b[4]) for b in bounds], dtype=np.float32)
    splits = np.array([(b[2], b[5]) for b in bounds], dtype=np.int64)
    rows, scratch = _kernels.rows_scratch(count)
    expected = np.empty(n, dtype=np.float32)
    loops.rows_merge_into(tuple(inputs), below, limits, splits, tuple(stored), np.array(pairs, dtype=np.float32), weights,
                          (elect, weigh, by_count, normalize and not weigh), divisor, scale, rows, scratch, expected)
    got = np.empty(n, dtype=np.float32)
    factors = np.array([x for pair in pairs for x in pair], dtype=np.float32)
    _generated_loops.merge_loop(count, by_count)(tuple(inputs), below, tuple(bounds), tuple(stored), factors, weights, how,
                                                 divisor, scale, got)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert not np.array_equal(got, below.view(np.int16).astype(np.int32) << 16)  # the deltas did something


@pytest.mark.parametrize("cols", [333, 16, 7, 2])  # rows not a whole number of lanes, a whole number, fewer
def test_partner_keep_draws_the_words_lane_words_hands_out(cols):
    # blocks of rows one after the other from one stream of lanes, tied magnitudes, a row of one tied group
    g = torch.Generator().manual_seed(4)
    rows = 9
    mags = (torch.randn(2, rows, cols, generator=g) * 0.01).to(torch.bfloat16).float().abs()  # many ties
    mags[0, 2, :] = 0
    keep = _sparsify.PartnerKeep(cols, 0.45, 0.2, torch.float32)
    words, state = _sparsify.LaneWords(77), _sparsify.lane_state(77)
    kept = []
    for block in mags:
        expected = keep(block, keep.prepare(words.next_rows(rows, cols)), torch.empty(rows, cols, dtype=torch.bool))
        got = keep.compiled_into(block, state, torch.empty(rows, cols, dtype=torch.bool))
        assert torch.equal(got, expected)
        kept.append(got)
    assert np.array_equal(state, words.state)  # both advanced the lanes alike
    assert 0.25 < torch.stack(kept).float().mean() < 0.65


@pytest.mark.parametrize("cols", [333, 48, 7, 2])  # a tail after whole steps, whole steps only, no whole step
def test_della_keep_test_is_the_same_with_vector_gathers_and_scalar_loads(cols):
    # the gather path (one vector pass a step) and the scalar path (partners, loads, tests in passes) are chosen
    # by machine (`_kernels.vector_gathers`): same masks, same kept magnitudes, same advanced lanes
    loops = _kernels.loops()
    g = torch.Generator().manual_seed(12)
    rows = 10
    base = (torch.randn(rows * cols, generator=g) * 0.02).to(torch.bfloat16)
    model = (base.float() + torch.randn(rows * cols, generator=g) * 0.003).to(torch.bfloat16)
    model[5] = base[5]  # a zero magnitude, and ties from the bf16 rounding
    keep = _sparsify.PartnerKeep(cols, 0.5, 0.2, torch.float32)
    operands = _sparsify.TaskVector(model, base, torch.float32).operands(0, rows * cols)
    results = []
    for gather in (True, False):
        state, out, sums = _sparsify.lane_state(3), np.empty((rows, cols), dtype=np.bool_), np.empty((rows, 2), dtype=np.float32)
        loops.della_rows(*operands, state, keep.low, keep.high, gather, out, sums)
        again = np.empty((rows, cols), dtype=np.bool_)
        loops.partner_keep((model.float() - base.float()).abs().numpy().view(np.int32).reshape(rows, cols), _sparsify.lane_state(3),
                           keep.low, keep.high, gather, again)
        assert np.array_equal(out, again)
        results.append((out, sums, state))
    (mask, sums, state), (mask_s, sums_s, state_s) = results
    assert np.array_equal(mask, mask_s) and np.array_equal(sums, sums_s) and np.array_equal(state, state_s)
    assert 0.2 < mask.mean() < 0.8


# numpy 2.3 sums a long contiguous float32 run as one pairwise run; earlier versions in pieces of 8192 (`_sums`)
NUMPY_SUMS_WHOLE = tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 3)


def test_run_sums_takes_the_pairwise_order_on_any_numpy():
    # long runs are halved as numpy's pairwise sum halves them, so every numpy version sums the same pieces;
    # rows are summed as each row alone is
    from mergesmith.methods._sums import PIECE, run_sums

    rng = np.random.default_rng(9)
    for n in (7, PIECE, PIECE + 8, 11008, 262144):
        x = (np.abs(rng.standard_normal(n)) * rng.uniform(1e-3, 1e4, n)).astype(np.float32)
        half = n // 2 - (n // 2) % 8
        expected = np.add.reduce(x) if n <= PIECE else np.float32(run_sums(x[:half]) + run_sums(x[half:]))
        assert run_sums(x) == expected, n
        if NUMPY_SUMS_WHOLE:
            assert run_sums(x) == np.add.reduce(x), n
        rows = np.stack([x, x[::-1]])
        assert np.array_equal(run_sums(rows), [run_sums(x), run_sums(x[::-1].copy())]), n
    x = (np.abs(rng.standard_normal(3 * PIECE)) * 1e4).astype(np.float32)
    pieces = np.float32(np.float32(np.add.reduce(x[:PIECE]) + np.add.reduce(x[PIECE : 2 * PIECE])) + np.add.reduce(x[2 * PIECE :]))
    assert run_sums(x) != pieces  # not the order of summing 8192-entry pieces in sequence (numpy < 2.3's)


def test_planned_sum_adds_in_numpys_order():
    # DELLA's compiled row sums must equal numpy's bit for bit (the rescale factor, and so the merge, would
    # move by an ulp between the paths): every way a run splits (below 8, blocks of 8 up to 128, halvings,
    # leaves summed four at a time or one by one), from an unaligned start
    from mergesmith.methods import _kernel_loops
    from mergesmith.methods._sums import PIECE, run_sums

    rng = np.random.default_rng(5)
    for n in [*range(0, 300), 511, 1000, 2000, 2048, 4097, 5632, 11008, 262144]:
        x = (np.abs(rng.standard_normal(n + 3)) * rng.uniform(1e-3, 1e4, n + 3)).astype(np.float32)
        leaves, adds = _kernel_loops.sum_plan(n)
        assert leaves[0, 0] == 0 and (leaves[0, 1:] == np.cumsum(leaves[1])[:-1]).all() and leaves[:, -1].sum() == n, n
        assert (leaves[1] <= 128).all() and adds.shape[1] == leaves.shape[1] - 1, n
        total = _kernel_loops.planned_sum(x[3:], leaves, adds, _kernel_loops.sum_scratch(leaves))
        assert np.float32(total) == run_sums(x[3:]), n  # the numpy paths' sums
        if NUMPY_SUMS_WHOLE or n <= PIECE:
            assert np.float32(total) == np.add.reduce(x[3:]), n
    assert np.add.reduce(x[3:]) != np.cumsum(x[3:])[-1]  # the order matters: one sum in sequence differs


@pytest.mark.parametrize("cols", [333, 7, 48])
def test_della_rows_test_and_sum_what_the_separate_passes_do(cols):
    # one loop (magnitudes, keep test, row sums) against the magnitudes pass, partner_keep and numpy's row sums
    g = torch.Generator().manual_seed(6)
    rows = 12
    base = (torch.randn(rows * cols, generator=g) * 0.02).to(torch.bfloat16)
    model = (base.float() + torch.randn(rows * cols, generator=g) * 0.003).to(torch.bfloat16)
    model[cols + 3] = float("nan")  # a NaN row sums to NaN on both paths
    tv = _sparsify.TaskVector(model, base, torch.float32)
    keep = _sparsify.PartnerKeep(cols, 0.5, 0.15, torch.float32)
    got = torch.empty(rows * cols, dtype=torch.bool)
    state = _sparsify.lane_state(9)
    sums = keep.compiled_rows(tv, 0, rows * cols, state, got)

    mags = tv.magnitudes(0, rows * cols, tv.buffer(rows * cols), tv.buffer(rows * cols)).view(rows, cols)
    expected = keep.compiled_into(mags, _sparsify.lane_state(9), torch.empty(rows, cols, dtype=torch.bool))
    norms = _sparsify.L1Norms(torch.device("cpu"))
    norms.add_rows(mags.clone(), expected)
    assert torch.equal(got.view(rows, cols), expected)
    x = mags.numpy()
    assert np.array_equal(sums[:, 0], np.add.reduce(x, axis=1), equal_nan=True)
    assert np.array_equal(sums[:, 1], np.add.reduce(x * expected.numpy(), axis=1), equal_nan=True)
    assert np.isnan(sums[1]).all() and not np.isnan(np.delete(sums, 1, axis=0)).any()
    clean = np.delete(sums, 1, axis=0)
    assert 0.35 < (clean[:, 1] / clean[:, 0]).mean() < 0.8  # about half the entries, the larger more often


def test_lane_words_follow_the_documented_streams():
    # rows drawn in blocks of any size give the words of drawing them all at once, and those are the lanes'
    import _tv_ref as ref

    whole = ref.lane_words(torch.Generator().manual_seed(3), 5, 21)
    lanes = _sparsify.LaneWords(_sparsify.stream_seed(torch.Generator().manual_seed(3)))
    parts = [lanes.next_rows(r, 21).numpy().reshape(r, 21, 2) for r in (2, 1, 2)]
    assert np.array_equal(np.concatenate(parts), whole)


def test_partner_keep_prepares_the_same_in_torch_as_in_numpy():
    # the torch preparation serves other devices (a CUDA generator's words); the same words, the same tests
    keep = _sparsify.PartnerKeep(50, 0.3, 0.1, torch.float32)
    words = torch.from_numpy(np.random.default_rng(1).integers(-(2**31), 2**31, 2 * 4 * 50, dtype=np.int64).astype(np.int32))
    for numpy_part, torch_part in zip(keep.prepare(words), keep.prepare_in_torch(words)):
        assert torch.equal(numpy_part.view(-1), torch_part.reshape(-1).to(numpy_part.dtype))


@pytest.mark.parametrize("counts", [(1 << 14, 2 << 14, 1001), (7,), (1 << 14, 5), (1 << 14, (2 << 14) + 1001)])  # whole blocks, then the end
def test_bernoulli_rows_draws_the_lane_words_in_blocks_and_sums_as_numpy(counts):
    from mergesmith.methods._kernels import KEEP_BLOCK

    words = _sparsify.LaneWords(5)
    state, threshold = _sparsify.LaneWords(5).state, _sparsify.Bernoulli(0.3).threshold
    draws = np.empty((2, KEEP_BLOCK // 2), dtype=np.int32)
    g = torch.Generator().manual_seed(3)
    kept = []
    for count in counts:
        base = torch.randn(count, generator=g).to(torch.bfloat16)
        model = (base.float() + torch.randn(count, generator=g) * 0.01).to(torch.bfloat16)
        got, sums = np.empty(count, dtype=np.bool_), np.empty((1, 2), dtype=np.float32)
        with_sums = count % 2 == 1  # the keep test alone when there are no sums to fill
        _kernels.loops().bernoulli_rows(*_sparsify.TaskVector(model, base, torch.float32).operands(0, count), state, threshold,
                                        draws, got, sums[: int(with_sums)])
        assert np.array_equal(got, words.block_words(count) < threshold)
        if with_sums:  # L1Norms.add's numpy sums, bit for bit
            magnitudes = (model.float() - base.float()).abs().numpy()
            assert sums[0, 0] == np.add.reduce(magnitudes) and sums[0, 1] == np.add.reduce(magnitudes * got)
        kept.append(got)
    assert np.array_equal(state, words.state)
    if sum(counts) > 1000:
        assert 0.28 < np.concatenate(kept).mean() < 0.32


CACHE_PROBE = """
import torch
from mergesmith.methods import _kernels
from mergesmith.methods.registry import get_method
g = torch.Generator().manual_seed(0)
base = (torch.randn(700, 640, generator=g) * 0.02).to(torch.bfloat16)
models = [(base.float() + torch.randn(base.shape, generator=g) * 0.002).to(torch.bfloat16) for _ in range(2)]
for name in ("ties", "breadcrumbs", "dare_linear", "della", "sce"):
    kwargs = {"weight": [0.5, 0.5], "density": [0.5, 0.5], "compute_dtype": torch.float32, "output_dtype": torch.bfloat16}
    if name == "sce":
        kwargs = {"select_topk": 0.5, "compute_dtype": torch.float32, "output_dtype": torch.bfloat16}
    if get_method(name).random:
        kwargs["generator"] = torch.Generator().manual_seed(1)
    get_method(name).func(models, base=base, **kwargs)
get_method("ties").func(models + models[:1], base=base, weight=[0.5] * 3, density=[0.5] * 3, compute_dtype=torch.float32)  # three: one pass
get_method("ties").func(models * 2, base=base, weight=[0.5] * 4, density=[0.5] * 4, compute_dtype=torch.float32)  # four: one pass
get_method("ties").func(models * 2, base=base, weight=[0.5] * 4, density=[0.5] * 4, consensus_method="count", compute_dtype=torch.float32)  # by count: one pass
get_method("ties").func(models, base=base, weight=[0.5] * 2, density=[0.5] * 2, consensus_method="count", compute_dtype=torch.float32)  # two by count: rows_merge_into
get_method("sce").func(models + models[:1], base=base, select_topk=0.5, compute_dtype=torch.float32)  # three: one pass
get_method("sce").func(models * 2, base=base, select_topk=0.5, compute_dtype=torch.float32)  # four: one pass
get_method("sce").func(models * 2 + models[:1], base=base, select_topk=0.5, compute_dtype=torch.float32)  # five: one pass each
get_method("sce").func(models * 3, base=base, select_topk=0.5, compute_dtype=torch.float32)  # six: one pass each
get_method("sce").func(models * 6 + models[:1], base=base, select_topk=0.5, compute_dtype=torch.float32)  # thirteen: the rows
get_method("sce").func(models, base=base, select_topk=0.5, consensus_method="count", compute_dtype=torch.float32)  # cut_mask
get_method("dare_linear").func(models * 2, base=base, weight=[0.5] * 4, density=[0.5] * 4,
                               compute_dtype=torch.float32, generator=torch.Generator().manual_seed(1))  # four, summed
# della on a 3-D tensor: the keep test on magnitudes already computed
get_method("della").func([m.view(70, 10, 640) for m in models], base=base.view(70, 10, 640), weight=[0.5, 0.5],
                         density=[0.5, 0.5], compute_dtype=torch.float32, generator=torch.Generator().manual_seed(1))
get_method("arcee_fusion").func(models[:1], base=base, compute_dtype=torch.float32, output_dtype=torch.bfloat16)
get_method("ramplus_tl").func(models, base=base, compute_dtype=torch.float32, output_dtype=torch.bfloat16)
get_method("ramplus_tl").func(models + models[:1], base=base, compute_dtype=torch.float32)  # three: one pass
get_method("ramplus_tl").func(models * 2, base=base, compute_dtype=torch.float32)  # four: the general tallies
get_method("model_stock").func(models, base=base, compute_dtype=torch.float32, output_dtype=torch.bfloat16)
get_method("model_stock").func(models + models[:1], base=base, compute_dtype=torch.float32)  # three: their products
get_method("model_stock").func(models * 2, base=base, compute_dtype=torch.float32)  # four: product_sums
get_method("multislerp").func(models, base=base, weight=[0.5, 0.5], compute_dtype=torch.float32, output_dtype=torch.bfloat16)
get_method("multislerp").func(models + models[:1], base=base, weight=[0.5] * 3, compute_dtype=torch.float32)  # three
from mergesmith.methods._sparsify import TaskVector, chunk_size, select_top
n = base.numel()  # four windows at once: counted one by one, then gathered by windows_gather
select_top(TaskVector(models[0], base, torch.float32), [n // 5, 2 * n // 5, 3 * n // 5, 4 * n // 5], chunk_size(base))
loops = _kernels.loops()
from mergesmith.methods import _generated_loops
compiled = {name: getattr(loops, name) for name in _kernels.LOOPS if name not in _kernels.INNER_LOOPS}
compiled.update({f"generated for {count}": _generated_loops.merge_loop(count) for count in (3, 4, 5, 6)})
compiled["generated for 4, by count"] = _generated_loops.merge_loop(4, by_count=True)
compiled.update({f"variance for {count}": _generated_loops.variance_loop(count) for count in (3, 5, 6)})
print({name: (sum(loop.stats.cache_hits.values()), sum(loop.stats.cache_misses.values())) for name, loop in compiled.items()})
"""


def test_every_loop_loads_from_numbas_cache_in_a_new_process():
    # a loop numba cannot cache is compiled again by every merge (0.5 s each); run twice so the first may compile
    import ast
    import subprocess
    import sys

    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHE_PROBE], capture_output=True, text=True, check=True)
    counts = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert all(hits >= 1 and misses == 0 for hits, misses in counts.values()), counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(700, 640), (448_000,), (35, 20, 640)])  # several chunks; 1-D; rows of a 3-D
def test_model_stock_loops_equal_the_torch_path(dtype, filter_wise, shape, torch_path, monkeypatch):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(448_000, generator=g) * 0.02
    shared = torch.randn(448_000, generator=g) * 0.002  # task vectors at an angle below 90°: 0 < t < 1
    models = [(base + shared + torch.randn(448_000, generator=g) * 0.002).to(dtype).reshape(shape) for _ in range(2)]
    base = base.to(dtype).reshape(shape)
    model_stock = get_method("model_stock").func
    loops, calls = _kernels.loops(), []
    for name in ("pair_product_sums", "stock_into"):  # count the loops' calls to see they did the work
        monkeypatch.setattr(loops, name, lambda *a, _loop=getattr(loops, name), _name=name: calls.append(_name) or _loop(*a))
    compiled = model_stock(models, base=base, filter_wise=filter_wise, compute_dtype=torch.float32)
    rounded = model_stock(models, base=base, filter_wise=filter_wise, compute_dtype=torch.float32, output_dtype=torch.bfloat16)
    assert {"pair_product_sums", "stock_into"} <= set(calls)
    with torch_path:
        reference = model_stock(models, base=base, filter_wise=filter_wise, compute_dtype=torch.float32)
    assert compiled.dtype == reference.dtype == torch.float32
    assert torch.equal(compiled, reference) and not torch.equal(compiled, base.float())
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded.view(torch.int16), reference.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method, count", [("slerp", 2), ("karcher", 2), ("nuslerp", 2), ("karcher", 3), ("karcher", 5)])
def test_the_gram_of_two_or_more_models_on_the_loop_equals_the_torch_path(method, count, dtype, torch_path, monkeypatch):
    g = torch.Generator().manual_seed(7)
    models = [(torch.randn(700, 640, generator=g) * 0.02).to(dtype) for _ in range(count)]
    if method == "slerp":  # the base is one end, the other model the other
        run = lambda: get_method(method).func(models[1:], base=models[0], t=0.3, compute_dtype=torch.float32)
    else:
        kwargs = {} if method == "karcher" else {"weight": [0.3, 0.6]}
        run = lambda: get_method(method).func(models, compute_dtype=torch.float32, **kwargs)
    calls, loop = [], {2: "pair_product_sums", 3: "triple_product_sums"}.get(count, "product_sums")
    monkeypatch.setattr(_kernels.loops(), loop, lambda *a, _loop=getattr(_kernels.loops(), loop): calls.append(1) or _loop(*a))
    compiled = run()
    assert calls
    with torch_path:
        reference = run()
    assert torch.equal(compiled, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method, count", [("multislerp", 2), ("nuslerp", 2), ("multislerp", 3), ("multislerp", 4), ("multislerp", 5),
                                           ("multislerp", 6)])
def test_task_vector_interpolations_on_the_loops_equal_the_torch_path(method, count, dtype, torch_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(700, 640, generator=g) * 0.02
    shared = torch.randn(700, 640, generator=g) * 0.002
    models = [(base + shared + torch.randn(700, 640, generator=g) * 0.002).to(dtype) for _ in range(count)]
    base = base.to(dtype)
    weights = [0.3, 0.6, 0.45, 0.2, 0.35, 0.25][:count]
    run = lambda **kw: get_method(method).func(models, base=base, weight=weights, compute_dtype=torch.float32, **kw)
    calls = []
    names = {2: ("pair_product_sums", "pair_combine_into"), 3: ("triple_product_sums", "triple_combine_into")}.get(
        count, ("product_sums", "generated"))
    for name in names:
        _count_calls(monkeypatch, name, calls)
    compiled, rounded = run(), run(output_dtype=torch.bfloat16)
    assert set(names) <= set(calls)
    with torch_path:
        reference = run()
        assert run(output_dtype=torch.bfloat16).dtype == torch.float32  # the torch path leaves the rounding to the caller
    assert compiled.dtype == reference.dtype == torch.float32
    assert torch.equal(compiled, reference) and not torch.equal(compiled, base.float())
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded.view(torch.int16), reference.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("count", [2, 3])
def test_pair_and_triple_tallies_count_what_the_general_tallies_count(count):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(5_000, generator=g).to(torch.bfloat16)
    models = [(base.float() + torch.randn(5_000, generator=g) * 2e-3).to(torch.bfloat16) for _ in range(count)]
    for j in range(1, count):
        models[j][:100] = base[:100]  # entries only the first model changed
    models[0][100:200] = base[100:200]  # entries the first model left alone
    tvs = [_sparsify.TaskVector(m, base, torch.float32) for m in models]
    epsilon, loops = np.float32(1e-3), _kernels.loops()
    one_pass, general = np.zeros((count, 2), dtype=np.int64), np.zeros((count, 2), dtype=np.int64)
    models_now, base_now = _sparsify.models_and_base(tvs, 0, 5_000)
    (loops.pair_tallies if count == 2 else loops.triple_tallies)(*models_now, base_now, epsilon, one_pass)
    deltas = np.empty((count, 5_000), dtype=np.float32)
    for j, tv in enumerate(tvs):
        loops.contribution_into(*tv.operands(0, 5_000), epsilon, deltas[j])
    loops.contributor_tallies(deltas, 5_000, epsilon, np.empty(5_000, dtype=np.float32), general)
    assert np.array_equal(one_pass, general) and 0 < one_pass[1, 1] < one_pass[0, 1] < one_pass[0, 0]


def test_pair_product_sums_are_numpys_block_sums():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(10_000, generator=g).to(torch.bfloat16)
    m0, m1 = ((base.float() + torch.randn(10_000, generator=g) * 0.01).to(torch.bfloat16) for _ in range(2))
    d0, d1 = (m.float() - base.float() for m in (m0, m1))
    operand = lambda t: t.view(torch.int16).numpy().view(np.uint16)
    for block in (4096, 640, 7):  # the last block shorter than the others
        sums = np.empty((-(-10_000 // block), 3), dtype=np.float32)
        _kernels.loops().pair_product_sums(operand(m0), operand(m1), operand(base), block, sums)
        for k, product in enumerate((d0 * d0, d0 * d1, d1 * d1)):
            assert np.array_equal(sums[:, k], _linalg.block_sums(product.numpy(), block))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count,params", [
    (2, {"select_topk": 0.4}),  # the streamed two-model cut
    (3, {"select_topk": 0.6, "consensus_method": "count"}),  # the stored variance mask, the merge electing by count in one pass
    (3, {"select_topk": 0.5}),  # the stored variance mask in the three-model loops (`square_sums`, one pass)
    (3, {"select_topk": 1.0, "energy_floor": 0.0}),  # everything selected, energy weights
    (2, {"select_topk": 1.0, "energy_floor": 0.0}),  # two models, everything selected: the energies' empty keep
    (4, {"select_topk": 0.5, "energy_floor": 0.0}),  # four: `square_sums` and the generated loop on the stored mask
    (5, {"select_topk": 0.5}),  # five: the variance and the merge in one pass each
    (6, {"select_topk": 0.5}),  # six: the variance and the merge in one pass each
    (4, {"select_topk": 1.0, "energy_floor": 0.0, "consensus_method": "count"}),  # every entry, elected by count
    (2, {"select_topk": 0.4, "consensus_method": "count"}),  # the two-model cut made into a mask for the rows
])
def test_sce_loops_equal_the_torch_path(count, params, dtype, torch_path, monkeypatch):
    models, base = _family(dtype)
    models = _models(count, models, base)
    sce = get_method("sce").func
    used = []
    merge = sce.__globals__["_compiled_merge"]
    monkeypatch.setitem(sce.__globals__, "_compiled_merge", lambda *a, **k: used.append(1) or merge(*a, **k))
    compiled = sce(models, base=base, **params, compute_dtype=torch.float32)
    rounded = sce(models, base=base, **params, compute_dtype=torch.float32, output_dtype=torch.bfloat16)
    assert len(used) == 2
    with torch_path:
        reference = sce(models, base=base, **params, compute_dtype=torch.float32)
    assert len(used) == 2
    assert torch.equal(compiled, reference)
    assert torch.equal(rounded.view(torch.int16), reference.to(torch.bfloat16).view(torch.int16))
    assert not torch.equal(compiled, base.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,count,params", [
    ("ram", 3, {}),
    ("ram", 2, {"epsilon": 2e-3}),  # about half the entries contribute: shared, unique and untouched all common
    ("ramplus_tl", 3, {"epsilon": 2e-3}),
    ("ramplus_tl", 2, {"epsilon": 1e-3, "r": 0.5, "alpha": 1.0}),
    ("ramplus_tl", 4, {"epsilon": 2e-3}),  # four: the tallies' rows a block at a time (`ram_rows_tallies`)
    ("ram", 5, {"epsilon": 2e-3}),
])
def test_ram_loops_equal_the_torch_path(name, count, params, dtype, torch_path, monkeypatch):
    from mergesmith.methods import ram as module

    models, base = _family(dtype)
    if count >= 4:
        models = _fourth(models, base)
    if count == 5:
        models = _fourth(models, base, seed=7)
    models = [m.clone() for m in models[:count]]
    models[0][3, :5] = float("nan")  # a NaN delta never contributes but poisons the sums, in both paths
    merge = get_method(name).func
    used = []
    compiled_merge = module._merge_compiled
    monkeypatch.setattr(module, "_merge_compiled", lambda *a: used.append(1) or compiled_merge(*a))
    compiled = merge(models, base=base, **params, compute_dtype=torch.float32)
    rounded = merge(models, base=base, **params, compute_dtype=torch.float32, output_dtype=torch.bfloat16)
    with torch_path:
        reference = merge(models, base=base, **params, compute_dtype=torch.float32)
    assert len(used) == 2 and rounded.dtype == torch.bfloat16
    assert torch.equal(compiled.view(torch.int32), reference.view(torch.int32))
    # NaN rounds to a NaN of another bit pattern in torch's vectorised conversion (0xFFFF) than in the loops
    # (0x7FC0, torch's scalar one): the NaNs must match in place, every other entry bit for bit
    nan = reference.isnan()
    assert nan.any() and torch.equal(rounded.isnan(), nan)
    assert torch.equal(rounded[~nan].view(torch.int16), reference[~nan].to(torch.bfloat16).view(torch.int16))
    assert not torch.equal(compiled, base.float())


def _float64_divergences(other, base):
    """KL(softmax(other) + 1e-8 || softmax(base) + 1e-8) per row, in float64 numpy: the formula itself."""
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p = softmax(other.double().numpy()) + 1e-8
    q = softmax(base.double().numpy()) + 1e-8
    return (p * np.log(p / q)).sum(axis=-1)


def test_row_max_of_bf16_patterns_is_that_of_their_float32_values():
    # the 16-bit order keys of bf16 rows against the 32-bit keys of the same values widened: negative rows,
    # zeros of both signs, infinities, NaN of either sign (a positive NaN counts as the largest)
    from mergesmith.methods._divergence_loops import row_max

    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(300, generator=g), -torch.rand(300, generator=g) - 1, torch.zeros(7), -torch.zeros(7),
            torch.tensor([1.0, float("inf"), -2.0]), torch.tensor([-float("inf"), -3.0]),
            torch.tensor([2.0, float("nan")]), torch.tensor([2.0, -float("nan")])]
    for row in rows:
        bf16 = row.to(torch.bfloat16)
        widened = bf16.float().numpy()
        got, expected = row_max(bf16.view(torch.int16).numpy().view(np.uint16)), row_max(widened)
        assert np.float32(got).view(np.uint32) == np.float32(expected).view(np.uint32), row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_arcee_fusion_row_divergences_are_the_float64_formula(dtype, torch_path):
    # near-uniform softmaxes (weights ~0.02, deltas ~0.002): the compiled loop's per-row sums and the torch
    # path's float64 both land within 1e-6 of the float64 formula, where the formula in float32 (mergekit's)
    # is several percent off. Rows that leave the loop's series domain take its entry-by-entry float64 path:
    # a large delta, a wide spread, a -inf, a NaN, identical rows, a row too long for the first-order eps terms
    from mergesmith.methods.arcee_fusion import row_divergences

    g = torch.Generator().manual_seed(8)
    base = torch.randn(64, 3000, generator=g) * 0.02
    other = base + torch.randn(base.shape, generator=g) * 0.002
    other[1, 5] += 1.0
    other[2] *= 60
    other[3, 7] = base[3, 7] = float("-inf")
    other[4, 9] = float("nan")
    other[5] = base[5]
    base, other = base.to(dtype), other.to(dtype)
    expected = _float64_divergences(other, base)
    compiled = row_divergences(other, base, torch.float64).view(-1).numpy()
    with torch_path:
        reference = row_divergences(other, base, torch.float64).view(-1).numpy()
    assert np.isnan(compiled[4]) and np.isnan(reference[4]) and compiled[5] == reference[5] == 0
    finite = ~np.isnan(expected)
    assert finite.sum() == 63 and (expected[finite] > 0).sum() == 62
    for got in (compiled, reference):
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6, atol=1e-18)
    p32 = torch.softmax(other.float(), -1) + 1e-8
    q32 = torch.softmax(base.float(), -1) + 1e-8
    float32_formula = (p32 * torch.log(p32 / q32)).sum(-1).double().numpy()
    assert np.nanmax(np.abs(float32_formula - expected)[6:] / expected[6:]) > 0.01

    long_base = torch.randn(2, 150_000, generator=g) * 0.02  # softmax entries ~7e-6 < 1000 eps
    long_other = (long_base + torch.randn(long_base.shape, generator=g) * 0.002).to(dtype)
    got = row_divergences(long_other, long_base.to(dtype), torch.float64).view(-1).numpy()
    np.testing.assert_allclose(got, _float64_divergences(long_other, long_base.to(dtype)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_arcee_fusion_importances_from_the_loop_equal_torchs_bit_for_bit(dtype, torch_path):
    # |other - base| * KL(row) as one compiled loop on the inputs as stored, against torch's subtract, abs
    # and multiply on float32 copies, for the same divergences: the same float operations, so the same bits
    # (zero rows too; NaN where torch has NaN, its payload aside: x86 passes on either operand's NaN, and the
    # two pick differently)
    from mergesmith.methods.arcee_fusion import RowImportances, _stored_importances, row_divergences

    g = torch.Generator().manual_seed(8)
    base = (torch.randn(300, 257, generator=g) * 0.02).to(dtype)
    other = (base.float() + torch.randn(base.shape, generator=g) * 0.002).to(dtype)
    other[5, 3] = float("nan")
    other[9] = base[9]  # KL 0
    kl = row_divergences(other, base, torch.float32)
    compiled = _stored_importances(RowImportances(other, base, kl))
    with torch_path:
        reference = _stored_importances(RowImportances(other, base, kl))
    nan = reference.isnan()
    assert torch.equal(compiled.isnan(), nan) and nan[5].all() and not nan[6].any()
    assert torch.equal(compiled[~nan].view(torch.int32), reference[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nan_row", [False, True])
def test_arcee_fusion_loops_equal_the_torch_path(dtype, nan_row, torch_path, monkeypatch):
    # past SELECT_FROM entries the quartiles come from the compiled selection scan (three windows gathered in
    # one pass), and the output from `choose_into`, straight into bf16 when asked. A NaN in a row makes its KL,
    # so its importances, NaN: the base is kept there, and the quartiles come from np.partition instead.
    from mergesmith.methods import arcee_fusion as module

    g = torch.Generator().manual_seed(3)
    base = (torch.randn(1100, 1000, generator=g) * 0.02).to(dtype)
    other = (base.float() + torch.randn(base.shape, generator=g) * 0.002).to(dtype)
    if nan_row:
        other[7, :300] = float("nan")
    kl = module.row_divergences(other, base, torch.float32)  # the same divergences for both paths (see above)
    monkeypatch.setattr(module, "row_divergences", lambda *a: kl)
    fuse = get_method("arcee_fusion").func
    used, scans = [], []
    choose, scan = module._choose_compiled, _sparsify._scan_in_parts
    monkeypatch.setattr(module, "_choose_compiled", lambda *a: used.append(1) or choose(*a))
    monkeypatch.setattr(_sparsify, "_scan_in_parts", lambda *a, **k: scans.append(1) or scan(*a, **k))
    compiled = fuse([other], base=base, compute_dtype=torch.float32)
    rounded = fuse([other], base=base, compute_dtype=torch.float32, output_dtype=torch.bfloat16)
    with torch_path:
        reference = fuse([other], base=base, compute_dtype=torch.float32)
    assert len(used) == 2 and rounded.dtype == torch.bfloat16 and len(scans) == (0 if nan_row else 2)
    assert torch.equal(compiled.view(torch.int32), reference.view(torch.int32))
    assert torch.equal(rounded.view(torch.int16), reference.to(torch.bfloat16).view(torch.int16))
    changed = (compiled != base.float()).float().mean()
    assert 0 < changed < 0.5


def test_arcee_fusion_quartiles_of_importances_never_stored_are_those_of_the_stored_ones(monkeypatch):
    # the compiled merge computes the importances chunk by chunk (whole rows; 1500 columns do not divide the
    # chunk) where the selection reads them; the quartiles are the exact order statistics of the stored ones,
    # and the whole tensor is never made
    from mergesmith.methods import arcee_fusion as module

    g = torch.Generator().manual_seed(11)
    base = (torch.randn(700, 1500, generator=g) * 0.02).to(torch.bfloat16)
    other = (base.float() + torch.randn(base.shape, generator=g) * 0.002).to(torch.bfloat16)
    kl = module.row_divergences(other, base, torch.float32)
    stored = module.importance_scores(other, base, torch.float32).reshape(-1)
    assert stored.numel() > module.SELECT_FROM and stored.numel() % module.RowImportances(other, base, kl).chunk_length()
    last = stored.numel() - 1
    ranks = [last // 4, last // 2, (3 * last) // 4]
    expected = np.partition(stored.numpy(), ranks)[ranks]
    monkeypatch.setattr(module.RowImportances, "whole", lambda self: pytest.fail("importances stored whole"))
    got = module.importance_quartiles(module.RowImportances(other, base, kl))
    assert np.array_equal(np.array([float(q) for q in got], dtype=np.float32), expected)
    fused = get_method("arcee_fusion").func([other], base=base, compute_dtype=torch.float32)
    assert 0 < (fused != base.float()).float().mean() < 0.5


def test_arcee_fusion_nan_importance_in_a_finite_row_falls_back_to_the_stored_order(torch_path, monkeypatch):
    # -inf in both models at one place: that row's KL is finite, its importance there NaN (inf - inf). The
    # scan cannot order NaN; having met one it falls back to np.partition on the stored importances (NaN
    # last), as the torch path does, and the base is kept there
    g = torch.Generator().manual_seed(12)
    base = (torch.randn(700, 1500, generator=g) * 0.02).to(torch.bfloat16)
    other = (base.float() + torch.randn(base.shape, generator=g) * 0.002).to(torch.bfloat16)
    base[3, 4] = other[3, 4] = float("-inf")
    from mergesmith.methods import arcee_fusion as module

    importances = module.RowImportances(other, base, module.row_divergences(other, base, torch.float32))
    assert importances.selectable()  # every KL finite: the scan runs, meets the NaN, and falls back
    module.importance_quartiles(importances)
    assert importances.nan_seen
    monkeypatch.setattr(module, "row_divergences", lambda *a, kl=importances.kl.view(-1, 1): kl)  # both paths
    fuse = get_method("arcee_fusion").func
    compiled = fuse([other], base=base, compute_dtype=torch.float32)
    with torch_path:
        reference = fuse([other], base=base, compute_dtype=torch.float32)
    assert torch.equal(compiled.view(torch.int32), reference.view(torch.int32))
    assert compiled[3, 4] == float("-inf") and not compiled.isnan().any()


@pytest.mark.parametrize("share", [0.001, 0.3])  # listed by set bits; by the branch-free pass (over 1 in DENSE_FLAGS)
def test_list_flagged_lists_the_flagged_positions_in_order(share):
    # every way of listing (the machine picks compress stores or the scan; the scan picks by the count)
    from mergesmith.methods._kernel_loops import DENSE_FLAGS, list_by_compress, list_by_scan, list_flagged

    n = 100_003  # not a whole number of compress steps
    flags = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
    flags[:n] = np.random.default_rng(4).random(n) < share
    flags[n - 1] = 1  # one in the last, partial step
    flagged = int(flags[:n].sum())
    assert (flagged * DENSE_FLAGS > n) == (share > 0.01)
    listings = [lambda hits: list_by_compress(flags, n, hits)]
    for estimate in (flagged, 0, n):  # the count only picks the listing: either lists the same positions
        listings += [lambda hits, e=estimate: list_by_scan(flags, n, e, hits), lambda hits, e=estimate: list_flagged(flags, n, e, hits)]
    for listing in listings:
        hits = np.full(n, -1, dtype=np.int32)
        found = listing(hits)
        assert found == flagged and np.array_equal(hits[:found], np.flatnonzero(flags[:n]))


def test_widen_is_torchs_bfloat16_conversion_for_every_bit_pattern():
    from numba import njit

    from mergesmith.methods._kernel_loops import widen

    @njit
    def widen_all(bits, out):
        for i in range(bits.size):
            out[i] = widen(bits[i])

    bits = np.arange(1 << 16, dtype=np.uint16)  # every bf16: zeros, subnormals, infinities, NaN payloads
    out = np.empty(bits.size, dtype=np.float32)
    widen_all(bits, out)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    assert np.array_equal(out.view(np.uint32), expected.numpy().view(np.uint32))
    same = np.empty(3, dtype=np.float32)
    widen_all(np.array([1.5, -0.0, np.nan], dtype=np.float32), same)  # float32 entries pass through
    assert np.array_equal(same.view(np.uint32), np.array([1.5, -0.0, np.nan], dtype=np.float32).view(np.uint32))
