"""Sign consensus (TIES "elect" and "disjoint merge") on one chunk of task vectors.

* `elect_sign_into`: the majority sign per entry, +1 or -1 (a tie or a zero total elects +1, as in mergekit):
    - "sum": the sign of the sum of the task vectors (the TIES paper's mass-weighted vote);
    - "count": the sign of the number of positive minus negative entries (one vote per model).
* `disjoint_into`: the sum of the entries that carry the elected sign (zeros never agree) and, per entry,
  the sum of the weights of the models that agree (the divisor for `normalize`).

Everything is float arithmetic (`sign`, `clamp`, multiply) written into caller-owned buffers: PyTorch's CPU
`where` and boolean kernels cost 5-40x more per element and would dominate the merge.
mergekit hard-codes "sum" for every method that elects signs; here `consensus_method` selects it.
"""

from __future__ import annotations

from typing import Sequence

import torch

CONSENSUS_METHODS = ("sum", "count")


def elect_sign_into(deltas: Sequence[torch.Tensor], method: str, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """+1/-1 per entry, the majority sign of `deltas` (one chunk per model) by `method`, written into `out`."""
    if method == "sum":
        out.copy_(deltas[0])
        for d in deltas[1:]:
            out.add_(d)
    elif method == "count":
        torch.sign(deltas[0], out=out)
        for d in deltas[1:]:
            out.add_(torch.sign(d, out=scratch))
    else:
        raise ValueError(f"unknown consensus method {method!r} (expected sum or count)")
    # sign(sign(total) + 1/2): +1 where total >= 0, -1 below
    return torch.sign(out, out=out).add_(0.5).sign_()


def disjoint_into(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    majority: torch.Tensor,
    mixed: torch.Tensor,
    divisor: torch.Tensor,
    scratch: torch.Tensor,
    *,
    weigh_deltas: bool,
) -> None:
    """mixed = Σ agreeing entries, divisor = Σ weights of the agreeing models; the deltas are overwritten.

    With `weigh_deltas` each agreeing entry is multiplied by its model's weight (SCE: δ·(η·m)); without, the
    deltas come weighted already (TIES: (w·δ)·m)."""
    for i, (d, w) in enumerate(zip(deltas, weights)):
        agree = torch.sign(d, out=scratch).mul_(majority).clamp_(min=0)
        if weigh_deltas:
            agree.mul_(w)  # ηᵢ·mᵢ: the weight is in the factor, and so in the divisor
        counted = 1.0 if weigh_deltas else w
        if i == 0:
            torch.mul(d, agree, out=mixed)
            torch.mul(agree, counted, out=divisor)
        else:
            mixed.add_(d.mul_(agree))
            divisor.add_(agree, alpha=counted)


def zero_to_one_(divisor: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Replace the zeros of `divisor` by 1 (an entry no model agrees on sums to 0 and is divided by 1)."""
    return divisor.add_(torch.abs(divisor, out=scratch).sign_().neg_().add_(1))
