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
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods.registry import Param, merge_method

EPSILON = Param("epsilon", float, default=1e-5, doc="Task-vector magnitude above which an entry contributes.")


def _masked_deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, keep: bool):
    """Masked task-vector sum, contributor counts (float) and, with `keep`, per-model (delta, mask) pairs.

    The deltas are zeroed where they do not contribute. Scratch buffers are reused across models.
    """
    total = torch.zeros_like(base)
    counts = torch.zeros_like(base)
    kept = []
    delta = torch.empty_like(base)
    flag = torch.empty_like(base)
    for t in tensors:
        if keep:
            delta = torch.empty_like(base)
        torch.sub(t, base, out=delta)
        torch.abs(delta, out=flag)
        torch.gt(flag, epsilon, out=flag)  # 1.0 where the entry contributes, else 0.0
        delta.mul_(flag)
        counts.add_(flag)
        total.add_(delta)
        if keep:
            kept.append((delta, flag.bool()))
    return total, counts, kept


@merge_method(
    "ram",
    params=[EPSILON],
    base="required",
    min_models=0,
    elementwise=True,
    reference="https://arxiv.org/abs/2601.13572",
)
def ram(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """base + the sum of contributing task-vector entries divided by their contributor count."""
    if not tensors:
        return base
    total, counts, _ = _masked_deltas(tensors, base, float(epsilon), keep=False)
    return total.div_(counts.clamp_(min=1)).add_(base)


@merge_method(
    "ramplus_tl",
    params=[
        Param("r", float, default=0.1, doc="Strength of the amplification of unique contributions."),
        Param("alpha", float, default=0.2, doc="Cap on the shared/unique ratio ρ."),
        EPSILON,
    ],
    base="required",
    min_models=0,
    reference="https://arxiv.org/abs/2601.13572",
)
def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM with each model's unique contributions scaled by λᵢ = 1 + r·clamp(shared/unique, 0, alpha)."""
    if not tensors:
        return base
    shared_sum, counts, kept = _masked_deltas(tensors, base, float(epsilon), keep=True)
    unique = counts == 1
    unique_sum = torch.zeros_like(base)
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    for delta, mask in kept:
        contributing = torch.count_nonzero(mask)
        unique_count = torch.count_nonzero(mask & unique)
        shared_count = contributing - unique_count
        rho = shared_count.to(work) / unique_count.to(work).clamp(min=float(epsilon))
        lam = (1 + float(r) * rho.clamp(0.0, float(alpha))).to(base.dtype)  # 0-d, stays on the device
        unique_sum.addcmul_(delta, lam)
    shared_sum.div_(counts.clamp_(min=1))
    return torch.where(unique, unique_sum, shared_sum).add_(base)
