"""Plain numpy references for the task-vector methods, written from the papers / mergekit's semantics.

Deliberately naive (full argsorts, explicit loops) and independent of mergesmith's helpers. Ties in
magnitude are ordered "larger magnitude first, then earlier position first" (mergesmith's documented rule).
"""

import numpy as np
import torch

from mergesmith.methods import get_method


def call(name, base, models, **params):
    """Call a registered method on float64 numpy inputs; numpy result."""
    out = get_method(name).func([torch.tensor(m) for m in models], base=torch.tensor(base), **params)
    return out.numpy()


def desc_order(x):
    """Flat indices by magnitude, largest first, ties by position."""
    return np.argsort(-np.abs(x).ravel(), kind="stable")


def magnitude(x, density):
    if density >= 1:
        return x.copy()
    n = x.size
    if density <= 0 or n == 0:
        return np.zeros_like(x)
    k = max(1, int(density * n))
    keep = np.zeros(n, bool)
    keep[desc_order(x)[:k]] = True
    return np.where(keep.reshape(x.shape), x, 0.0)


def outliers(x, density, gamma):
    if density >= 1:
        return x.copy()
    n = x.size
    keep_n, top_n = int(density * n), int(gamma * n)
    bot_n = max(0, n - keep_n - top_n)
    asc = desc_order(x)[::-1]
    keep = np.zeros(n, bool)
    keep[asc[bot_n: bot_n + keep_n]] = True
    return np.where(keep.reshape(x.shape), x, 0.0)


def rescale(orig, masked, eps=1e-7):
    before, after = np.abs(orig).sum(), np.abs(masked).sum()
    if before < eps or after < eps:
        return masked
    return masked * before / after


def gta(base, models, weights, sparsify=None, consensus=None, normalize=False, lam=1.0):
    """Generalized task arithmetic: sparsify, weight, (elect sign + disjoint merge), normalize, scale."""
    deltas = []
    for i, m in enumerate(models):
        d = m - base
        deltas.append(sparsify(d, i) if sparsify else d)
    w = np.array(weights, dtype=float).reshape((-1,) + (1,) * base.ndim)
    wd = np.stack(deltas) * w
    if consensus is None:
        mixed = wd.sum(0)
        div = float(np.sum(weights))
        if abs(div) < 1e-8:
            div = 1.0
    else:
        votes = wd.sum(0) if consensus == "sum" else np.sign(wd).sum(0)
        maj = np.where(votes >= 0, 1.0, -1.0)
        agree = np.sign(wd) == maj
        mixed = (wd * agree).sum(0)
        div = (w * agree).sum(0)
        div[div == 0] = 1.0
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def finetunes(seed, shape, n, scale=0.01):
    r = np.random.default_rng(seed)
    base = r.normal(size=shape)
    return base, [base + scale * r.normal(size=shape) for _ in range(n)]


def words(generator, count, lanes=8, block=1 << 14):
    """DARE's documented random stream for one plan of `count` entries: a 63-bit seed drawn from the torch
    generator, `lanes` SFC64 generators seeded by numpy's SeedSequence(seed).spawn(lanes), read in blocks of
    `block` entries (the last may be shorter). A block of m entries takes s = ceil(m / (2 * lanes)) draws of
    every generator: its first lanes * s entries are the draws' lower 32 bits, draw j of generator k at
    entry j * lanes + k, the rest their upper 32 bits in the same order. Returns int32 words."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    gens = [np.random.SFC64(child) for child in np.random.SeedSequence(seed).spawn(lanes)]
    out = []
    for start in range(0, count, block):
        m = min(block, count - start)
        s = -(-m // (2 * lanes))
        draws = np.stack([g.random_raw(s) for g in gens], axis=1)  # (s, lanes): entry order j * lanes + k
        lower = (draws & 0xFFFFFFFF).astype(np.uint32).reshape(-1)
        upper = (draws >> 32).astype(np.uint32).reshape(-1)
        out.append(np.concatenate([lower, upper])[:m].view(np.int32))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def lane_words(generator, rows, cols, lanes=8):
    """DELLA's documented random stream, for `rows` rows of `cols` entries: a 63-bit seed drawn from the torch
    generator, `lanes` SFC64 generators seeded by numpy's SeedSequence(seed).spawn(lanes); generator k draws
    for the columns j with j % lanes == k, every row taking ceil(cols / lanes) draws of each (the ones past
    the row's end unused). An entry's two int32 words: its draw's lower half, then its upper half.
    Returns an int32 array (rows, cols, 2)."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    gens = [np.random.SFC64(child) for child in np.random.SeedSequence(seed).spawn(lanes)]
    steps = -(-cols // lanes)
    out = np.empty((rows, cols), dtype=np.uint64)
    for i in range(rows):
        row = [g.random_raw(steps) for g in gens]
        for j in range(cols):
            out[i, j] = row[j % lanes][j // lanes]
    return out.view(np.int32).reshape(rows, cols, 2)


def bernoulli_keep(w, density):
    """DARE's documented keep rule: the word, as a uniform number in [0, 1), is below density."""
    return (w.astype(np.int64) + 2**31) / 2**32 < density


def della_keep(x, w, density, eps):
    """DELLA's documented keep rule on rows (last axis) of x with two int32 words per entry (w: x's shape plus
    a last axis of 2). The first word's low bit is a coin and its other 31 bits a uniform u; the second, as an
    unsigned h, picks a partner among the other entries of the row: k = h * (cols - 1) // 2^32, the entry at
    column k if k is before the entry's own column, else at k + 1. Kept when u < density - eps, or when
    u < density + eps and the partner's magnitude is smaller (an equal one counts when the coin is 1)."""
    mags = np.abs(x)
    cols = mags.shape[-1]
    w = w.astype(np.int64).reshape(*mags.shape, 2)
    first, second = w[..., 0], w[..., 1]
    u = ((first >> 1) + 2**30) / 2**31
    k = (second % 2**32) * (cols - 1) // 2**32
    partner = np.where(k < np.arange(cols), k, k + 1)
    other = np.take_along_axis(mags, partner, axis=-1)
    smaller = (other < mags) | ((other == mags) & (first % 2 == 1))
    return (u < density - eps) | ((u < density + eps) & smaller)
