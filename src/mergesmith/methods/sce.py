"""SCE (arXiv 2408.07990): Select the entries whose task vectors vary most across models, Calculate per-model
weights from the task vectors' energy, Erase entries that disagree with the elected sign, then merge.

    δᵢ = modelᵢ − base, masked to the top `select_topk` fraction of entries by variance across models
         (the fraction counts entries of non-zero variance; 1 selects everything)
    ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²)
    out = base + Σᵢ ηᵢ·mᵢ·δᵢ / max(Σᵢ ηᵢ·mᵢ, 1e-6),   mᵢ = sign agreement with the elected sign

Parameters follow mergekit's `sce` (`select_topk`, `int8_mask`; no weights), plus `consensus_method`.

Energy floor: mergekit falls back to uniform weights ηᵢ = 1/N whenever Σⱼ mean(δⱼ²) < 1e-6, an absolute
threshold that real fine-tunes (entries of ~1e-3 or less, mean squares ~1e-6 or less) fall under for most
tensors, so the energy weighting silently disappears. We keep that as the default (`energy_floor: 1e-6`) so
that existing configs give mergekit's numbers; `energy_floor: 0` applies the paper's energy weighting to
every tensor (uniform weights then only when all task vectors are zero).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesmith.methods._consensus import agreement, elect_sign
from mergesmith.methods._sparsify import variance_topk
from mergesmith.methods._task_vectors import CONSENSUS
from mergesmith.methods.registry import Param, merge_method


def sce_weights(task_vectors: torch.Tensor, energy_floor: float = 0.0) -> torch.Tensor:
    """ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) for stacked task vectors; uniform when the sum is at most
    `energy_floor`, zero, or not finite."""
    n = task_vectors.shape[0]
    energy = task_vectors.square().reshape(n, -1).mean(dim=1)
    total = float(energy.sum())
    if total == 0 or abs(total) < energy_floor or not torch.isfinite(torch.tensor(total)):
        return torch.full_like(energy, 1.0 / n)
    return energy / total


@merge_method(
    "sce",
    params=(
        Param("select_topk", float, default=1.0, doc="Fraction of entries (by variance across models) to keep; 1 keeps all."),
        Param("int8_mask", bool, default=False, doc="Accepted for mergekit compatibility; masks are always boolean."),
        Param("energy_floor", float, default=1e-6, doc="Below this total energy the weights are uniform (mergekit's 1e-6); 0 always weights by energy."),
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
    energy_floor: float = 1e-6,
    consensus_method: str = "sum",
) -> torch.Tensor:
    """Select by variance, weight by energy, erase minority signs, merge."""
    if not tensors:
        return base
    task_vectors = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        task_vectors.mul_(variance_topk(task_vectors, select_topk))
    weights = sce_weights(task_vectors, energy_floor)
    rows = list(task_vectors.unbind(0))
    majority = elect_sign(rows, consensus_method)
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for row, w in zip(rows, weights.tolist()):
        agree = agreement(row, majority)
        merged.add_(row.mul_(w).mul_(agree))
        divisor.add_(agree, alpha=w)
    return base + merged / divisor.clamp_(min=1e-6)
