"""Numerical parity of mergesmith's merge methods with mergekit's, on the same random tensors.

Run from the repository root with the interpreter that has mergekit installed:

    PYTHONPATH=src /work/mkenv/bin/python bench/parity_methods.py [substring ...]

It prints one row per case: the largest absolute difference between the two outputs, the largest
absolute output value (for scale) and the difference in units of float32 epsilon relative to that scale.
Optional arguments keep only the cases whose label contains one of the substrings.

Adding cases: build `Case` objects and put them in a module-level list `CASES`. This file runs its own
list and then, when present, `bench/parity_task_vectors.py`'s `CASES` (owned by the task-vector methods).
A case describes the inputs; both libraries are called through their public method registries:

* mergekit: `mergekit.merge_methods.registry.get(name)([TensorGroup], parameters=...)`;
* mergesmith: `get_method(name).func(tensors, base=..., **params)` following the registry contract.

For methods that draw random numbers, pass `ours`/`theirs` callables to control the call yourself.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

Tensor = torch.Tensor


@dataclass
class Case:
    """One comparison. `params` are global; `model_params` map a name to one value per non-base model."""

    label: str
    method: str
    shape: tuple[int, ...] = (64, 48)
    models: int = 2
    base: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, list[Any]] = field(default_factory=dict)
    inputs: str = "finetune"  # finetune | random | identical | zeros | opposed
    seed: int = 0
    mergekit_method: Optional[str] = None  # defaults to `method`
    deviation: str = ""  # non-empty: a documented, intended difference from mergekit (not flagged)
    # Overrides: f(base or None, models) -> Tensor
    ours: Optional[Callable[[Optional[Tensor], list[Tensor]], Tensor]] = None
    theirs: Optional[Callable[[Optional[Tensor], list[Tensor]], Tensor]] = None


def make_inputs(case: Case) -> tuple[Optional[Tensor], list[Tensor]]:
    """(base or None, list of model tensors), float32, deterministic per case."""
    g = torch.Generator().manual_seed(case.seed)

    def randn() -> Tensor:
        return torch.randn(case.shape, generator=g, dtype=torch.float32)

    base = randn() * 0.02
    if case.inputs == "finetune":
        shared = randn() * 0.002
        models = [base + shared + randn() * 0.002 for _ in range(case.models)]
    elif case.inputs == "random":
        models = [randn() * 0.02 for _ in range(case.models)]
    elif case.inputs == "identical":
        models = [base.clone() for _ in range(case.models)]
    elif case.inputs == "zeros":
        base = torch.zeros(case.shape)
        models = [torch.zeros(case.shape) for _ in range(case.models)]
    elif case.inputs == "opposed":
        delta = randn() * 0.002
        models = [base + delta * (1 if i % 2 == 0 else -1) + randn() * 0.0002 for i in range(case.models)]
    else:
        raise ValueError(case.inputs)
    return (base if case.base else None), models


def run_mergekit(case: Case, base: Optional[Tensor], models: list[Tensor]) -> Tensor:
    if case.theirs is not None:
        return case.theirs(base, models)
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    tensors = ([base] if base is not None else []) + models
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None)
    params = dict(case.params)
    params.update(case.model_params)
    (out,) = get(case.mergekit_method or case.method)([group], parameters=params)
    return out


def run_ours(case: Case, base: Optional[Tensor], models: list[Tensor]) -> Tensor:
    if case.ours is not None:
        return case.ours(base, models)
    from mergesmith.methods import get_method

    spec = get_method(case.method)
    if spec is None:
        raise KeyError(case.method)
    kwargs: dict[str, Any] = {}
    for p in spec.params:
        if p.name in case.params:
            kwargs[p.arg] = case.params[p.name]
        elif p.name in case.model_params:
            kwargs[p.arg] = list(case.model_params[p.name])
    if spec.base == "ignored":
        tensors = ([base] if base is not None else []) + models
        return spec.func(tensors, **kwargs)
    return spec.func(models, base=base, **kwargs)


def compare(case: Case) -> tuple[float, float]:
    base, models = make_inputs(case)
    theirs = run_mergekit(case, base, models).float()
    ours = run_ours(case, base, models).float()
    if theirs.shape != ours.shape:
        raise AssertionError(f"{case.label}: shape {tuple(ours.shape)} vs mergekit {tuple(theirs.shape)}")
    if not torch.isfinite(ours).all():
        return math.inf, float(theirs.abs().max())
    diff = float((theirs - ours).abs().max()) if ours.numel() else 0.0
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    return diff, scale


def _w(*values: float) -> dict[str, list[float]]:
    return {"weight": list(values)}


CASES: list[Case] = [
    # slerp
    Case("slerp t=0.3", "slerp", models=1, params={"t": 0.3}),
    Case("slerp t=0.7 random", "slerp", models=1, params={"t": 0.7}, inputs="random", seed=1),
    Case("slerp t=0", "slerp", models=1, params={"t": 0.0}, seed=2),
    Case("slerp t=1", "slerp", models=1, params={"t": 1.0}, seed=3),
    Case("slerp 1-D", "slerp", shape=(300,), models=1, params={"t": 0.4}, inputs="random", seed=4),
    Case("slerp identical", "slerp", models=1, params={"t": 0.5}, inputs="identical"),
    Case("slerp zeros", "slerp", models=1, params={"t": 0.5}, inputs="zeros"),
    Case("slerp 3-D", "slerp", shape=(4, 16, 8), models=1, params={"t": 0.25}, inputs="random", seed=5),
    # nuslerp
    Case("nuslerp flat", "nuslerp", base=False, model_params=_w(1.0, 2.0), inputs="random"),
    Case("nuslerp flat base", "nuslerp", model_params=_w(1.0, 3.0), seed=1),
    Case("nuslerp rows", "nuslerp", base=False, model_params=_w(0.5, 0.5),
         params={"nuslerp_flatten": False}, inputs="random", seed=2),
    Case("nuslerp row_wise", "nuslerp", model_params=_w(2.0, 1.0),
         params={"nuslerp_flatten": False, "nuslerp_row_wise": True}, seed=3),
    Case("nuslerp 1-D rows", "nuslerp", shape=(257,), model_params=_w(1.0, 1.0),
         params={"nuslerp_flatten": False}, seed=4),
    Case("nuslerp zero weights", "nuslerp", model_params=_w(1.0, -1.0), seed=5),
    Case("nuslerp identical", "nuslerp", model_params=_w(1.0, 1.0), inputs="identical"),
    Case("nuslerp zeros", "nuslerp", base=False, model_params=_w(1.0, 1.0), inputs="zeros"),
    # multislerp
    Case("multislerp 3 base", "multislerp", models=3, model_params=_w(1.0, 2.0, 0.5)),
    Case("multislerp 3 nobase", "multislerp", models=3, base=False, model_params=_w(0.2, 0.3, 0.5),
         inputs="random", seed=1),
    Case("multislerp 2 unnorm", "multislerp", model_params=_w(0.3, 0.4),
         params={"normalize_weights": False}, seed=2),
    Case("multislerp 5 1-D", "multislerp", shape=(500,), models=5, model_params=_w(1, 1, 1, 1, 1), seed=3),
    Case("multislerp 1 model", "multislerp", models=1, model_params=_w(1.0), seed=4),
    Case("multislerp 2 identical", "multislerp", model_params=_w(1.0, 1.0), inputs="identical"),
    Case("multislerp 3 identical", "multislerp", models=3, model_params=_w(1, 1, 1), inputs="identical",
         deviation="mergekit raises for 3+ cancelling inputs; ours falls back to linear"),
    # karcher
    Case("karcher 2", "karcher", base=False, inputs="random"),
    Case("karcher 3+base", "karcher", models=3, seed=1),
    Case("karcher 4 random", "karcher", models=4, base=False, inputs="random", seed=2),
    Case("karcher 6 random", "karcher", models=6, base=False, inputs="random", seed=3,
         params={"max_iter": 20, "tol": 1e-6}),
    Case("karcher 10 (blocked Gram)", "karcher", models=10, base=False, inputs="random", seed=6),
    Case("multislerp 10 (blocked Gram)", "multislerp", models=10, model_params=_w(*range(1, 11)), seed=7),
    Case("karcher 1-D", "karcher", shape=(333,), models=3, base=False, inputs="random", seed=4),
    Case("karcher identical", "karcher", models=3, inputs="identical"),
    Case("karcher zeros", "karcher", models=2, inputs="zeros"),
    Case("karcher max_iter=1", "karcher", models=3, base=False, inputs="random", params={"max_iter": 1}, seed=5),
    # model_stock
    Case("model_stock 2", "model_stock"),
    Case("model_stock 3", "model_stock", models=3, seed=1),
    Case("model_stock filter_wise", "model_stock", models=3, params={"filter_wise": True}, seed=2),
    Case("model_stock filter_wise 1-D", "model_stock", shape=(100,), params={"filter_wise": True}, seed=3),
    Case("model_stock identical", "model_stock", inputs="identical"),
    Case("model_stock random 5", "model_stock", models=5, inputs="random", seed=4),
    Case("model_stock opposed", "model_stock", inputs="opposed", seed=5,
         deviation="mergekit t<0 for cos<0; ours clamps t to [0, 1]"),
    # nearswap
    Case("nearswap t=0.001", "nearswap", models=1, params={"t": 0.001}),
    Case("nearswap t=0.01", "nearswap", models=1, params={"t": 0.01}, inputs="random", seed=1),
    Case("nearswap t=0", "nearswap", models=1, params={"t": 0.0}, seed=2),
    Case("nearswap identical", "nearswap", models=1, params={"t": 0.001}, inputs="identical"),
    Case("nearswap 1-D", "nearswap", shape=(77,), models=1, params={"t": 0.002}, seed=3),
    # arcee_fusion
    Case("arcee_fusion", "arcee_fusion", models=1),
    Case("arcee_fusion random", "arcee_fusion", models=1, inputs="random", seed=1, shape=(128, 96)),
    Case("arcee_fusion 1-D", "arcee_fusion", shape=(1001,), models=1, seed=2),
    Case("arcee_fusion identical", "arcee_fusion", models=1, inputs="identical"),
    Case("arcee_fusion zeros", "arcee_fusion", models=1, inputs="zeros"),
    # ram / ramplus_tl
    Case("ram 3", "ram", models=3),
    Case("ram 3 eps=1e-3", "ram", models=3, params={"epsilon": 1e-3}, seed=1),
    Case("ram identical", "ram", models=2, inputs="identical"),
    Case("ramplus_tl 3", "ramplus_tl", models=3),
    Case("ramplus_tl 2 eps=2e-3", "ramplus_tl", models=2, params={"epsilon": 2e-3, "r": 0.5, "alpha": 0.7}, seed=1),
    Case("ramplus_tl 4 eps=3e-3", "ramplus_tl", models=4, params={"epsilon": 3e-3}, seed=2),
    Case("ramplus_tl identical", "ramplus_tl", models=2, inputs="identical"),
]


def _extra_cases() -> list[Case]:
    path = Path(__file__).with_name("parity_task_vectors.py")
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("parity_task_vectors", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("parity_methods", sys.modules[__name__])
    spec.loader.exec_module(module)
    return list(getattr(module, "CASES", []))


def run(cases: Sequence[Case]) -> int:
    eps32 = float(torch.finfo(torch.float32).eps)
    print(f"{'case':34s} {'max |diff|':>12s} {'max |out|':>10s} {'ulps':>8s}")
    worst = 0.0
    failures = 0
    for case in cases:
        try:
            diff, scale = compare(case)
        except Exception as exc:  # report and continue
            if case.deviation:
                print(f"{case.label:34s} mergekit: {type(exc).__name__}  (intended: {case.deviation})")
                continue
            print(f"{case.label:34s} ERROR {type(exc).__name__}: {exc}")
            failures += 1
            continue
        ulps = diff / (max(scale, 1e-30) * eps32) if diff else 0.0
        if case.deviation:
            print(f"{case.label:34s} {diff:12.3e} {scale:10.3e} {ulps:8.1f}  (intended: {case.deviation})")
            continue
        worst = max(worst, ulps)
        flag = "" if ulps < 64 else "  <-- MISMATCH"
        failures += bool(flag)
        print(f"{case.label:34s} {diff:12.3e} {scale:10.3e} {ulps:8.1f}{flag}")
    print(f"worst: {worst:.1f} float32 ulps of the output scale; {failures} problem case(s)")
    return 1 if failures else 0


def main(argv: Sequence[str]) -> int:
    torch.manual_seed(0)
    cases = CASES + _extra_cases()
    if argv:
        cases = [c for c in cases if any(a in c.label for a in argv)]
    return run(cases)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
