"""tie_order="mergekit": entries tied at a selection threshold are chosen by the same sort call mergekit makes
(its unstable argsort / sort / topk), so the masks equal mergekit's bit for bit on quantized task vectors,
where the default (earlier position first) keeps the same number of entries but another subset."""

import pytest
import torch

from mergesmith.errors import ConfigError
from mergesmith.methods import get_method


def quantized(seed, shape=(64, 96), models=2, step=1 / 64):
    """bf16-like task vectors: a few distinct magnitudes shared by thousands of entries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.round(torch.randn(shape, generator=g) * 3) * step for _ in range(models)]


def mergekit_magnitude_mask(delta, density):
    """mergekit's `magnitude`: the first k of a descending argsort of the float32 magnitudes."""
    w = delta.abs().reshape(-1).float()
    mask = torch.zeros(w.numel())
    mask[torch.argsort(w, descending=True)[: max(1, int(density * w.numel()))]] = 1
    return mask.reshape(delta.shape)


def mergekit_outliers_mask(delta, density, gamma):
    """mergekit's `magnitude_outliers`: a slice of an ascending sort of the float32 magnitudes."""
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n)
    mask[torch.sort(delta.abs().reshape(-1).float(), descending=False).indices[bottom : bottom + keep]] = 1
    return mask.reshape(delta.shape)


def weighted_sum(base, models, masks, weights):
    return base + sum(w * (m - base) * k for m, k, w in zip(models, masks, weights))


