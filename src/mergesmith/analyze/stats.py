"""Task-vector statistics of one tensor, as additive sums so that layers and whole models aggregate exactly.

Every statistic the analysis reports is a ratio of sums (norms², dot products, mask counts, histogram
bins), so a tensor's `TensorStats` is computed once and added into its layer's and the model's totals; the
ratios are taken only at the end. Nothing here knows about files or models.

- cosine(i, j)          = Σ δᵢ·δⱼ / √(Σ δᵢ² · Σ δⱼ²)
- top-k mask of model i = entries whose |δᵢ| is among the `top_k` fraction largest of that tensor (per tensor,
                          as TIES trims), found with `kthvalue` (O(n)); exact zeros are never in a mask
- pairwise sign conflict = |mᵢ ∧ mⱼ ∧ sign δᵢ ≠ sign δⱼ| / |mᵢ ∧ mⱼ|
- Jaccard(i, j)          = |mᵢ ∧ mⱼ| / |mᵢ ∨ mⱼ|
- conflict rate          = positions where ≥ 2 models are in their top-k and their signs disagree, over
                          positions where ≥ 2 models are in their top-k
- interference           = the same conflicting positions over the union of all top-k masks
- effective rank         = exp(entropy of σ / Σσ) (Roy & Vetterli 2007), per 2-D tensor; averaged
- norm retained          = ‖mean θ‖ / mean ‖θᵢ‖ per tensor (how much a linear average shrinks the weights; the same
                          for task vectors δ), averaged over tensors weighted by their size
- mass fraction          = the fewest entries that carry 90 % of Σ δ² (their share of all entries), read from a
                          magnitude histogram (32 bins per octave), exact when the crossing bin holds one value
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

MASS_LEVEL = 0.9
# magnitude histogram: 32 bins per octave from 2^-48 to 2^24; smaller (larger) magnitudes share the first (last) bin.
_HIST_LO, _HIST_HI, _HIST_PER_OCTAVE = -48, 24, 32
HIST_BINS = (_HIST_HI - _HIST_LO) * _HIST_PER_OCTAVE
RANK_ROWS = 512


def topk_mask(delta: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the `fraction` largest-magnitude entries (at least one); ties at the threshold are kept."""
    magnitude = delta.abs().flatten()
    n = magnitude.numel()
    if n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    return ((delta.abs() >= threshold) & (delta != 0)).reshape(delta.shape)


def effective_rank(matrix: torch.Tensor, *, max_rows: int = RANK_ROWS, seed: int = 0) -> tuple[float, int]:
    """Entropy effective rank of a 2-D tensor and the rank bound it is measured against (min of the used shape).

    When both sides exceed `max_rows`, `max_rows` random rows are used (a fixed seed per tensor): the result is
    then the effective rank of that row sample, at most `max_rows`; compare the normalized value across tensors.
    """
    m = matrix.float()
    if min(m.shape) > max_rows:
        if m.shape[0] < m.shape[1]:
            m = m.T
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(m.shape[0], generator=gen)[:max_rows].sort().values
        m = m.index_select(0, rows)
    if m.shape[0] > m.shape[1]:
        m = m.T
    bound = min(m.shape)
    # σ² are the eigenvalues of the small Gram matrix m mᵀ (r × r), far cheaper than an SVD of a wide matrix;
    # in float32 its rounding noise is below r·ε·λ_max, so smaller eigenvalues count as zero.
    eig = torch.linalg.eigvalsh((m @ m.T).double())
    tol = float(eig.max()) * bound * torch.finfo(torch.float32).eps if eig.numel() else 0.0
    s = torch.where(eig > tol, eig, torch.zeros_like(eig)).sqrt()
    total = s.sum()
    if bound == 0 or total <= 0 or not torch.isfinite(total):
        return 0.0, bound
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())), bound


