"""Model Stock (arXiv 2403.19522): move from the base towards the fine-tunes' average by a factor set by
the angle between their task vectors.

With N ≥ 2 fine-tunes wᵢ, task vectors δᵢ = wᵢ − w₀ and cos θ the mean pairwise cosine between the δᵢ
(each pair's cosine is δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), clamped to [−1, 1]):

    t = N·cos θ / (1 + (N − 1)·cos θ)          result = t·mean(wᵢ) + (1 − t)·w₀

With `filter_wise: false` (default) the cosine is taken over whole tensors; with `filter_wise: true` it
is taken per slice along the last axis (per row of a matrix; a 1-D tensor counts as one slice), giving
one t per row.

Difference from mergekit: t is clamped to [0, 1]. The paper's derivation assumes the fine-tunes are
spread at a common positive angle; when the task vectors point in opposing directions cos θ < 0 and
mergekit's t goes negative (extrapolating away from the fine-tunes), and it grows without bound as
1 + (N − 1)·cos θ approaches 0 (mergekit keeps the base only at exactly |denominator| < 1e-6). With the
clamp, any negative cosine keeps the base, and the singular point is no longer special. For cos θ ≥ 0 the
formula already lies in [0, 1] and nothing changes. Zero task vectors have cosine 0, hence t = 0.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods._linalg import gram, reduce_dtype
from mergesmith.methods.registry import Param, merge_method

PAIR_NORM_FLOOR = 1e-6


def stock_ratio(cos_theta: torch.Tensor, n: int) -> torch.Tensor:
    """t = N·cos/(1 + (N−1)·cos), clamped to [0, 1] (0 wherever cos ≤ 0)."""
    cos_theta = cos_theta.clamp(min=0.0)
    return (n * cos_theta / (1 + (n - 1) * cos_theta)).clamp(0.0, 1.0)


@merge_method(
    "model_stock",
    params=[Param("filter_wise", bool, default=False, doc="Compute the angle per row instead of per tensor.")],
    base="required",
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
)
def model_stock(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    """Interpolate between the base and the fine-tunes' average by the angle-derived ratio t."""
    n = len(tensors)
    deltas = [w - base for w in tensors]
    if not filter_wise or base.dim() <= 1:
        g = gram(deltas)
        norms = torch.diagonal(g).clamp(min=0).sqrt()
        cosines = [
            (g[i, j] / (norms[i] * norms[j]).clamp(min=PAIR_NORM_FLOOR)).clamp(-1.0, 1.0)
            for i in range(n)
            for j in range(i + 1, n)
        ]
        t = float(stock_ratio(torch.stack(cosines).mean(), n))
    else:
        work = reduce_dtype(base)
        d = [x.to(work) for x in deltas]
        row_norms = [torch.linalg.vector_norm(x, dim=-1) for x in d]
        total = torch.zeros_like(row_norms[0])
        for i in range(n):
            for j in range(i + 1, n):
                dot = (d[i] * d[j]).sum(dim=-1)
                total += (dot / (row_norms[i] * row_norms[j]).clamp(min=PAIR_NORM_FLOOR)).clamp(-1.0, 1.0)
        t = stock_ratio(total / (n * (n - 1) // 2), n).unsqueeze(-1).to(base.dtype)
    # t·mean(wᵢ) + (1 − t)·w₀ = w₀ + t·mean(δᵢ), accumulated in the scratch task vectors.
    total = deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    return total.mul_(t / n).add_(base)
