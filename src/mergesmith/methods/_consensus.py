"""Sign consensus (TIES "elect" and "disjoint merge") on one chunk of task vectors.

* `elect_sign_into`: the majority sign per entry, +1 or -1 (a tie or a zero total elects +1, as in mergekit):
    - "sum": the sign of the sum of the task vectors (the TIES paper's mass-weighted vote);
    - "count": the sign of the number of positive minus negative entries (one vote per model).
* `disjoint_into`: the sum of the entries that carry the elected sign (zeros never agree) and, per entry,
  the sum of the weights of the models that agree (the divisor for `normalize`).

Everything is float arithmetic (`sign`, `clamp`, multiply) written into caller-owned buffers: PyTorch's CPU
`where` and boolean kernels cost 5-40x more per element and would dominate the merge. The buffers may be of
a wider dtype than the deltas (`accumulation_dtype`): sums then round once.
mergekit hard-codes "sum" for every method that elects signs; here `consensus_method` selects it.
"""

from __future__ import annotations

from typing import Sequence

import torch

CONSENSUS_METHODS = ("sum", "count")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums across models run in: float32 for the 16-bit dtypes, which then round once per entry
    (as torch's `sum(dim=0)` does in mergekit's bf16 arithmetic), else the dtype itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (mergekit builds its weight tensors in the merge dtype)."""
    return float(torch.tensor(value, dtype=dtype))


def sum_into(deltas: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Σ deltas into `out` (of a wider dtype than the deltas: the sum rounds once, when read back)."""
    out.copy_(deltas[0])
    for d in deltas[1:]:
        out.add_(d)
    return out


def elect_sign_into(deltas: Sequence[torch.Tensor], method: str, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """+1/-1 per entry, the majority sign of `deltas` (one chunk per model) by `method`, written into `out`."""
    if method == "sum":
        sum_into(deltas, out)
    elif method == "count":
        _sign_into(deltas[0], out)
        for d in deltas[1:]:
            out.add_(_sign_into(d, scratch))
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
) -> torch.Tensor:
    """mixed = Σ agreeing entries, divisor = Σ weights of the agreeing models; the deltas are overwritten
    (each product is rounded to the deltas' dtype before it is summed, as mergekit's is). Returns `mixed`.

    With `weigh_deltas` each agreeing entry is multiplied by its model's weight (SCE: δ·(η·m)); without, the
    deltas come weighted already (TIES: (w·δ)·m)."""
    for i, (d, w) in enumerate(zip(deltas, weights)):
        agree = _sign_into(d, scratch).mul_(majority).clamp_(min=0)
        if weigh_deltas:
            agree.mul_(w)  # ηᵢ·mᵢ: the weight is in the factor, and so in the divisor
        counted = 1.0 if weigh_deltas else w
        if i == 0:
            if mixed.dtype == d.dtype:
                torch.mul(d, agree, out=mixed)
            else:
                mixed.copy_(d.mul_(agree))
            torch.mul(agree, counted, out=divisor)
        else:
            mixed.add_(d.mul_(agree))
            divisor.add_(agree, alpha=counted)
    return mixed


def _sign_into(d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sign(d) into `out`, which may be of a wider dtype (torch.sign's out= must match d's)."""
    return torch.sign(d, out=out) if out.dtype == d.dtype else out.copy_(d).sign_()


def zero_to_one_(divisor: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Replace the zeros of `divisor` by 1 (an entry no model agrees on sums to 0 and is divided by 1)."""
    return divisor.add_(torch.abs(divisor, out=scratch).sign_().neg_().add_(1))