def magnitude_histogram(delta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(count, Σ x²) per magnitude bin of the non-zero entries.

    A bin is a float32 exponent and the top five bits of the mantissa (32 bins per octave), read straight from
    the bit pattern: no logarithm, one shift.
    """
    x = delta.detach().flatten().float().contiguous()
    if x.numel() == 0:
        return np.zeros(HIST_BINS), np.zeros(HIST_BINS)
    bits = x.view(torch.int32) & 0x7FFFFFFF
    index = ((bits >> 18) - (127 + _HIST_LO) * _HIST_PER_OCTAVE).clamp_(0, HIST_BINS - 1).long()
    counts = torch.bincount(index, minlength=HIST_BINS).double().numpy()
    counts[0] -= int((bits == 0).sum())  # zeros carry no mass and are not counted
    mass = torch.bincount(index, weights=x.double().square(), minlength=HIST_BINS).numpy()
    return counts, mass


def mass_fraction(counts: np.ndarray, mass: np.ndarray, numel: int, level: float = MASS_LEVEL) -> float:
    """Share of all `numel` entries needed, largest first, to reach `level` of the total squared mass."""
    total = float(mass.sum())
    if numel == 0 or total <= 0:
        return 0.0
    target = level * total
    taken = 0.0
    entries = 0.0
    for b in range(len(mass) - 1, -1, -1):
        if mass[b] <= 0:
            continue
        if taken + mass[b] >= target * (1 - 1e-12):
            need = target - taken
            entries += max(1.0, math.ceil(counts[b] * need / mass[b] - 1e-9))
            return float(min(1.0, entries / numel))
        taken += mass[b]
        entries += counts[b]
    return float(min(1.0, entries / numel))


@dataclass
class TensorStats:
    """Additive sums over some set of tensors for `n` models (fine-tunes)."""

    n: int
    tensors: int = 0
    numel: int = 0
    norm2: np.ndarray = field(default=None)  # type: ignore[assignment]  # Σ δᵢ²
    dot: np.ndarray = field(default=None)  # type: ignore[assignment]  # Σ δᵢ·δⱼ
    ref_norm2: float = 0.0  # Σ reference² (the base, or the models' mean without a base)
    weight_norm2: np.ndarray = field(default=None)  # type: ignore[assignment]  # Σ θᵢ²
    retained_sum: float = 0.0  # Σ numel · ‖mean θ‖ / mean ‖θᵢ‖, per tensor
    tv_retained_sum: float = 0.0  # Σ numel · ‖mean δ‖ / mean ‖δᵢ‖, per tensor
    topk: np.ndarray = field(default=None)  # type: ignore[assignment]  # |mᵢ|
    both: np.ndarray = field(default=None)  # type: ignore[assignment]  # |mᵢ ∧ mⱼ|
    either: np.ndarray = field(default=None)  # type: ignore[assignment]  # |mᵢ ∨ mⱼ|
    pair_conflict: np.ndarray = field(default=None)  # type: ignore[assignment]
    overlap: int = 0  # positions with ≥ 2 models in their top-k
    conflict: int = 0  # ... whose signs disagree
    union: int = 0  # positions with ≥ 1 model in its top-k
    rank_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    rank_norm_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    rank_count: int = 0
    hist_count: np.ndarray = field(default=None)  # type: ignore[assignment]
    hist_mass: np.ndarray = field(default=None)  # type: ignore[assignment]
    embedding_norm2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = self.n
        for name, shape in (("norm2", n), ("dot", (n, n)), ("weight_norm2", n), ("topk", n), ("both", (n, n)),
                            ("either", (n, n)), ("pair_conflict", (n, n)), ("rank_sum", n), ("rank_norm_sum", n),
                            ("hist_count", (n, HIST_BINS)), ("hist_mass", (n, HIST_BINS)), ("embedding_norm2", n)):  # fmt: skip
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape))

    def __iadd__(self, other: "TensorStats") -> "TensorStats":
        for name in ("tensors", "numel", "norm2", "dot", "ref_norm2", "weight_norm2", "retained_sum", "tv_retained_sum",
                     "topk", "both", "either", "pair_conflict", "overlap", "conflict", "union", "rank_sum",
                     "rank_norm_sum", "rank_count", "hist_count", "hist_mass", "embedding_norm2"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def summary(self, top_k: float) -> dict:
        """The ratios, JSON-ready (lists, floats; None where a ratio is undefined)."""
        n = self.n
        norm = np.sqrt(self.norm2)
        cosine = [[_ratio(self.dot[i, j], norm[i] * norm[j]) if i != j else (1.0 if norm[i] > 0 else None) for j in range(n)] for i in range(n)]
        ref = math.sqrt(self.ref_norm2)
        out = {
            "tensors": self.tensors,
            "numel": self.numel,
            "norm": norm.tolist(),
            "relative_norm": [_ratio(v, ref) for v in norm],
            "cosine": cosine,
            "sign_conflict": [[_ratio(self.pair_conflict[i, j], self.both[i, j]) if i != j else 0.0 for j in range(n)] for i in range(n)],
            "jaccard": [[_ratio(self.both[i, j], self.either[i, j]) if i != j else (1.0 if self.topk[i] else None) for j in range(n)] for i in range(n)],
            "jaccard_independent": top_k / (2 - top_k),
            "conflict_rate": _ratio(self.conflict, self.overlap),
            "interference": _ratio(self.conflict, self.union),
            "topk_fraction": [_ratio(v, self.numel) for v in self.topk],
            "effective_rank": [_ratio(v, self.rank_count) for v in self.rank_sum],
            "normalized_effective_rank": [_ratio(v, self.rank_count) for v in self.rank_norm_sum],
            "mass_fraction": [mass_fraction(self.hist_count[i], self.hist_mass[i], self.numel) for i in range(n)],
            "embedding_fraction": [_ratio(self.embedding_norm2[i], self.norm2[i]) for i in range(n)],
            "average_norm_retained": _ratio(self.retained_sum, self.numel),
            "task_vector_average_retained": _ratio(self.tv_retained_sum, self.numel),
        }
        return out


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den and den > 0 else None


def tensor_stats(
    weights: Sequence[torch.Tensor],
    reference: torch.Tensor | None,
    *,
    top_k: float,
    rank: bool = True,
    embedding: bool = False,
    rank_rows: int = RANK_ROWS,
    seed_key: str = "",
) -> TensorStats:
    """Statistics of one tensor of n models against `reference` (the base; None: the models' mean)."""
    n = len(weights)
    thetas = [w.float() for w in weights]
    mean = sum(thetas[1:], thetas[0].clone()) / n if n else None
    ref = reference.float() if reference is not None else mean
    deltas = [t - ref for t in thetas]
    st = TensorStats(n, tensors=1, numel=ref.numel())
    ref_flat = ref.flatten()
    st.ref_norm2 = float(ref_flat @ ref_flat)
    flat = [d.flatten() for d in deltas]  # float32 dot products (BLAS, blocked sums): ample for these ratios
    for i in range(n):
        theta = thetas[i].flatten()
        st.weight_norm2[i] = float(theta @ theta)
        for j in range(i, n):
            st.dot[i, j] = st.dot[j, i] = float(flat[i] @ flat[j])
        st.norm2[i] = st.dot[i, i]
    if n:
        numel = ref.numel()
        mean_weight_norm = float(mean.double().norm())
        st.retained_sum = numel * (_ratio(mean_weight_norm, float(np.sqrt(st.weight_norm2).mean())) or 1.0)
        st.tv_retained_sum = numel * (_ratio(float((sum(flat[1:], flat[0].clone()) / n).norm()), float(np.sqrt(st.norm2).mean())) or 1.0)
    if embedding:
        st.embedding_norm2 = st.norm2.copy()

    masks = [topk_mask(d, top_k) for d in deltas]
    positive = [d > 0 for d in deltas]
    for i in range(n):
        st.topk[i] = int(masks[i].sum())
    for i in range(n):
        for j in range(i + 1, n):
            both = masks[i] & masks[j]
            st.both[i, j] = st.both[j, i] = int(both.sum())
            st.either[i, j] = st.either[j, i] = st.topk[i] + st.topk[j] - st.both[i, j]
            st.pair_conflict[i, j] = st.pair_conflict[j, i] = int((both & (positive[i] != positive[j])).sum())
    if n == 2:  # the multi-model counts are the pair's
        st.overlap, st.conflict, st.union = int(st.both[0, 1]), int(st.pair_conflict[0, 1]), int(st.either[0, 1])
    elif n > 2:
        active = torch.zeros(ref.shape, dtype=torch.int16)
        pos_active = torch.zeros(ref.shape, dtype=torch.int16)
        for i in range(n):
            active += masks[i]
            pos_active += masks[i] & positive[i]
        overlap = active >= 2
        st.overlap = int(overlap.sum())
        st.conflict = int((overlap & (pos_active > 0) & (pos_active < active)).sum())
        st.union = int((active >= 1).sum())
    else:
        st.union = int(st.topk[0])
    del masks, positive

    for i, d in enumerate(deltas):
        c, m = magnitude_histogram(d)
        st.hist_count[i] = c
        st.hist_mass[i] = m
    if rank and ref.dim() == 2 and min(ref.shape) > 1:
        seed = zlib.crc32(seed_key.encode())
        for i, d in enumerate(deltas):
            er, bound = effective_rank(d, max_rows=rank_rows, seed=seed)
            st.rank_sum[i] = er
            st.rank_norm_sum[i] = er / bound if bound else 0.0
        st.rank_count = 1
    return st
