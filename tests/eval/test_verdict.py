"""The verdict rules on constructed numbers, and the report's JSON / text / Markdown forms."""

from __future__ import annotations

import json
import math

import pytest

from mergesmith.eval.table import EvalReport
from mergesmith.eval.verdict import DEGRADED, FAILED, OK, ModelScores, judge


def scores(name, role, ppl=None, skills=None):
    return ModelScores(name, f"/m/{name}", role, dict(ppl or {}), dict(skills or {}))


SOURCES = [scores("a", "source", {"wiki": 10.0, "code": 5.0}), scores("b", "source", {"wiki": 12.0, "code": 4.0})]
BASE = scores("base", "base", {"wiki": 11.0, "code": 6.0}, {"add": 0.5, "sort": 0.2})


@pytest.mark.parametrize(
    "wiki,code,status",
    [
        (10.0, 4.0, OK),
        (10.99, 4.39, OK),  # just under 1.10x the best source on each text
        (11.01, 4.0, DEGRADED),  # best source on wiki is a (10.0), not b
        (10.0, 4.41, DEGRADED),  # best source on code is b (4.0)
        (19.9, 4.0, DEGRADED),
        (20.01, 4.0, FAILED),
        (10.0, 8.5, FAILED),
        (9.0, 3.0, OK),  # better than every source
        (math.inf, 4.0, FAILED),
        (math.nan, 4.0, FAILED),
    ],
)
def test_perplexity_rules(wiki, code, status):
    v = judge(scores("m", "merged", {"wiki": wiki, "code": code}), SOURCES, BASE)
    assert v.status == status
    assert v.model == "m"
    assert v.skills_lost == []
    assert (v.reasons == []) == (status == OK)


def test_reasons_name_the_text_the_ratio_and_the_best_source():
    v = judge(scores("m", "merged", {"wiki": 25.0, "code": 4.5}), SOURCES)
    assert v.status == FAILED
    assert v.reasons == [
        "perplexity on 'wiki' is 25, 2.50x the best source (a: 10; failed above 2x)",
        "perplexity on 'code' is 4.5, 1.12x the best source (b: 4; degraded above 1.1x)",
    ]


def test_a_skill_below_the_base_is_lost_and_degrades():
    merged = scores("m", "merged", {"wiki": 10.0}, {"add": 0.45, "sort": 0.2, "upper": 0.0})
    v = judge(merged, SOURCES, BASE)
    assert v.status == DEGRADED
    assert v.skills_lost == ["add"]  # sort ties the base; upper was not probed on the base
    assert v.reasons == ["skill 'add' lost: 0.45 < base 0.50"]


def test_failed_perplexity_with_a_lost_skill_stays_failed():
    v = judge(scores("m", "merged", {"wiki": 30.0}, {"add": 0.0}), SOURCES, BASE)
    assert v.status == FAILED
    assert v.skills_lost == ["add"]


def test_without_base_skills_are_not_judged_and_without_sources_perplexity_is_not():
    merged = scores("m", "merged", {"wiki": 1000.0}, {"add": 0.0})
    assert judge(merged, [], None).status == OK
    assert judge(merged, [scores("a", "source", {"other": 1.0})], None).status == OK
    # a source whose own perplexity is not finite is no yardstick
    assert judge(merged, [scores("a", "source", {"wiki": math.inf}), scores("b", "source", {"wiki": 950.0})]).status == OK


def test_thresholds_are_parameters():
    merged = scores("m", "merged", {"wiki": 10.5})
    assert judge(merged, SOURCES, degraded_ratio=1.01).status == DEGRADED
    assert judge(merged, SOURCES, degraded_ratio=1.01, failed_ratio=1.04).status == FAILED


def report() -> EvalReport:
    merged = scores("merged|x", "merged", {"wiki": 10.5, "code": math.inf}, {"add": 0.5, "sort": 0.1})
    models = [*SOURCES, BASE, merged]
    return EvalReport(models, judge(merged, SOURCES, BASE))


def test_json_schema_exactly():
    data = json.loads(json.dumps(report().to_dict()))
    assert set(data) == {"models", "verdict"}
    for m in data["models"]:
        assert set(m) == {"name", "path", "role", "perplexity", "skills"}
        assert m["role"] in ("source", "base", "merged")
    assert data["models"][2] == {"name": "base", "path": "/m/base", "role": "base",
                                 "perplexity": {"wiki": 11.0, "code": 6.0}, "skills": {"add": 0.5, "sort": 0.2}}
    assert data["models"][3]["perplexity"] == {"wiki": 10.5, "code": None}  # JSON has no Infinity
    assert data["verdict"] == {"model": "merged|x", "status": FAILED, "skills_lost": ["sort"],
                               "reasons": ["perplexity on 'code' is inf (not finite)", "skill 'sort' lost: 0.10 < base 0.20"]}
    assert EvalReport([SOURCES[0]]).to_dict()["verdict"] is None


def test_text_table_marks_the_best_per_column():
    lines = report().render_text().splitlines()
    assert lines[0].split() == ["model", "role", "ppl", "wiki", "ppl", "code", "add", "sort"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:7]}
    assert rows["a"] == ["source", "10.000*", "5.000", "-", "-"]
    assert rows["b"] == ["source", "12.000", "4.000*", "-", "-"]
    assert rows["base"] == ["base", "11.000", "6.000", "0.50*", "0.20*"]
    assert rows["merged|x"] == ["merged", "10.500", "inf", "0.50*", "0.10"]  # ties are all marked
    assert "verdict for merged|x: failed merge" in lines


def test_markdown_table():
    md = report().render_markdown()
    lines = md.splitlines()
    assert lines[0] == "## Evaluation"
    assert lines[2] == "| model | role | ppl wiki | ppl code | add | sort |"
    assert lines[3] == "|---|---|---:|---:|---:|---:|"
    assert lines[4] == "| a | source | 10.000* | 5.000 | - | - |"
    assert lines[7] == "| merged\\|x | merged | 10.500 | inf | 0.50* | 0.10 |"
    assert "**Verdict for merged|x: failed merge**" in md
    assert "- skill 'sort' lost: 0.10 < base 0.20" in md
