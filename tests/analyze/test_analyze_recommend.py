"""The recommendation on constructed families is the one docs/analyze.md documents, and its config merges."""

from __future__ import annotations

import json

import pytest
import yaml

from _analyze_families import dense, related, sparse_disjoint, write_finetune
from fixtures import make_model
from mergesmith.analyze import analyze, emit_config
from mergesmith.analyze.recommend import recommend
from mergesmith.api import prepare
from mergesmith.cli import main
from mergesmith.config.loader import load_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("rec") / "base", "llama", seed=0)


def family(base, root, *deltas):
    return [str(write_finetune(base, root / f"m{i}", d, seed=i + 1)) for i, d in enumerate(deltas)]


def check_config(result, tmp_path):
    """The emitted config parses and plans (every check `mergesmith merge` makes before reading tensors)."""
    path = tmp_path / "rec.yml"
    path.write_text(yaml.safe_dump(emit_config(result), sort_keys=False))
    parsed, _ = load_config(path)
    assert parsed.merge_method == result["recommendation"]["method"]
    plan = prepare(path)
    assert len(plan.tasks) > 0
    return path


def test_sparse_orthogonal_deltas_get_ties_with_density_near_the_mass_fraction(base, tmp_path):
    models = family(base, tmp_path, sparse_disjoint(0), sparse_disjoint(1))
    result = analyze(models=models, base=str(base), rank=False)
    o, rec = result["overall"], result["recommendation"]
    assert o["cosine"][0][1] == pytest.approx(0.0, abs=1e-9) and o["interference"] == 0.0
    assert all(m <= 0.05 for m in o["mass_fraction"])
    assert (rec["method"], rec["rule"]) == ("ties", "orthogonal-sparse")
    for m, p in zip(o["mass_fraction"], rec["model_parameters"]):
        assert m <= p["density"] <= m + 0.01
    check_config(result, tmp_path)


def test_conflicting_deltas_get_ties(base, tmp_path):
    models = family(base, tmp_path, dense(), related(dense(), sign=-1.0, noise=0.3))
    result = analyze(models=models, base=str(base), rank=False)
    o = result["overall"]
    assert o["cosine"][0][1] < -0.9 and o["interference"] > 0.5
    assert (result["recommendation"]["method"], result["recommendation"]["rule"]) == ("ties", "interference")
    check_config(result, tmp_path)


def test_conflicting_small_deltas_get_dare_ties(base, tmp_path):
    small = dense(scale=0.0005)
    models = family(base, tmp_path, small, related(small, sign=-1.0, noise=0.3, scale=0.0005))
    result = analyze(models=models, base=str(base), rank=False)
    assert max(result["overall"]["relative_norm"]) < 0.05
    assert result["recommendation"]["method"] == "dare_ties"
    check_config(result, tmp_path)


def test_aligned_deltas_get_model_stock(base, tmp_path):
    models = family(base, tmp_path, dense(), related(dense(), sign=1.0, noise=0.3))
    result = analyze(models=models, base=str(base), rank=False)
    assert result["overall"]["cosine"][0][1] > 0.9
    assert result["recommendation"]["method"] == "model_stock"
    check_config(result, tmp_path)


