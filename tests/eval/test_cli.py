"""End to end through the CLI: `mergesmith eval` flags a broken merge (exit 3), `merge --eval` fills README.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
import yaml

from evalkit import greedy_one_by_one, make_char_model
from mergesmith.cli import main

PROMPTS = ["q: 12+34\na: ", "the cat ", "q: 5+5\na: ", "at the "]


@pytest.fixture(scope="module")
def probes_file(char_family, tmp_path_factory) -> Path:
    """Probes the base model answers right by construction (expected = its own greedy answer)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(char_family["base"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(char_family["base"])
    answers = [greedy_one_by_one(model, tokenizer, p, 16) for p in PROMPTS]  # 16: the default --max-tokens
    skills = {"math": [{"prompt": p, "expect": a} for p, a in zip(PROMPTS[::2], answers[::2])],
              "words": [{"prompt": p, "expect": a} for p, a in zip(PROMPTS[1::2], answers[1::2])]}
    path = tmp_path_factory.mktemp("probes") / "probes.yml"
    path.write_text(yaml.safe_dump({"skills": skills}))
    return path


def test_broken_merge_is_a_failed_merge_with_exit_code_3(char_family, heldout, probes_file, tmp_path, capsys):
    broken = make_char_model(tmp_path / "broken", seed=1, base=char_family["a"], delta=0.0, scale=10.0)
    out_json, out_md = tmp_path / "eval.json", tmp_path / "eval.md"
    argv = [str(char_family["a"]), str(char_family["b"]), "--base", str(char_family["base"]), "--merged", str(broken),
            "--text", str(heldout), "--probes", str(probes_file), "--json", str(out_json),
            "--markdown", str(out_md), "-q"]  # fmt: skip
    assert main(["eval", *argv]) == 3
    data = json.loads(out_json.read_text())
    assert [(m["name"], m["role"]) for m in data["models"]] == [("a", "source"), ("b", "source"), ("base", "base"), ("broken", "merged")]
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name["base"]["skills"] == {"math": 1.0, "words": 1.0}
    assert by_name["broken"]["path"] == str(broken)
    ppl = {name: m["perplexity"]["heldout"] for name, m in by_name.items()}
    assert ppl["broken"] is None or ppl["broken"] > 2 * min(ppl["a"], ppl["b"])
    verdict = data["verdict"]
    assert verdict["model"] == "broken" and verdict["status"] == "failed merge"
    assert any("perplexity on 'heldout'" in r for r in verdict["reasons"])
    assert set(verdict["skills_lost"]) <= {"math", "words"}
    printed = capsys.readouterr().out
    assert "verdict for broken: failed merge" in printed
    assert "| broken | merged |" in out_md.read_text()


def test_eval_of_the_sources_alone_has_no_verdict(char_family, heldout, tmp_path):
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(char_family["a"]), str(char_family["base"]), "--text", str(heldout), "--json", str(out_json), "-q"]) == 0
    data = json.loads(out_json.read_text())
    assert data["verdict"] is None
    assert all(m["role"] == "source" and m["skills"] == {} for m in data["models"])


def test_merge_with_eval_writes_the_table_into_the_model_card(char_family, heldout, probes_file, tmp_path, capsys):
    config = {"merge_method": "task_arithmetic", "base_model": str(char_family["base"]),
              "models": [{"model": str(char_family["a"]), "parameters": {"weight": 0.5}},
                         {"model": str(char_family["b"]), "parameters": {"weight": 0.5}}],
              "dtype": "float32"}  # fmt: skip
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    rc = main(["merge", str(path), str(out), "-q", "--eval", str(probes_file), "--eval-text", str(heldout)])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "## Configuration" in card  # the card is still the card
    section = card[card.index("## Evaluation") :]
    assert "| model | role | ppl heldout | math | words |" in section
    for name, role in [(str(char_family["a"]), "source"), (str(char_family["b"]), "source"), (str(char_family["base"]), "base"), ("out", "merged")]:
        assert f"| {name} | {role} |" in section
    assert "**Verdict for out:" in section
    status = section.split("**Verdict for out: ", 1)[1].split("**", 1)[0]
    assert rc == (3 if status == "failed merge" else 0)
    assert "verdict for out:" in capsys.readouterr().out


def test_eval_errors_are_one_line(char_family, tmp_path, capsys):
    assert main(["eval", str(char_family["a"])]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    bad = tmp_path / "p.yml"
    bad.write_text("skills:\n  add:\n    - {prompt: x, expected: y}\n")
    assert main(["eval", str(char_family["a"]), "--probes", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}:3: skills.add[0]: unknown key 'expected'; did you mean 'expect'?"]
    assert main(["eval", str(tmp_path / "missing"), "--probes", str(bad)]) == 2
    assert main(["eval", "--text", str(bad)]) == 2
    assert "no models to evaluate" in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n")
    assert main(["eval", str(char_family["a"]), "--text", str(blank)]) == 2
    assert capsys.readouterr().err.strip().endswith("is empty")


def test_merge_eval_reads_the_probes_before_merging(char_family, tmp_path, capsys):
    config = {"merge_method": "task_arithmetic", "base_model": str(char_family["base"]),
              "models": [{"model": str(char_family["a"]), "parameters": {"weight": 1.0}}]}  # fmt: skip
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    bad = tmp_path / "probes.yml"
    bad.write_text("skills:\n  add:\n    - {prompt: x, expect: y, match: fuzzy}\n")
    assert main(["merge", str(path), str(tmp_path / "out"), "-q", "--eval", str(bad)]) == 2
    assert "'match' must be one of exact, contains, regex" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
