"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572): merge task vectors so that parameters only
one model changed keep their full update, while parameters several models changed are averaged over
those models only.

With task vectors δᵢ = modelᵢ − base, an entry of δᵢ *contributes* when |δᵢ| > epsilon, and cⱼ is the
number of models contributing to parameter j.

`ram` (elementwise):

    result = base + Σᵢ [|δᵢ| > ε]·δᵢ / max(c, 1)

i.e. a unique contribution (c = 1) is kept whole, shared ones are averaged, untouched entries stay base.

`ramplus_tl` (tensor-local RAM+) additionally amplifies each model's unique contributions. Per model i,
over the whole tensor: sᵢ = how many of its contributing entries are shared (c > 1), uᵢ = how many are
unique (c = 1), ρᵢ = sᵢ / max(uᵢ, ε), λᵢ = 1 + r·clamp(ρᵢ, 0, α). Then

    result = base + Σᵢ [|δᵢ| > ε]·δᵢ·(λᵢ if c = 1 else 1/c)

Parameter names and defaults are mergekit's (`epsilon` 1e-5; `r` 0.1, `alpha` 0.2). With no fine-tunes
the base is returned. Matches mergekit up to float32 rounding.

On float32 CPU compute both passes run on `_kernels`' loops (the same float operations in the same order
as the torch path below, which serves every other case): 1B RAM+ 7.8-8.9 -> 5.3-6.2 s. The merge makes the
masked task vectors a block of entries at a time, in cache (1B, four fine-tunes: RAM+ 8.5-9.5 -> 6.4-6.7 s,
RAM 6.0-6.4 -> 4.5-5.2 s; three: RAM+ 6.8 -> 5.4-5.8 s).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mergesmith.methods import _kernels
from mergesmith.methods._parallel import in_parts
from mergesmith.methods._sparsify import TaskVector, chunk_size, models_and_base, spans
from mergesmith.methods.registry import Param, merge_method

EPSILON = Param("epsilon", float, default=1e-5, doc="Task-vector magnitude above which an entry contributes.")


