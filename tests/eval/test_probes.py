"""Probe files (YAML and JSONL), their errors, the match kinds, and greedy batched scoring."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from mergesmith.errors import ConfigError
from mergesmith.eval.probes import Probe, generate_answers, load_probes, matches, score_probes

from evalkit import greedy_one_by_one


def test_yaml_probes_by_skill_in_file_order(tmp_path):
    path = tmp_path / "probes.yml"
    path.write_text(
        "skills:\n"
        "  add:\n"
        "    - {prompt: \"Q: 1+2\\nA: \", expect: 3}\n"
        "    - prompt: \"Q: 5+5\\nA: \"\n"
        "      expect: '010'\n"
        "      match: contains\n"
        "  greet:\n"
        "    - {prompt: 'hi', expect: '^hel+o$', match: regex}\n"
    )
    probes = load_probes(path)
    assert list(probes) == ["add", "greet"]
    assert probes["add"][0] == Probe("Q: 1+2\nA: ", "3", "exact", f"{path}:3")
    assert probes["add"][1].expect == "010"  # the text as written, not the number 10
    assert probes["add"][1].match == "contains"
    assert probes["greet"][0].match == "regex"


def test_yaml_top_level_match_sets_the_default(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("match: contains\nskills:\n  a:\n    - {prompt: x, expect: y}\n    - {prompt: x, expect: y, match: exact}\n")
    assert [p.match for p in load_probes(path)["a"]] == ["contains", "exact"]


def test_jsonl_folder_one_skill_per_file(tmp_path):
    (tmp_path / "sort.jsonl").write_text(json.dumps({"prompt": "Q: sort cba\nA: ", "answer": "abc"}) + "\n\n")
    (tmp_path / "add.jsonl").write_text("\n".join(json.dumps({"prompt": f"Q: {i}+1\nA: ", "answer": str(i + 1)}) for i in range(3)))
    probes = load_probes(tmp_path)
    assert list(probes) == ["add", "sort"]
    assert [p.expect for p in probes["add"]] == ["1", "2", "3"]
    assert probes["sort"][0] == Probe("Q: sort cba\nA: ", "abc", "exact", f"{tmp_path / 'sort.jsonl'}:1")
    assert load_probes(tmp_path / "sort.jsonl") == {"sort": probes["sort"]}


YAML_ERRORS = [
    ("skills: [1, 2]\n", ":1: 'skills' must map"),
    ("skill:\n  a: []\n", ":1: unknown key 'skill'; did you mean 'skills'?"),
    ("match: exact\n", "missing key 'skills'"),
    ("skills:\n  a: []\n", ":2: skills.a must be a non-empty list"),
    ("skills:\n  a:\n    - {prompt: x}\n", ":3: skills.a[0]: missing key 'answer' (or 'expect')"),
    ("skills:\n  a:\n    - {prompt: x, expect: y}\n    - {expect: y}\n", ":4: skills.a[1]: missing key 'prompt'"),
    ("skills:\n  a:\n    - {prompt: x, expcet: y}\n", "unknown key 'expcet'; did you mean 'expect'?"),
    ("skills:\n  a:\n    - {prompt: x, expect: y, match: exakt}\n", "'match' must be one of exact, contains, regex, not 'exakt'"),
    ("skills:\n  a:\n    - {prompt: x, expect: '(', match: regex}\n", "not a valid regular expression"),
    ("skills:\n  a:\n    - {prompt: x, expect: }\n", "'expect' must be a string"),
    ("skills:\n  a:\n    - {prompt: [x], expect: y}\n", ":3: skills.a[0].prompt must be a plain value"),
    ("skills:\n  a:\n    - just a string\n", ":3: skills.a[0] must be a mapping"),
    ("skills:\n  a: [\n", "not valid YAML"),
    ("", "expected a mapping with a 'skills' key"),
]


@pytest.mark.parametrize("text,message", YAML_ERRORS)
def test_malformed_yaml_is_one_line_naming_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "probes.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_probes(path)
    assert len(info.value.problems) == 1
    assert str(path) in info.value.problems[0]
    assert message in info.value.problems[0]


JSONL_ERRORS = [
    ('{"prompt": "x", "answer": "y"}\n{"prompt": "x"\n', "add.jsonl:2: not valid JSON"),
    ('{"prompt": "x", "answer": "y"}\n\n{"prompt": "x"}\n', "add.jsonl:3: missing key 'answer' (or 'expect')"),
    ('{"answer": "y"}\n', "add.jsonl:1: missing key 'prompt'"),
    ('{"prompt": "x", "anwser": "y"}\n', "add.jsonl:1: unknown key 'anwser'; did you mean 'answer'?"),
    ('{"prompt": "x", "answer": "y", "expect": "y"}\n', "add.jsonl:1: give 'expect' or 'answer', not both"),
    ('["x", "y"]\n', "add.jsonl:1: expected an object"),
    ('{"prompt": "", "answer": "y"}\n', "add.jsonl:1: 'prompt' must be a non-empty string"),
    ('{"prompt": "x", "answer": null}\n', "add.jsonl:1: 'answer' must be a string"),
    ("\n", "add.jsonl: no probes"),
]


@pytest.mark.parametrize("text,message", JSONL_ERRORS)
def test_malformed_jsonl_is_one_line_naming_file_line_and_key(tmp_path, text, message):
    (tmp_path / "add.jsonl").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_probes(tmp_path)
    assert message in info.value.problems[0]


def test_missing_probe_paths(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_probes(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="no <skill>.jsonl files"):
        load_probes(tmp_path)


@pytest.mark.parametrize(
    "answer,expect,kind,ok",
    [
        (" 46 ", "46", "exact", True),
        ("46", "46 ", "exact", True),
        ("460", "46", "exact", False),
        ("46", "4", "exact", False),
        ("it is 46.", "46", "contains", True),
        ("it is 4 6", "46", "contains", False),
        ("abc123", r"\d+", "regex", True),
        ("abc123", r"^\d+$", "regex", False),
        ("ABC", "abc", "exact", False),
    ],
)
def test_match_kinds(answer, expect, kind, ok):
    assert matches(answer, expect, kind) is ok


PROMPTS = ["q: 12+34\na: ", "the cat ", "q: 1+1\na: 2\nq: 3+4\na: ", "z"]


@pytest.fixture(scope="module")
def model_and_tokenizer(char_family):
    folder = char_family["b"]
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def test_batched_left_padded_generation_equals_one_by_one_greedy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = [greedy_one_by_one(model, tokenizer, p, 6) for p in PROMPTS]
    assert generate_answers(model, tokenizer, PROMPTS, max_tokens=6, batch_size=3) == expected
    assert all("\n" not in a and len(a) <= 6 for a in expected)
    assert tokenizer.padding_side == "right"  # restored


def test_score_probes_accuracy_per_skill(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    answers = [greedy_one_by_one(model, tokenizer, p, 6) for p in PROMPTS]
    probes = {
        "right": [Probe(p, a) for p, a in zip(PROMPTS, answers)],
        "half": [Probe(PROMPTS[0], answers[0]), Probe(PROMPTS[1], answers[1] + "x")],
        "contains": [Probe(PROMPTS[2], answers[2][1:3], "contains")],
        "wrong": [Probe(PROMPTS[3], "never")],
    }
    assert score_probes(model, tokenizer, probes, max_tokens=6, batch_size=2) == {"right": 1.0, "half": 0.5, "contains": 1.0, "wrong": 0.0}
