"""The shared pipeline of the task-vector family (TIES, DARE, Breadcrumbs, DELLA and their linear variants).

    δᵢ = modelᵢ − base                          task vectors
    δᵢ ← sparsify(δᵢ, densityᵢ, ...)            optional: magnitude / random / outliers / DELLA (+ L1 rescale)
    δᵢ ← wᵢ · δᵢ                                 weights
    with consensus:  keep entries whose sign matches the elected sign (sum or count), divisor = Σ agreeing wᵢ
    without:         divisor = Σ wᵢ
    out = base + λ · Σ δᵢ / (divisor if normalize)

Divisors: with consensus an entry no model agrees on has divisor 0, treated as 1; without consensus a weight
sum with |Σ w| < 1e-8 is treated as 1. Both as in mergekit's generalized task arithmetic.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from mergesmith.methods import _kernels, _sparsify
from mergesmith.methods._consensus import (
    CONSENSUS_METHODS, accumulation_dtype, disjoint_into, elect_sign_into, in_dtype, sum_into, zero_to_one_,
)
from mergesmith.methods._parallel import in_parts, together
from mergesmith.methods.registry import Param

DENSITY = Param("density", float, default=1.0, per_model=True, doc="Fraction of this model's task vector to keep.")
GAMMA = Param(
    "gamma", float, default=0.01, per_model=True,
    doc="Fraction of largest-magnitude entries dropped as outliers (Breadcrumbs).",
)
EPSILON = Param(
    "epsilon", float, default=0.15, per_model=True,
    doc="Half-width of DELLA's keep probabilities: density ± epsilon from smallest to largest magnitude in a row.",
)
CONSENSUS = Param(
    "consensus_method", str, default="sum", choices=CONSENSUS_METHODS,
    doc="How the majority sign is elected: 'sum' (sign of the summed task vectors, TIES) or 'count' (one vote per model).",
)


def task_vector_params(*, normalize: bool, rescale: bool, extra: Sequence[Param] = ()) -> tuple[Param, ...]:
    """mergekit's parameters of a generalized task-arithmetic method, with that method's defaults."""
    params = (
        Param("weight", float, per_model=True, doc="Scale of this model's task vector."),
        Param("normalize", bool, default=normalize, doc="Divide by the sum of the weights (of the agreeing models, with consensus)."),
        Param("lambda", float, default=1.0, doc="Scale of the combined task vector."),
        Param("int8_mask", bool, default=False, doc="Accepted for mergekit compatibility; masks are always boolean."),
        Param(
            "rescale", bool, default=rescale,
            doc="After sparsifying, scale each task vector so its L1 norm matches the unsparsified one.",
        ),
        DENSITY,
    )
    return params + tuple(extra)


Sparsifier = Callable[["_sparsify.TaskVector", int, int], "_sparsify.Plan | None"]
"""(task vector, model index, chunk size) -> the plan that sparsifies that model's task vector chunk by chunk
(see `_sparsify.Plan`), or None to keep it whole. Plans are made in model order unless built concurrently
(see `_build_plans`)."""


def _build_plans(sparsify: Sparsifier | None, tvs: list, size: int, concurrent: bool) -> list:
    """One sparsification plan per task vector; with `concurrent`, built `together`. Random plans may only
    when their stream seeds were drawn beforehand, in model order (as DARE does with `stream_seed`): built
    concurrently, they would race for the shared generator."""
    if sparsify is None:
        return [None] * len(tvs)
    if not concurrent:
        return [sparsify(tv, i, size) for i, tv in enumerate(tvs)]
    return together([lambda tv=tv, i=i: sparsify(tv, i, size) for i, tv in enumerate(tvs)], tvs[0].device)


def merge_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None,
    consensus: str | None,
    normalize: bool,
    scale: float,
    dtype: torch.dtype | None = None,
    concurrent_plans: bool = False,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """base + scale · (sparsified, weighted, optionally sign-agreeing) task vectors; see the module docstring.
    `concurrent_plans`: the plans may be built at once (no random draws, or seeds drawn ahead), see `_build_plans`.

    Streams over cache-sized chunks (`_sparsify.chunk_size`): the task vectors are recomputed per chunk
    from the inputs instead of being stored, and the only full-size allocation is the output (plus one bool
    mask per model for the random methods). Every output element goes through the same float operations, in
    the same order, as the whole-tensor formulation. The work is done in `dtype` (default: the base's); the
    inputs may be stored in another (bf16 as read), each chunk is converted as it is used.

    `output_dtype`: the dtype the caller will store the result in. Where the compiled loops merge float32 into
    bf16, the result comes back in it, each chunk rounded once as `Tensor.to` would (no float32 output tensor,
    no second pass); otherwise it comes back in `dtype`.
    """
    dtype = dtype or base.dtype
    if not tensors:
        return base.to(dtype)
    if consensus is not None and consensus not in CONSENSUS_METHODS:
        raise ValueError(f"unknown consensus method {consensus!r} (expected sum or count)")
    n = base.numel()
    size = _sparsify.chunk_size(base)
    flat_base = base.reshape(-1)
    tvs = [_sparsify.TaskVector(t, base, dtype) for t in tensors]
    plans = _build_plans(sparsify, tvs, size, concurrent_plans)
    # every model count takes the loops, plain task arithmetic included (1B: three fine-tunes 5.2 -> 2.9 s,
    # four 7.6 -> 4.6 s against torch's ops; linear took 3.1 and 5.0 s)
    compiled = n > 0 and all(tv.compiled() for tv in tvs)
    out = torch.empty(base.shape, dtype=_kernels.result_dtype(dtype, output_dtype, compiled), device=base.device)
    flat_out = out.view(-1)
    if n == 0:
        return out
    # 16-bit dtypes: weights rounded to the dtype and sums across models in float32 rounded once, which is
    # mergekit's arithmetic there (bf16 weight tensors, `sum(dim=0)`); wider dtypes: unchanged
    acc = accumulation_dtype(dtype)
    wide = acc != dtype
    ws = [in_dtype(float(w), dtype) if wide else float(w) for w in weights]
    total = in_dtype(sum(ws), dtype) if wide else float(sum(ws))
    if compiled:
        work = _compiled_merge(tvs, plans, ws, consensus=consensus, normalize=normalize, total=total, scale=scale,
                               flat_out=flat_out)
        in_parts(_sparsify.spans(n, _kernels.CHUNK), work, base.device)
        return out

    def merge_chunks(chunks: list[tuple[int, int]]) -> None:
        """The merge of the chunks' spans into `out`, with buffers of its own (chunks are independent)."""
        width = max(e - s for s, e in chunks)
        deltas = [torch.empty(width, dtype=dtype, device=base.device) for _ in tensors]
        mask_buf = torch.empty(width, dtype=_sparsify.selection_dtype(dtype), device=base.device)
        scratch = torch.empty(width, dtype=acc, device=base.device)
        sums = torch.empty(width, dtype=acc, device=base.device) if wide else None
        narrow = torch.empty(width, dtype=dtype, device=base.device) if wide else None
        if consensus is not None:
            votes = torch.empty(width, dtype=acc, device=base.device)
            divisor = torch.empty(width, dtype=acc, device=base.device)
        for s, e in chunks:
            m = e - s
            b = flat_base[s:e]
            mixed = flat_out[s:e]
            ds = []
            for tv, plan, buf in zip(tvs, plans, deltas):
                d = tv.chunk(s, e, buf[:m])
                if plan is not None:
                    plan.apply(d, s, mask_buf[:m])
                ds.append(d)
            total_into = sums[:m] if wide else mixed
            if consensus is None:
                if wide:  # mergekit: the weighted deltas rounded, then summed
                    for d, w in zip(ds, ws):
                        d.mul_(w)
                    mixed.copy_(sum_into(ds, total_into))
                else:
                    mixed.zero_()
                    for d, w in zip(ds, ws):
                        mixed.add_(d, alpha=w)
                if normalize and abs(total) >= 1e-8:
                    mixed.div_(total)
            else:
                for d, w in zip(ds, ws):
                    d.mul_(w)
                majority = elect_sign_into(ds, consensus, votes[:m], scratch[:m])
                div = divisor[:m]
                disjoint_into(ds, ws, majority, total_into, div, scratch[:m], weigh_deltas=False)
                if wide:
                    mixed.copy_(total_into)
                if normalize:
                    zero_to_one_(div, scratch[:m])
                    mixed.div_(narrow[:m].copy_(div) if wide else div)  # mergekit divides by the rounded divisor
            if scale != 1.0:
                mixed.mul_(scale)
            mixed.add_(b)

    in_parts(_sparsify.spans(n, size), merge_chunks, base.device)
    return out


def _compiled_merge(tvs: list, plans: list, weights: list[float], *, consensus: str | None, normalize: bool,
                    total: float, scale: float, flat_out: torch.Tensor) -> Callable[[list[tuple[int, int]]], None]:
    """`merge_task_vectors`' chunk work on float32 CPU tensors with `_kernels`' loops, each writing the output
    directly (float32, or bf16 rounded as it is stored): two to twelve models (three or more when elected by
    count) in one pass that keeps the deltas in registers (`pair_delta_merge_into`, `_generated_loops`); otherwise
    each model's masked, rescaled, weighted delta written as a row and the rows combined, a block of entries
    at a time (`rows_merge_into`)."""
    loops = _kernels.loops()
    rules = [p.rule if p is not None else _sparsify.KeepRule() for p in plans]
    rescales = [np.float32(1) if p is None or p.scale is None else np.float32(float(p.scale)) for p in plans]
    ws = np.array(weights, dtype=np.float32)
    divide = normalize and abs(total) >= 1e-8

    if _kernels.one_pass(len(tvs), consensus == "count"):  # one loop from inputs to output, no rows
        elect, by_count = consensus is not None, consensus == "count"
        how = (elect, False, normalize if elect else divide)  # the loops' elect, weigh (SCE's only), normalize
        divisor = np.float32(0 if elect else total)
        factors = np.array([x for pair in zip(rescales, ws) for x in pair], dtype=np.float32)

        def one_pass(chunks: list[tuple[int, int]]) -> None:
            """(Three models: 1B TIES' merge pass had taken 3.35 s through the rows, against 1.07 for two.)"""
            outputs = _kernels.OutputChunks(flat_out, max(e - s for s, e in chunks))
            for s, e in chunks:
                bounds = [(*rule.keep.bounds(s), *rule.drop.bounds(s)) for rule in rules]
                stored = [rule.stored_array(s, e) for rule in rules]
                models, base = _sparsify.models_and_base(tvs, s, e)
                _kernels.one_pass_merge_into(models, base, bounds, stored, _sparsify.ANY_DISTANCE, factors, ws,
                                             how, divisor, np.float32(scale), outputs.direct(s, e), by_count)

        return one_pass

    factors = np.array(list(zip(rescales, ws)), dtype=np.float32)  # each model's rescale, weight
    how = (consensus is not None, False, consensus == "count", divide if consensus is None else normalize)  # SCE weighs

    def in_blocks(chunks: list[tuple[int, int]]) -> None:
        """More than twelve models, or two elected by count: rows a block of entries at a time."""
        rows, scratch = _kernels.rows_scratch(len(tvs))
        outputs = _kernels.OutputChunks(flat_out, max(e - s for s, e in chunks))
        for s, e in chunks:
            limits, splits = _sparsify.row_bounds(rules, s)
            models, base = _sparsify.models_and_base(tvs, s, e)
            loops.rows_merge_into(tuple(models), base, limits, splits, tuple(rule.stored_array(s, e) for rule in rules),
                                  factors, ws, how, np.float32(total), np.float32(scale), rows, scratch,
                                  outputs.direct(s, e))

    return in_blocks


def per_model_check(name: str, fn: Callable[..., str | None], *keys: str) -> Callable[[dict], str | None]:
    """A registry `check` applying `fn` to each model's values of the per-model parameters `keys`."""

    def check(params: dict) -> str | None:
        columns = [params.get(k) for k in keys]
        if any(c is None for c in columns):
            return None
        for i, values in enumerate(zip(*columns)):
            problem = fn(*values)
            if problem:
                return f"{name}, model {i + 1}: {problem}"
        return None

    return check


__all__ = [
    "CONSENSUS",
    "DENSITY",
    "EPSILON",
    "GAMMA",
    "in_parts",
    "merge_task_vectors",
    "per_model_check",
    "task_vector_params",
    "_sparsify",
]
