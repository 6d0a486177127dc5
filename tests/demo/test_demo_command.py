"""`mergesmith demo`, the README's main command, runs end to end on the shipped family with no download."""

from __future__ import annotations

import json

import transformers

from mergesmith.cli import main


def test_demo_merges_evaluates_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "verdict for merged (task_arithmetic)" in printed and f"report: {out / 'report.html'}" in printed
    transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    report = json.loads((out / "eval.json").read_text())
    rows = {m["name"]: m for m in report["models"]}
    assert [m["role"] for m in report["models"]] == ["base", "source", "source", "source", "merged"]
    merged, base = rows["merged (task_arithmetic)"]["skills"], rows["base"]["skills"]
    for skill in ("add", "reverse", "sort"):  # the merge keeps more of every specialist skill than the base has
        assert merged[skill] > base[skill], (skill, merged[skill], base[skill])
        assert rows[skill]["skills"][skill] > base[skill]
    html = (out / "report.html").read_text()
    assert "<img" in html and "merged (task_arithmetic)" in html
