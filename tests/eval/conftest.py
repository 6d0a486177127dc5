"""Fixtures for the eval tests: a tiny family (base and two fine-tunes) and a held-out text, built once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from evalkit import make_char_model  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run several times faster on one thread than on two contended ones; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def char_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalfam")
    base = make_char_model(root / "base", seed=0)
    return {
        "root": root,
        "base": base,
        "a": make_char_model(root / "a", seed=1, base=base),
        "b": make_char_model(root / "b", seed=2, base=base),
    }


@pytest.fixture(scope="session")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("the cat sat on the mat.\nq: 12+34\na: 46\n" * 6)
    return path