def test_ties_masks_follow_mergekit_argsort():
    base, models = quantized(0)
    params = dict(base=base, weight=[1.0, 1.0], density=[0.3, 0.3], normalize=False)
    ours = get_method("ties").func(models, tie_order="mergekit", **params)
    masks = [mergekit_magnitude_mask(m - base, 0.3) for m in models]
    deltas = torch.stack([(m - base) * k for m, k in zip(models, masks)])
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    expected = base + (deltas * (deltas.sign() == sign)).sum(0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    by_position = get_method("ties").func(models, **params)
    assert not torch.equal(ours, by_position)  # the option matters on tied magnitudes
    kept = [(o - base != 0).sum() for o in (ours, by_position)]
    assert abs(int(kept[0]) - int(kept[1])) < 0.02 * base.numel()


@pytest.mark.parametrize("gamma", [0.05, 0.0])
def test_breadcrumbs_masks_follow_mergekit_sort(gamma):
    base, models = quantized(1)
    ours = get_method("breadcrumbs").func(models, base=base, weight=[0.7, 0.4], density=[0.4, 0.5], gamma=[gamma, gamma],
                                          tie_order="mergekit")
    masks = [mergekit_outliers_mask(m - base, d, gamma) for m, d in zip(models, (0.4, 0.5))]
    torch.testing.assert_close(ours, weighted_sum(base, models, masks, [0.7, 0.4]), rtol=0, atol=1e-6)


def test_sce_selection_follows_mergekit_topk():
    base, models = quantized(2, models=3)
    ours = get_method("sce").func(models, base=base, select_topk=0.3, tie_order="mergekit", energy_floor=0.0)
    tvs = torch.stack([m - base for m in models])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * 0.3)
    mask = torch.zeros(var.numel())
    mask[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
    tvs = tvs * mask.reshape(var.shape)
    energy = tvs.square().reshape(3, -1).mean(1)
    eta = (energy / energy.sum()).reshape(3, 1, 1)
    agree = (tvs.sign() == torch.where(tvs.sum(0) >= 0, 1.0, -1.0)).float() * eta
    expected = base + (tvs * agree).sum(0) / agree.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert not torch.equal(ours, get_method("sce").func(models, base=base, select_topk=0.3, energy_floor=0.0))


def test_bf16_inputs_as_read_give_the_same_masks():
    # the executor hands bf16 inputs over as read; the sort runs on the float32 magnitudes either way
    base, models = quantized(3)
    base16, models16 = base.bfloat16(), [m.bfloat16() for m in models]
    params = dict(weight=[1.0, 1.0], density=[0.2, 0.2], tie_order="mergekit", compute_dtype=torch.float32)
    as_read = get_method("ties").func(models16, base=base16, **params)
    converted = get_method("ties").func([m.float() for m in models16], base=base16.float(), **params)
    assert torch.equal(as_read, converted)


def test_unknown_tie_order():
    base, models = quantized(4, shape=(4, 4))
    for name in ("ties", "breadcrumbs", "breadcrumbs_ties", "sce"):
        with pytest.raises(ValueError, match="tie order"):
            get_method(name).func(models, base=base, weight=[1.0, 1.0], tie_order="random") if name != "sce" else \
                get_method(name).func(models, base=base, select_topk=0.5, tie_order="random")


def test_merge_passes_the_option_through(tmp_path):
    # bf16 fine-tunes merged in bf16 (mergekit's arithmetic): the task vectors are coarse, ties are everywhere
    import mergesmith
    from fixtures import make_model, read_state

    base = make_model(tmp_path / "base", dtype=torch.bfloat16)
    fts = [make_model(tmp_path / f"ft{i}", seed=i, base=base, dtype=torch.bfloat16, delta_scale=0.01) for i in (1, 2)]
    config = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
              "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.3}} for f in fts]}
    outs = {}
    for order in ("mergekit", "position"):
        mergesmith.merge(config, tmp_path / order, compute_dtype="bfloat16", tie_order=order)
        outs[order] = read_state(tmp_path / order)
    states = [read_state(f) for f in fts]
    base_state = read_state(base)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = get_method("ties").func([s[name] for s in states], base=base_state[name], weight=[0.5, 0.5], density=[0.3, 0.3],
                                       compute_dtype=torch.bfloat16, tie_order="mergekit")
    assert torch.equal(outs["mergekit"][name], expected.to(torch.bfloat16))
    assert any(not torch.equal(outs["mergekit"][n], outs["position"][n]) for n in outs["position"])


def test_api_rejects_an_unknown_tie_order(tmp_path):
    from mergesmith.api import merge

    config = tmp_path / "c.yml"
    config.write_text("merge_method: linear\nmodels:\n  - model: nowhere\n")
    with pytest.raises(ConfigError, match="tie-order"):
        merge(config, tmp_path / "out", tie_order="sorted")
    assert not (tmp_path / "out").exists()


def mergekit_ties_bf16(base, models, weights, density):
    """mergekit's generalized task arithmetic for TIES, literally, on bf16 tensors."""
    deltas = torch.stack([(m - base) * mergekit_magnitude_mask(m - base, density).to(torch.bfloat16) for m in models])
    w = torch.tensor(weights, dtype=torch.bfloat16).view(-1, 1, 1)
    deltas = deltas * w
    majority = (deltas.sum(dim=0) >= 0).to(torch.bfloat16) * 2 - 1
    mask = deltas.sign() == majority
    mixed = (deltas * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + mixed / divisor


def mergekit_sce_bf16(base, models, topk):
    tvs = torch.stack([m - base for m in models])
    var = torch.var(tvs, dim=0, unbiased=False)
    mask = torch.zeros_like(var)
    mask.view(-1)[torch.topk(var.abs().view(-1), k=int(int(torch.count_nonzero(var)) * topk)).indices] = 1
    tvs = tvs * mask.unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(torch.bfloat16) * 2 - 1
    erase = tvs.sign() == majority
    energy = tvs.square().reshape(len(models), -1).mean(dim=1)
    eta = (energy / torch.sum(energy).item()).view(-1, 1, 1)
    erased = eta * erase
    return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def test_bf16_compute_with_mergekit_ties_is_mergekits_arithmetic():
    # the weights 0.6 and 0.3 are not bf16 numbers, and the three weighted deltas nearly cancel on many entries
    base, models = quantized(5, models=3, step=1 / 128)
    base, models = base.bfloat16(), [m.bfloat16() for m in models]
    ours = get_method("ties").func(models, base=base, weight=[0.6, 0.3, 0.6], density=[0.5] * 3, compute_dtype=torch.bfloat16,
                                   tie_order="mergekit")
    assert torch.equal(ours, mergekit_ties_bf16(base, models, [0.6, 0.3, 0.6], 0.5))
    ours = get_method("sce").func(models, base=base, select_topk=0.4, compute_dtype=torch.bfloat16, tie_order="mergekit",
                                  energy_floor=0.0)
    assert torch.equal(ours, mergekit_sce_bf16(base, models, 0.4))


def test_mergekit_numerics_is_both_options_with_the_config_dtype(tmp_path):
    import mergesmith
    from fixtures import make_model, read_state
    from mergesmith.cli import main

    base = make_model(tmp_path / "base", dtype=torch.bfloat16)
    fts = [make_model(tmp_path / f"ft{i}", seed=i, base=base, dtype=torch.bfloat16, delta_scale=0.01) for i in (1, 2)]
    config = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
              "models": [{"model": str(f), "parameters": {"weight": 0.6, "density": 0.3}} for f in fts]}
    mergesmith.merge(config, tmp_path / "both", compute_dtype="bfloat16", tie_order="mergekit")
    mergesmith.merge(config, tmp_path / "default")
    import yaml

    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "switch"), "--mergekit-numerics", "--quiet"]) == 0
    both, switch, default = (read_state(tmp_path / d) for d in ("both", "switch", "default"))
    assert all(torch.equal(both[n], switch[n]) for n in both)
    assert any(not torch.equal(both[n], default[n]) for n in both)