class _Contributions:
    """Per chunk of the flattened tensors: each model's task vector, zeroed where it does not contribute, and
    its 0/1 contribution flags, in the compute dtype (inputs may be stored narrower: bf16 as read). Buffers
    of its own, so one per thread; every entry goes through the same float operations whatever the chunking."""

    def __init__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor, dtype: torch.dtype, epsilon: float, width: int):
        self.models = [t.reshape(-1) for t in tensors]
        self.base, self.epsilon = base.reshape(-1), epsilon
        self.deltas = [torch.empty(width, dtype=dtype, device=base.device) for _ in tensors]
        self.flags = [torch.empty(width, dtype=dtype, device=base.device) for _ in tensors]
        self.base_buf = torch.empty(width, dtype=dtype, device=base.device)

    def chunk(self, s: int, e: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(base, [masked task vector], [flags]) of [s, e)."""
        m = e - s
        base = self.base_buf[:m].copy_(self.base[s:e])
        deltas, flags = [d[:m] for d in self.deltas], [f[:m] for f in self.flags]
        for model, delta, flag in zip(self.models, deltas, flags):
            delta.copy_(model[s:e]).sub_(base)
            torch.abs(delta, out=flag)
            torch.gt(flag, self.epsilon, out=flag)  # 1.0 where the entry contributes, else 0.0
            delta.mul_(flag)
        return base, deltas, flags


def _streamed(tensors, base, dtype, epsilon, work) -> None:
    """Run `work(contributions, s, e)` over the chunks of the tensors, in parts on CPU threads."""
    n = base.numel()

    def part(chunks):
        contributions = _Contributions(tensors, base, dtype, epsilon, max(e - s for s, e in chunks))
        for s, e in chunks:
            work(contributions, s, e)

    if n:
        in_parts(spans(n, chunk_size(base)), part, base.device)


def _is_one(counts: torch.Tensor) -> torch.Tensor:
    """1.0 where a (whole-number) contributor count is 1, else 0.0, in float arithmetic: 1 - |c - 1|, floored
    at 0 (PyTorch's boolean kernels cost several times more on CPU)."""
    return counts.sub_(1).abs_().neg_().add_(1).clamp_(min=0)


def _sum_and_count(deltas: list[torch.Tensor], flags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ masked deltas, contributor count) of a chunk, into the first model's buffers."""
    total, counts = deltas[0], flags[0]
    for delta, flag in zip(deltas[1:], flags[1:]):
        total.add_(delta)
        counts.add_(flag)
    return total, counts


def _compiled_inputs(tensors: Sequence[torch.Tensor], base: torch.Tensor, dtype: torch.dtype) -> list[TaskVector] | None:
    """The task vectors, when `_kernels`' loops can merge them (float32 on CPU, inputs bf16 or float32)."""
    tvs = [TaskVector(t, base, dtype) for t in tensors]
    return tvs if base.numel() and all(tv.compiled() for tv in tvs) else None


class _LoopBuffers:
    """A thread's buffers on the compiled path: the models' masked task vectors as rows of a block
    (`_kernels.ROWS_BLOCK` entries), the loops' scratch, and where its output goes (chunks of up to `width`)."""

    def __init__(self, tvs: list[TaskVector], epsilon: float, width: int, flat_out: torch.Tensor | None):
        self.tvs, self.epsilon = tvs, np.float32(epsilon)
        self.rows, scratch = _kernels.rows_scratch(len(tvs))
        self.counts, self.amplified = scratch[0], scratch[1]
        self.outputs = _kernels.OutputChunks(flat_out, width) if flat_out is not None else None


def _in_compiled_parts(tvs: list[TaskVector], epsilon: float, work, flat_out: torch.Tensor | None = None) -> list:
    """work(buffers, s, e) over the chunks, in parts on CPU threads, each with `_LoopBuffers` of its own;
    returns the parts' lists of results."""
    def part(chunks):
        buffers = _LoopBuffers(tvs, epsilon, max(e - s for s, e in chunks), flat_out)
        return [work(buffers, s, e) for s, e in chunks]

    return in_parts(spans(tvs[0].numel(), _kernels.CHUNK), part, tvs[0].device)


def _merge_compiled(tvs: list[TaskVector], epsilon: float, lams: Sequence[float] | None, out: torch.Tensor) -> torch.Tensor:
    """RAM's merge (RAM+ with `lams`) on the loops (`_kernels.ram_rows_merge_into`), into a float32 `out` or,
    rounded chunk by chunk, a bf16 one."""
    weights = np.array(lams if lams is not None else [1.0] * len(tvs), dtype=np.float32)
    loops = _kernels.loops()

    def merge(buffers: _LoopBuffers, s: int, e: int) -> None:
        models, base = models_and_base(tvs, s, e)
        loops.ram_rows_merge_into(tuple(models), base, buffers.epsilon, weights, lams is not None, buffers.rows,
                                  buffers.counts, buffers.amplified, buffers.outputs.target(s, e))
        buffers.outputs.done(s, e)

    _in_compiled_parts(tvs, epsilon, merge, out.view(-1))
    return out


def _tallies_compiled(tvs: list[TaskVector], epsilon: float) -> list[tuple[int, int]]:
    """Per model, (contributing entries, unique ones) over the whole tensor, on the loops."""
    loops = _kernels.loops()

    def tally(buffers: _LoopBuffers, s: int, e: int) -> np.ndarray:
        counts = np.zeros((len(tvs), 2), dtype=np.int64)
        models, base = models_and_base(tvs, s, e)
        if len(tvs) in (2, 3):  # one pass over the inputs, no masked task vectors written (0.3 against 1.1 ns an entry)
            (loops.pair_tallies if len(tvs) == 2 else loops.triple_tallies)(*models, base, buffers.epsilon, counts)
        else:
            loops.ram_rows_tallies(tuple(models), base, buffers.epsilon, buffers.rows, buffers.counts, counts)
        return counts

    total = sum(sum(part) for part in _in_compiled_parts(tvs, epsilon, tally))
    return [(int(c), int(u)) for c, u in total]


def _tallies(tensors: Sequence[torch.Tensor], base: torch.Tensor, dtype: torch.dtype, epsilon: float) -> list[tuple[int, int]]:
    """Per model, (contributing entries, unique ones) over the whole tensor, in torch."""
    parts = []

    def count(c: _Contributions, s: int, e: int) -> None:
        _, _, flags = c.chunk(s, e)
        # 0/1 floats: their sums and dot products are exact integers below 2^24 entries a chunk, in any order,
        # in float32 or wider (not in a 16-bit compute dtype: bf16 counts stop being exact past 256)
        flags = [f if f.dtype in (torch.float32, torch.float64) else f.float() for f in flags]
        unique = _is_one(sum(flags[1:], flags[0].clone()))
        parts.append([(int(f.sum()), int(torch.dot(f, unique))) for f in flags])

    _streamed(tensors, base, dtype, float(epsilon), count)
    return [(sum(p[i][0] for p in parts), sum(p[i][1] for p in parts)) for i in range(len(tensors))]


@merge_method(
    "ram",
    params=[EPSILON],
    base="required",
    min_models=0,
    elementwise=True,
    converts_inputs=True,
    rounds_output=True,
    reference="https://arxiv.org/abs/2601.13572",
)
def ram(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, epsilon: float = 1e-5,
        compute_dtype: torch.dtype | None = None, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """base + the sum of contributing task-vector entries divided by their contributor count."""
    if not tensors:
        return base if compute_dtype in (None, base.dtype) else base.to(compute_dtype)
    dtype = compute_dtype or base.dtype
    tvs = _compiled_inputs(tensors, base, dtype)
    if tvs is not None:
        return _merge_compiled(tvs, epsilon, None, torch.empty(base.shape, dtype=_kernels.result_dtype(dtype, output_dtype, True)))
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    flat_out = out.view(-1)

    def merge(c: _Contributions, s: int, e: int) -> None:
        b, deltas, flags = c.chunk(s, e)
        total, counts = _sum_and_count(deltas, flags)
        torch.add(total.div_(counts.clamp_(min=1)), b, out=flat_out[s:e])

    _streamed(tensors, base, dtype, float(epsilon), merge)
    return out


@merge_method(
    "ramplus_tl",
    params=[
        Param("r", float, default=0.1, doc="Strength of the amplification of unique contributions."),
        Param("alpha", float, default=0.2, doc="Cap on the shared/unique ratio ρ."),
        EPSILON,
    ],
    base="required",
    min_models=0,
    converts_inputs=True,
    rounds_output=True,
    reference="https://arxiv.org/abs/2601.13572",
)
def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    compute_dtype: torch.dtype | None = None,
    output_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """RAM with each model's unique contributions scaled by λᵢ = 1 + r·clamp(shared/unique, 0, alpha).

    Two streamed passes: the first counts each model's contributing and unique entries (λᵢ needs the whole
    tensor's counts), the second merges."""
    if not tensors:
        return base if compute_dtype in (None, base.dtype) else base.to(compute_dtype)
    dtype = compute_dtype or base.dtype
    tvs = _compiled_inputs(tensors, base, dtype)
    tallies = _tallies_compiled(tvs, epsilon) if tvs is not None else _tallies(tensors, base, dtype, epsilon)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    lams = []
    for contributing, unique_count in tallies:
        rho = torch.tensor(contributing - unique_count, dtype=work) / torch.tensor(unique_count, dtype=work).clamp(min=float(epsilon))
        lams.append((1 + float(r) * rho.clamp(0.0, float(alpha))).to(dtype))
    if tvs is not None:
        out = torch.empty(base.shape, dtype=_kernels.result_dtype(dtype, output_dtype, True))
        return _merge_compiled(tvs, epsilon, [float(lam) for lam in lams], out)
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    flat_out = out.view(-1)

    def merge(c: _Contributions, s: int, e: int) -> None:
        b, deltas, flags = c.chunk(s, e)
        unique_sum = torch.zeros_like(b)
        for delta, lam in zip(deltas, lams):
            unique_sum.addcmul_(delta, lam)
        shared_sum, counts = _sum_and_count(deltas, flags)
        unique = counts == 1
        shared_sum.div_(counts.clamp_(min=1))
        if shared_sum.device.type == "cpu" and shared_sum.dtype in (torch.float32, torch.float64):
            # numpy's masked copy: a fifth of torch.where's time on CPU (numpy has no bf16)
            np.copyto(shared_sum.numpy(), unique_sum.numpy(), where=unique.numpy())
            torch.add(shared_sum, b, out=flat_out[s:e])
        else:
            torch.add(torch.where(unique, unique_sum, shared_sum), b, out=flat_out[s:e])

    _streamed(tensors, base, dtype, float(epsilon), merge)
    return out