def test_two_independent_dense_fine_tunes_get_nuslerp_and_the_config_merges(base, tmp_path):
    models = family(base, tmp_path, dense(), dense())
    config = tmp_path / "in.yml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                      "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}))  # fmt: skip
    out = tmp_path / "out.yml"
    assert main(["analyze", str(config), "--emit-config", str(out), "--json", str(tmp_path / "a.json"), "-q"]) == 0
    emitted = yaml.safe_load(out.read_text())
    assert emitted["merge_method"] == "nuslerp" and emitted["base_model"] == str(base.resolve())
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["recommendation"]["method"] == "nuslerp" and saved["format"] == "mergesmith-analysis/1"
    assert main(["merge", str(out), str(tmp_path / "merged"), "--quiet"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_three_independent_dense_fine_tunes_get_task_arithmetic(base, tmp_path):
    result = analyze(models=family(base, tmp_path, dense(), dense(), dense()), base=str(base), rank=False)
    rec = result["recommendation"]
    assert result["overall"]["interference"] < 0.1
    assert (rec["method"], rec["rule"]) == ("task_arithmetic", "orthogonal-dense")
    assert rec["parameters"]["lambda"] == pytest.approx(1.0, abs=0.05)  # near-orthogonal: each task at full strength
    check_config(result, tmp_path)


def test_one_fine_tune_gets_slerp_from_the_base(base, tmp_path):
    result = analyze(models=family(base, tmp_path, dense()), base=str(base), rank=False)
    assert (result["recommendation"]["method"], result["recommendation"]["parameters"]) == ("slerp", {"t": 0.5})
    check_config(result, tmp_path)


def test_without_a_base_close_models_get_linear_and_distant_ones_karcher(base, tmp_path):
    close = family(base, tmp_path / "close", dense(scale=0.001), dense(scale=0.001))
    result = analyze(models=close, rank=False)
    assert result["base"] is None and result["overall"]["average_norm_retained"] > 0.99
    assert result["recommendation"]["method"] == "linear"
    check_config(result, tmp_path)
    apart = [str(make_model(tmp_path / f"r{s}", "llama", seed=s)) for s in (5, 6)]
    result = analyze(models=apart, rank=False)
    assert result["overall"]["average_norm_retained"] < 0.99
    assert result["recommendation"]["method"] == "karcher"
    check_config(result, tmp_path)


def _synthetic(n=2, cos=0.0, interference=0.0, mass=0.4, rel=0.5, base=True, retained=1.0):
    matrix = [[1.0 if i == j else cos for j in range(n)] for i in range(n)]
    overall = {"cosine": matrix, "interference": interference, "conflict_rate": 0.5, "mass_fraction": [mass] * n,
               "relative_norm": [rel] * n, "embedding_fraction": [0.1] * n, "normalized_effective_rank": [0.8] * n,
               "average_norm_retained": retained, "task_vector_average_retained": 0.7}  # fmt: skip
    return {"base": {"name": "b"} if base else None, "models": [{"name": f"m{i}"} for i in range(n)], "overall": overall, "top_k": 0.1}


@pytest.mark.parametrize(
    ("kwargs", "method", "rule"),
    [
        ({"interference": 0.1}, "ties", "interference"),
        ({"interference": 0.099, "cos": 0.5}, "model_stock", "aligned"),
        ({"interference": 0.2, "rel": 0.05}, "dare_ties", "interference-small-deltas"),
        ({"cos": 0.19, "mass": 0.25}, "ties", "orthogonal-sparse"),
        ({"cos": 0.2, "mass": 0.25}, "nuslerp", "two-models"),
        ({"n": 4, "cos": 0.3}, "task_arithmetic", "orthogonal-dense"),
        ({"base": False, "retained": 0.99}, "linear", "no-base-close"),
        ({"base": False, "retained": 0.98, "interference": 0.9}, "karcher", "no-base-apart"),
    ],
)
def test_rule_thresholds(kwargs, method, rule):
    rec = recommend(_synthetic(**kwargs))
    assert (rec.method, rec.rule) == (method, rule)
    assert rec.rationale


def test_task_arithmetic_lambda_compensates_correlated_task_vectors():
    rec = recommend(_synthetic(n=4, cos=0.3))
    assert rec.parameters["lambda"] == pytest.approx(round(1 / (1 + 3 * 0.3), 2))


def test_notes_flag_embedding_heavy_and_low_rank_deltas():
    a = _synthetic()
    a["overall"]["embedding_fraction"] = [0.9, 0.1]
    a["overall"]["normalized_effective_rank"] = [0.8, 0.02]
    notes = recommend(a).notes
    assert any("'m0'" in n and "embeddings" in n for n in notes) and any("'m1'" in n and "low-rank" in n for n in notes)
