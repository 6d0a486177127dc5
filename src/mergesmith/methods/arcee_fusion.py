"""Arcee Fusion: keep the base, and adopt the other model's value only where it changed in an important way.

With δ = other − base, each element's importance is |δ| times the KL divergence between softmax(other)
and softmax(base) taken along the tensor's last axis (one divergence per row; a 1-D tensor is one row):

    p = softmax(other) + 1e-8,  q = softmax(base) + 1e-8,  KL = Σ p·log(p/q)
    importance = |δ| · KL(row)

The threshold is median + 1.5·(Q3 − Q1) over all importances of the tensor (an outlier fence), where
the quartiles are order statistics: the element of rank ⌊q·(n−1)⌋ (0-based) in sorted order. Elements
with importance ≥ threshold take the other model's value; the rest keep the base.

Difference from mergekit: mergekit estimates the quartiles of tensors with more than 10⁶ elements from
10⁶ values drawn with replacement by an *unseeded* generator, so its output for large tensors changes
from run to run. We use the exact order statistics up to 2²⁴ (~16.8M) elements (agreeing with mergekit
exactly up to 10⁶), and beyond that 2²⁴ values drawn with a fixed seed: reproducible, and a 16x larger
sample than mergekit's. Fused elements are the other
model's value itself rather than base + (other − base) (a rounding-level difference).
Identical models give importance 0 everywhere, threshold 0, and return the (equal) inputs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mergesmith.methods.registry import merge_method

PROB_EPS = 1e-8
EXACT_LIMIT = 1 << 24


def importance_scores(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other − base| scaled by the per-row KL(softmax(other) ‖ softmax(base))."""
    p = torch.softmax(other, dim=-1).add_(PROB_EPS)
    q = torch.softmax(base, dim=-1).add_(PROB_EPS)
    kl = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
    del p, q
    return (other - base).abs_().mul_(kl)


def quartiles(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, median, Q3): the elements of 0-based rank ⌊q·(n−1)⌋ of `flat` in ascending order.

    Exact up to 2²⁴ elements; larger tensors use 2²⁴ values drawn with a fixed seed (reproducible).
    """
    if flat.numel() > EXACT_LIMIT:
        generator = torch.Generator(device=flat.device).manual_seed(0)
        flat = flat[torch.randint(flat.numel(), (EXACT_LIMIT,), generator=generator, device=flat.device)]
    last = flat.numel() - 1
    ranks = [last // 4, last // 2, (3 * last) // 4]
    if flat.device.type == "cpu":
        # One multi-rank selection (introselect), O(n), instead of a full sort.
        values = np.partition(flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32).numpy(), ranks)
        picked = torch.from_numpy(values[ranks]).to(flat.dtype)
    else:
        picked = torch.sort(flat).values[ranks]  # GPU radix sort beats per-slice selection
    return picked[0], picked[1], picked[2]


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    q1, median, q3 = quartiles(importance.reshape(-1))
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    base="required",
    min_models=1,
    max_models=1,
    reference="https://arcee.ai",
)
def arcee_fusion(tensors: Sequence[torch.Tensor], *, base: torch.Tensor) -> torch.Tensor:
    """Take the other model's value where its importance reaches the outlier fence; keep the base elsewhere."""
    other = tensors[0]
    if other.numel() == 0:
        return base.clone()
    shaped_other = other.reshape(1) if other.dim() == 0 else other
    shaped_base = base.reshape(1) if base.dim() == 0 else base
    importance = importance_scores(shaped_other, shaped_base)
    mask = importance >= fusion_threshold(importance)
    return torch.where(mask, shaped_other, shaped_base).reshape(base.shape)
