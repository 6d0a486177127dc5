"""The `--device` option shared by merge, eval and demo: a name checked against what this machine has."""

from __future__ import annotations

import torch

from mergesmith.errors import ConfigError, InputError


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present) as a torch.device; a clear error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device '{name}' (cpu, cuda, cuda:N or auto)") from None
