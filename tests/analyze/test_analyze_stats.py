"""Task-vector statistics equal hand computations on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergesmith.analyze.stats import (
    TensorStats,
    effective_rank,
    magnitude_histogram,
    mass_fraction,
    tensor_stats,
    topk_mask,
)


def test_topk_mask_keeps_the_largest_magnitudes_and_never_zeros():
    d = torch.tensor([0.1, -3.0, 2.0, 0.5, -0.2, 1.0, 0.0, 4.0, -0.05, 0.3])
    assert topk_mask(d, 0.3).nonzero().flatten().tolist() == [1, 2, 7]
    assert topk_mask(d, 0.01).nonzero().flatten().tolist() == [7]  # at least one entry
    sparse = torch.tensor([0.0, 0.0, 5.0, 0.0])
    assert topk_mask(sparse, 0.75).tolist() == [False, False, True, False]


def test_pairwise_and_multi_model_counts_by_hand():
    base = torch.zeros(2, 4)
    # top-k 0.5: 4 of 8 entries per model
    a = torch.tensor([[4.0, -3.0, 2.0, 1.0], [0.1, 0.2, -0.3, 0.4]])  # mask: 4, -3, 2, 1   (row 0)
    b = torch.tensor([[-5.0, -6.0, 0.1, 0.2], [7.0, 0.3, 0.0, 0.0]])  # mask: -5, -6, 7, 0.3
    c = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 4.0]])  # mask: 1, 2, 3, 4
    st = tensor_stats([a, b, c], base, top_k=0.5, rank=False)
    s = st.summary(0.5)
    na, nb, nc = (float(x.square().sum()) for x in (a, b, c))
    assert s["norm"] == pytest.approx([math.sqrt(na), math.sqrt(nb), math.sqrt(nc)])
    dot_ab = 4 * -5 + -3 * -6 + 2 * 0.1 + 1 * 0.2 + 0.1 * 7 + 0.2 * 0.3
    assert s["cosine"][0][1] == pytest.approx(dot_ab / math.sqrt(na * nb), rel=1e-5)
    # masks: a = {00,01,02,03}, b = {00,01,10,11}, c = {00,01,02,13}
    assert st.topk.tolist() == [4, 4, 4]
    # a∧b = {00,01}: signs (+,-) vs (-,-) → one conflict of two; a∨b has 6
    assert s["sign_conflict"][0][1] == pytest.approx(0.5)
    assert s["jaccard"][0][1] == pytest.approx(2 / 6)
    # a∧c = {00,01,02}: a (+,-,+), c (+,+,+) → one conflict of three; a∨c = 5
    assert s["sign_conflict"][0][2] == pytest.approx(1 / 3)
    assert s["jaccard"][0][2] == pytest.approx(3 / 5)
    # b∧c = {00,01}: b (-,-), c (+,+) → both conflict; b∨c = 6
    assert s["sign_conflict"][1][2] == pytest.approx(1.0)
    assert s["jaccard"][1][2] == pytest.approx(2 / 6)
    # positions in ≥ 2 masks: 00 (a+,b-,c+), 01 (a-,b-,c+), 02 (a+,c+) → 2 conflicting of 3; union = 7 positions
    assert s["conflict_rate"] == pytest.approx(2 / 3)
    assert s["interference"] == pytest.approx(2 / 7)
    assert s["jaccard_independent"] == pytest.approx(0.5 / 1.5)


def test_reference_is_the_base_and_weights_are_measured_too():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = base + torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = base + torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    s = tensor_stats([a, b], base, top_k=0.5, rank=False).summary(0.5)
    assert s["norm"] == pytest.approx([1.0, 2.0])
    assert s["relative_norm"] == pytest.approx([1 / math.sqrt(30), 2 / math.sqrt(30)])
    assert s["cosine"][0][1] == pytest.approx(0.0)
    mean = (a + b) / 2
    assert s["average_norm_retained"] == pytest.approx(float(mean.norm()) / ((float(a.norm()) + float(b.norm())) / 2))
    assert s["task_vector_average_retained"] == pytest.approx(math.sqrt(0.5**2 + 1.0**2) / 1.5)


def test_without_base_the_reference_is_the_models_mean():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 2.0, 1.0])
    s = tensor_stats([a, b], None, top_k=1.0, rank=False).summary(1.0)
    assert s["norm"] == pytest.approx([math.sqrt(2), math.sqrt(2)])  # deviations (-1, 0, 1) and (1, 0, -1)
    assert s["cosine"][0][1] == pytest.approx(-1.0)
    assert s["conflict_rate"] == pytest.approx(1.0)


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.diag(torch.tensor([2.0, 2.0, 0.0])))[0] == pytest.approx(2.0)
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0])))[0] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    u, v = torch.randn(300, 1), torch.randn(1, 40)
    er, bound = effective_rank(u @ v)
    assert er == pytest.approx(1.0, abs=1e-3) and bound == 40
    assert effective_rank(torch.zeros(5, 4))[0] == 0.0


def test_effective_rank_subsamples_rows_of_big_matrices():
    torch.manual_seed(0)
    low = torch.randn(700, 3) @ torch.randn(3, 650)  # both sides above max_rows → 64 sampled rows
    er, bound = effective_rank(low, max_rows=64)
    assert bound == 64
    assert 1.0 < er <= 3.0 + 1e-3
    full, _ = effective_rank(torch.randn(700, 650), max_rows=64)
    assert 40 < full <= 64


def test_mass_fraction_by_hand_and_against_a_full_sort():
    d = torch.tensor([4.0, -2.0, 1.0, 0.5])  # squares 16, 4, 1, .25; 90 % = 19.125 → the two largest
    counts, mass = magnitude_histogram(d)
    assert mass.sum() == pytest.approx(21.25)
    assert mass_fraction(counts, mass, 4) == pytest.approx(0.5)
    assert mass_fraction(counts, mass, 8) == pytest.approx(0.25)  # zeros count as entries
    torch.manual_seed(1)
    x = torch.randn(20_000) * torch.rand(20_000) ** 3
    sq = np.sort(x.double().square().numpy())[::-1]
    exact = (np.searchsorted(np.cumsum(sq), 0.9 * sq.sum()) + 1) / sq.size
    assert mass_fraction(*magnitude_histogram(x), x.numel()) == pytest.approx(exact, abs=0.005)


def test_sums_aggregate_exactly_across_tensors():
    torch.manual_seed(2)
    base1, base2 = torch.randn(6, 5), torch.randn(7)
    m1 = [base1 + torch.randn(6, 5) for _ in range(2)]
    m2 = [base2 + torch.randn(7) for _ in range(2)]
    total = TensorStats(2)
    total += tensor_stats(m1, base1, top_k=0.2, seed_key="a")
    total += tensor_stats(m2, base2, top_k=0.2, seed_key="b")
    d0 = torch.cat([(m1[0] - base1).flatten(), m2[0] - base2])
    d1 = torch.cat([(m1[1] - base1).flatten(), m2[1] - base2])
    s = total.summary(0.2)
    assert s["norm"][0] == pytest.approx(float(d0.norm()), rel=1e-6)
    assert s["cosine"][0][1] == pytest.approx(float(d0 @ d1 / (d0.norm() * d1.norm())), rel=1e-5)
    pooled = magnitude_histogram(d0)
    assert np.allclose(total.hist_count[0], pooled[0]) and np.allclose(total.hist_mass[0], pooled[1])
    assert total.tensors == 2 and total.numel == 37 and total.rank_count == 1  # only the 2-D tensor has a rank
