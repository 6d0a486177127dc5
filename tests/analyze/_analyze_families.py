"""Model families with constructed task vectors (orthogonal/sparse, conflicting, aligned, ...) for the analyze tests.

A fine-tune here is the base's tensors plus a delta computed by a function of (tensor name, base tensor,
generator), saved as safetensors next to a copy of the base's config.json: no transformers model is built.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from fixtures import read_state

Delta = Callable[[str, torch.Tensor, torch.Generator], torch.Tensor]


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def write_finetune(base: Path, folder: Path, delta: Delta, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "config.json", folder / "config.json")
    state = {name: (t + delta(name, t, _gen(seed, name))).contiguous() for name, t in sorted(read_state(base).items())}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], num_layers: int) -> Path:
    """A hand-made 'model': config.json with a layer count and one safetensors file."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"], "num_hidden_layers": num_layers,
                                                    "hidden_size": 3, "vocab_size": 4}))  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def dense(scale: float = 0.02) -> Delta:
    return lambda name, t, gen: scale * torch.randn(t.shape, generator=gen)


def sparse_disjoint(part: int, parts: int = 20, scale: float = 0.02) -> Delta:
    """A delta on the `part`-th 1/`parts` of every tensor's entries (the same permutation for every model)."""

    def delta(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = t.numel()
        perm = torch.randperm(n, generator=_gen(0, name))
        chunk = n // parts
        out = torch.zeros(n)
        idx = perm[part * chunk : (part + 1) * chunk]
        out[idx] = scale * torch.randn(len(idx), generator=gen)
        return out.reshape(t.shape)

    return delta


def related(first: Delta, sign: float, noise: float, scale: float = 0.02) -> Delta:
    """sign × (the delta `first` draws for the model written with seed 1) + noise: aligned (+1) or conflicting (−1)."""

    def delta(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        shared = first(name, t, _gen(1, name))
        return sign * shared + noise * scale * torch.randn(t.shape, generator=gen)

    return delta
