"""Pieces that depend on things outside this folder: lm-evaluation-harness (optional) and the demo's probes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import mergesmith
from mergesmith.errors import ConfigError
from mergesmith.eval.probes import load_probes
from mergesmith.eval.runner import _headline_metric, run_lm_eval

DEMO_PROBES = Path(mergesmith.__file__).parent / "demo" / "probes"


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed")
def test_lm_eval_missing_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="pip install lm-eval"):
        run_lm_eval(tmp_path, ("hellaswag",), "cpu", 1)


def test_lm_eval_headline_metric():
    assert _headline_metric({"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}) == 0.6
    assert _headline_metric({"acc,none": 0.5, "acc_stderr,none": 0.1}) == 0.5
    assert _headline_metric({"alias": "x", "bleu_stderr,none": 0.1, "bleu,none": 7.0}) == 7.0
    assert _headline_metric({"alias": "x"}) is None


@pytest.mark.skipif(not DEMO_PROBES.is_dir(), reason="the demo family's probes are not generated yet")
def test_the_demo_familys_probes_load():
    probes = load_probes(DEMO_PROBES)
    assert probes and all(items for items in probes.values())
    for items in probes.values():
        assert all(p.prompt.endswith("A: ") and p.match == "exact" for p in items)
