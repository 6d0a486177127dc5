"""Parity of the task-vector methods (TIES, DARE, Breadcrumbs, DELLA, SCE) with mergekit.

    PYTHONPATH=src /work/mkenv/bin/python bench/parity_task_vectors.py [substring ...]

Uses the `Case` machinery of `bench/parity_methods.py` (which also runs these cases after its own):
mergekit's methods are called through `mergekit.merge_methods.registry.get(name)` with a `TensorGroup`,
ours through `get_method(name).func`. Every deterministic configuration is compared (DARE and DELLA at
density 1 and 0). Their random masks come from different streams in the two tools (mergesmith draws its
own, faster, words), so the random configurations are compared in distribution: kept fraction and mean over
draws, printed after the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parity_methods import Case, run  # noqa: E402


def _w(*values):
    return {"weight": list(values)}


def _mp(**columns):
    return {k: list(v) for k, v in columns.items()}


def _tiny_deltas(method: str, scale: float, params: dict):
    """ours/theirs overrides with task vectors shrunk by `scale` (for mergekit's absolute thresholds)."""

    def shrink(base, models):
        return [base + (m - base) * scale for m in models]

    def ours(base, models):
        from mergesmith.methods import get_method

        return get_method(method).func(shrink(base, models), base=base, **params)

    def theirs(base, models):
        from mergekit.merge_methods.base import TensorGroup
        from mergekit.merge_methods.registry import get

        group = TensorGroup.from_tensors([base] + shrink(base, models), base_index=0)
        (out,) = get(method)([group], parameters=params)
        return out

    return ours, theirs


BIG = (512, 300)  # 153,600 entries: exercises the sampled-window threshold search

CASES: list[Case] = [
    # task arithmetic (shared combine step)
    Case("task_arithmetic", "task_arithmetic", models=3, model_params=_w(0.5, 0.3, 0.8)),
    Case("task_arithmetic normalize", "task_arithmetic", models=3, model_params=_w(0.5, 0.3, 0.8),
         params={"normalize": True, "lambda": 0.7}),
    # ties
    Case("ties d=0.5", "ties", models=3, model_params=_mp(weight=[1, 1, 1], density=[0.5, 0.5, 0.5])),
    Case("ties mixed w/d", "ties", models=3, model_params=_mp(weight=[0.3, 0.9, -0.2], density=[0.2, 0.7, 0.4]), seed=1),
    Case("ties no normalize, lambda", "ties", model_params=_mp(weight=[0.5, 0.5], density=[0.3, 0.6]),
         params={"normalize": False, "lambda": 1.3}, seed=2),
    Case("ties rescale", "ties", model_params=_mp(weight=[1, 1], density=[0.25, 0.5]), params={"rescale": True}, seed=3),
    Case("ties random inputs", "ties", models=4, model_params=_mp(weight=[1] * 4, density=[0.4] * 4), inputs="random", seed=4),
    Case("ties opposed", "ties", models=2, model_params=_mp(weight=[1, 1], density=[0.6, 0.6]), inputs="opposed", seed=5),
    Case("ties big", "ties", shape=BIG, models=3, model_params=_mp(weight=[1, 0.5, 0.7], density=[0.1, 0.3, 0.9]), seed=6),
    Case("ties big rescale", "ties", shape=BIG, models=2, model_params=_mp(weight=[1, 1], density=[0.01, 0.5]),
         params={"rescale": True}, seed=7),
    Case("ties 1-D", "ties", shape=(1000,), models=3, model_params=_mp(weight=[1] * 3, density=[0.3] * 3), seed=8),
    Case("ties 3-D", "ties", shape=(4, 16, 8), models=3, model_params=_mp(weight=[1] * 3, density=[0.3] * 3), seed=9),
    Case("ties density 1", "ties", models=3, model_params=_mp(weight=[1, 2, 3], density=[1, 1, 1]), seed=10),
    Case("ties density 0", "ties", models=2, model_params=_mp(weight=[1, 1], density=[0, 0.5]), seed=11),
    Case("ties density 1e-4 (k->1)", "ties", shape=(100,), model_params=_mp(weight=[1, 1], density=[1e-4, 1e-4]), seed=12),
    Case("ties identical", "ties", models=3, model_params=_mp(weight=[1] * 3, density=[0.5] * 3), inputs="identical"),
    Case("ties zeros", "ties", models=2, model_params=_mp(weight=[1, 1], density=[0.5, 0.5]), inputs="zeros"),
    # breadcrumbs
    Case("breadcrumbs d=0.9 g=0.01", "breadcrumbs", models=3, model_params=_mp(weight=[0.5] * 3, density=[0.9] * 3, gamma=[0.01] * 3)),
    Case("breadcrumbs d=0.5 g=0.1", "breadcrumbs", model_params=_mp(weight=[1, 0.4], density=[0.5, 0.3], gamma=[0.1, 0.05]), seed=1),
    Case("breadcrumbs gamma=0", "breadcrumbs", model_params=_mp(weight=[1, 1], density=[0.5, 0.5], gamma=[0, 0]), seed=2),
    Case("breadcrumbs d+g>1", "breadcrumbs", model_params=_mp(weight=[1, 1], density=[0.9, 0.8], gamma=[0.3, 0.5]), seed=3),
    Case("breadcrumbs rescale normalize", "breadcrumbs", models=3,
         model_params=_mp(weight=[0.2, 0.3, 0.5], density=[0.6] * 3, gamma=[0.02] * 3),
         params={"rescale": True, "normalize": True}, seed=4),
    Case("breadcrumbs big", "breadcrumbs", shape=BIG, models=2, model_params=_mp(weight=[1, 1], density=[0.8, 0.4], gamma=[0.01, 0.1]), seed=5),
    Case("breadcrumbs 1-D", "breadcrumbs", shape=(999,), model_params=_mp(weight=[1, 1], density=[0.7, 0.7], gamma=[0.05, 0.05]), seed=6),
    Case("breadcrumbs density 0", "breadcrumbs", model_params=_mp(weight=[1, 1], density=[0, 0.5], gamma=[0.01, 0.01]), seed=7),
    Case("breadcrumbs_ties", "breadcrumbs_ties", models=3, model_params=_mp(weight=[1] * 3, density=[0.8] * 3, gamma=[0.02] * 3)),
    Case("breadcrumbs_ties normalize", "breadcrumbs_ties", models=3,
         model_params=_mp(weight=[0.7, 1.2, 0.4], density=[0.5, 0.7, 0.9], gamma=[0.05, 0.0, 0.01]),
         params={"normalize": True}, inputs="random", seed=1),
    Case("breadcrumbs_ties big", "breadcrumbs_ties", shape=BIG, models=2, model_params=_mp(weight=[1, 1], density=[0.9, 0.9], gamma=[0.01, 0.01]), seed=2),
    # DARE / DELLA where deterministic (density 1): the weighting, consensus and normalize paths
    Case("dare_ties density 1", "dare_ties", models=3, model_params=_mp(weight=[0.5, 1, 0.3], density=[1, 1, 1]),
         params={"normalize": True}),
    Case("dare_linear density 1", "dare_linear", models=3, model_params=_mp(weight=[0.5, 1, 0.3], density=[1, 1, 1]), seed=1),
    Case("della density 1", "della", models=3, model_params=_mp(weight=[0.5, 1, 0.3], density=[1, 1, 1], epsilon=[0.1] * 3), seed=2),
    Case("della_linear density 1", "della_linear", models=2, model_params=_mp(weight=[0.5, 1], density=[1, 1], epsilon=[0.1] * 2), seed=3),
    Case("dare_ties density 0", "dare_ties", models=2, model_params=_mp(weight=[1, 1], density=[0, 0]), seed=4),
    # sce
    Case("sce topk=1", "sce", models=3),
    Case("sce topk=0.5", "sce", models=3, params={"select_topk": 0.5}, seed=1),
    Case("sce topk=0.1 random", "sce", models=4, params={"select_topk": 0.1}, inputs="random", seed=2),
    Case("sce big topk=0.3", "sce", shape=BIG, models=3, params={"select_topk": 0.3}, seed=3),
    Case("sce 1-D", "sce", shape=(500,), models=2, params={"select_topk": 0.7}, seed=4),
    Case("sce topk=0", "sce", models=2, params={"select_topk": 0.0}, seed=5),
    Case("sce identical", "sce", models=3, params={"select_topk": 0.5}, inputs="identical"),
    Case("sce zeros", "sce", models=2, inputs="zeros"),
]

_ours, _theirs = _tiny_deltas("sce", 0.1, {"select_topk": 0.5})
CASES.append(Case("sce small deltas (energy < 1e-6)", "sce", models=3, seed=6, ours=_ours, theirs=_theirs))


def distribution_checks() -> None:
    """Random methods: ours and mergekit's agree in distribution (kept fraction, mean over draws)."""
    from mergekit.sparsify import SparsificationMethod, sparsify

    from mergesmith.methods import _sparsify

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(256, 256, generator=g) * 0.01
    print("\nrandom sparsification, in distribution (256x256, 64 draws each):")
    print(f"{'method':30s} {'kept ours':>10s} {'kept mk':>10s} {'|mean-δ| ours':>14s} {'|mean-δ| mk':>12s}")
    for label, density, eps in (("dare d=0.3", 0.3, None), ("dare d=0.7 rescale", 0.7, None),
                                ("della d=0.5 e=0.2 rescale", 0.5, 0.2), ("della d=0.3 e=0.1", 0.3, 0.1)):
        rescale = "rescale" in label
        ours_sum, theirs_sum = torch.zeros_like(delta), torch.zeros_like(delta)
        kept_o = kept_t = 0.0
        draws = 64
        gen = torch.Generator().manual_seed(1)
        torch.manual_seed(1)
        for _ in range(draws):
            flat, zero = delta.reshape(-1), torch.zeros(delta.numel())
            size = _sparsify.chunk_size(flat)
            if eps is None:
                plan = _sparsify.random_plan(_sparsify.TaskVector(flat, zero), density, rescale=rescale, generator=gen, size=size)
                o = _sparsify.sparsified(plan, _sparsify.TaskVector(flat, zero)).reshape(delta.shape)
                t = sparsify(delta, density, SparsificationMethod.random, rescale_norm="l1" if rescale else None)
            else:
                plan = _sparsify.della_plan(_sparsify.TaskVector(flat, zero), delta.shape, density, eps, rescale=rescale, generator=gen, size=size)
                o = _sparsify.sparsified(plan, _sparsify.TaskVector(flat, zero)).reshape(delta.shape)
                t = sparsify(delta, density, SparsificationMethod.della_magprune, epsilon=eps,
                             rescale_norm="l1" if rescale else None)
            kept_o += float((o != 0).float().mean()) / draws
            kept_t += float((t != 0).float().mean()) / draws
            ours_sum += o
            theirs_sum += t
        target = delta if rescale else delta * density
        err_o = float((ours_sum / draws - target).abs().mean() / delta.abs().mean())
        err_t = float((theirs_sum / draws - target).abs().mean() / delta.abs().mean())
        print(f"{label:30s} {kept_o:10.4f} {kept_t:10.4f} {err_o:14.4f} {err_t:12.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    cases = CASES
    if sys.argv[1:]:
        cases = [c for c in cases if any(a in c.label for a in sys.argv[1:])]
    status = run(cases)
    if not sys.argv[1:]:
        distribution_checks()
    sys.exit(status)
