"""Every example config runs as it is on the shipped demo family, and there is one for every method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml

import mergesmith
from mergesmith.methods.registry import method_names

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yml"))


def test_there_is_an_example_for_every_method():
    covered = {yaml.safe_load(p.read_text())["merge_method"] for p in EXAMPLES}
    assert covered == set(method_names())


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_merges_and_generates(example, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name the family relative to the repository root, as the README says
    result = mergesmith.merge(example.relative_to(ROOT), tmp_path / "out", random_seed=1)
    assert result.tensors_written > 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokenizer("Q: reverse abcd\nA: ", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
