"""Shared test helpers: seeded float64 numpy inputs, converted to torch for the call."""

import numpy as np
import torch


def rng(seed=0):
    return np.random.default_rng(seed)


def t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def finetunes(seed, shape, n, scale=0.01):
    r = rng(seed)
    base = r.normal(size=shape)
    return base, [base + scale * r.normal(size=shape) for _ in range(n)]
