"""SCE (arXiv 2408.07990): Select the entries whose task vectors vary most across models, Calculate per-model
weights from the task vectors' energy, Erase entries that disagree with the elected sign, then merge.

    δᵢ = modelᵢ − base, masked to the top `select_topk` fraction of entries by variance across models
         (the fraction counts entries of non-zero variance; 1 selects everything)
    ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²)
    out = base + Σᵢ ηᵢ·mᵢ·δᵢ / max(Σᵢ ηᵢ·mᵢ, 1e-6),   mᵢ = sign agreement with the elected sign

Parameters follow mergekit's `sce` (`select_topk`, `int8_mask`; no weights), plus `consensus_method`.

Deviation from mergekit: mergekit falls back to uniform weights ηᵢ = 1/N whenever Σⱼ mean(δⱼ²) < 1e-6, an
absolute threshold that real fine-tunes (entries of ~1e-3 or less, mean squares ~1e-6 or less) fall under
for most tensors, so the energy weighting silently disappears. The weights are a ratio and do not depend on
the scale of the task vectors; we use uniform weights only when that sum is exactly zero (all task vectors
zero after selection) or not finite.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods._consensus import agreement, elect_sign
from mergesmith.methods._sparsify import variance_topk
from mergesmith.methods._task_vectors import CONSENSUS
from mergesmith.methods.registry import Param, merge_method


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) for stacked task vectors; uniform when the sum is 0 or not finite."""
    n = task_vectors.shape[0]
    energy = task_vectors.square().reshape(n, -1).mean(dim=1)
    total = float(energy.sum())
    if total == 0 or not torch.isfinite(torch.tensor(total)):
        return torch.full_like(energy, 1.0 / n)
    return energy / total


@merge_method(
    "sce",
    params=(
        Param("select_topk", float, default=1.0, doc="Fraction of entries (by variance across models) to keep; 1 keeps all."),
        Param("int8_mask", bool, default=False, doc="Accepted for mergekit compatibility; masks are always boolean."),
        CONSENSUS,
    ),
    base="required",
    min_models=0,
    reference="https://arxiv.org/abs/2408.07990",
)
def sce(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    consensus_method: str = "sum",
) -> torch.Tensor:
    """Select by variance, weight by energy, erase minority signs, merge."""
    if not tensors:
        return base
    task_vectors = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        task_vectors.mul_(variance_topk(task_vectors, select_topk))
    weights = sce_weights(task_vectors)
    rows = list(task_vectors.unbind(0))
    majority = elect_sign(rows, consensus_method)
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for row, w in zip(rows, weights.tolist()):
        agree = agreement(row, majority)
        merged.add_(row.mul_(w).mul_(agree))
        divisor.add_(agree, alpha=w)
    return base + merged / divisor.clamp_(min=1e-6)
