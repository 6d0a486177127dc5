"""Shared fixtures: a family of tiny models (a base and fine-tunes of it) per architecture, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import make_model  # noqa: E402


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = make_model(root / "base", "llama", seed=0)
    return {
        "base": base,
        "math": make_model(root / "math", "llama", seed=1, base=base),
        "code": make_model(root / "code", "llama", seed=2, base=base),
        "root": root,
    }


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mistral")
    base = make_model(root / "base", "mistral", seed=0)
    return {"base": base, "a": make_model(root / "a", "mistral", seed=3, base=base), "root": root}


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    base = make_model(root / "base", "gpt2", seed=0)
    return {"base": base, "a": make_model(root / "a", "gpt2", seed=4, base=base), "root": root}
