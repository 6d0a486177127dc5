"""Sign consensus (TIES "elect" and "disjoint merge") for weighted task vectors.

* `elect_sign`: the majority sign per entry, +1 or -1 (a tie or a zero total elects +1, as in mergekit):
    - "sum": the sign of the sum of the weighted task vectors (the TIES paper's mass-weighted vote);
    - "count": the sign of the number of positive minus negative entries (one vote per model).
* `agrees`: which entries of one weighted task vector carry the elected sign; zeros never agree.
* `disjoint_merge`: the sum of the agreeing entries and, per entry, the sum of the weights of the models
  that agree (the divisor for `normalize`).

mergekit hard-codes "sum" for every method that elects signs; here `consensus_method` selects it.
"""

from __future__ import annotations

from typing import Sequence

import torch

CONSENSUS_METHODS = ("sum", "count")


def elect_sign(weighted: Sequence[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """+1/-1 per entry: the majority sign of `weighted` (one tensor per model) by `method`."""
    if method not in CONSENSUS_METHODS:
        raise ValueError(f"unknown consensus method {method!r} (expected sum or count)")
    votes = (lambda w: w) if method == "sum" else torch.sign
    total = votes(weighted[0]).clone() if method == "sum" else votes(weighted[0])
    for w in weighted[1:]:
        total.add_(votes(w))
    # total >= 0 -> +1, else -1, written into total's own storage
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def agreement(weighted: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """1.0 where the entry's sign equals the elected one, else 0.0 (zero entries never agree); float, in the
    dtype of `weighted`, so it multiplies and accumulates without conversions."""
    return weighted.sign().mul_(majority).clamp_(min=0)


def agrees(weighted: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the entries whose sign equals the elected one (zero entries never do)."""
    return weighted.sign() == majority


def disjoint_merge(
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    majority: torch.Tensor,
    *,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ agreeing entries, Σ weights of the agreeing models) per entry.

    With `in_place` the tensors of `weighted` are overwritten (their disagreeing entries zeroed, the first
    one becoming the sum).
    """
    mixed = divisor = None
    for w, weight in zip(weighted, weights):
        agree = agreement(w, majority)
        kept = w.mul_(agree) if in_place else w * agree
        if mixed is None:
            mixed = kept
            divisor = agree.mul_(float(weight))
        else:
            mixed.add_(kept)
            divisor.add_(agree, alpha=float(weight))
    return mixed, divisor
