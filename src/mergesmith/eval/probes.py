"""Skill probes: prompts with an expected answer, grouped by skill, scored by greedy generation.

Two file forms, so that hand-written checks and generated probe sets both work:

* YAML: `skills: {name: [{prompt, expect, match}]}` (`match` optional: exact | contains | regex; a
  top-level `match:` sets the default, itself defaulting to `exact`);
* a folder of `<skill>.jsonl` files (or one such file), one `{"prompt": ..., "answer": ...}` object per line
  (`expect` is accepted for `answer`, and an optional `match`). The demo family ships its probes this way.

Prompts are used verbatim (a trailing "A: " matters to a model trained on that format). A malformed file is a
ConfigError naming the file, the line and the key, so a typo costs one look, not a debugging session.

Answers are the greedy continuation up to the first newline or end-of-sequence, at most `max_tokens` tokens,
generated in batches with left padding. Matching: `exact` compares after stripping whitespace, `contains`
looks for the expected text in the answer, `regex` is `re.search` (anchor it with ^...$ to match whole).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergesmith.errors import ConfigError, did_you_mean

MATCH_KINDS = ("exact", "contains", "regex")
_PROBE_KEYS = ("prompt", "expect", "answer", "match")


@dataclass(frozen=True)
class Probe:
    prompt: str
    expect: str
    match: str = "exact"
    where: str = ""  # file:line, for messages


def matches(answer: str, expect: str, kind: str = "exact") -> bool:
    """Whether a generated answer (already cut at its first newline) counts as correct."""
    if kind == "exact":
        return answer.strip() == expect.strip()
    if kind == "contains":
        return expect in answer
    if kind == "regex":
        return re.search(expect, answer) is not None
    raise ValueError(f"unknown match kind '{kind}'")


def load_probes(path: str | Path) -> dict[str, list[Probe]]:
    """Probes by skill (in file order; a folder's files in name order) from a YAML file, a .jsonl file or a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ConfigError(f"probes: {path} holds no <skill>.jsonl files")
        return {f.stem: _load_jsonl(f) for f in files}
    if not path.is_file():
        raise ConfigError(f"probes: {path} not found")
    if path.suffix == ".jsonl":
        return {path.stem: _load_jsonl(path)}
    return _load_yaml(path)


# ---------------------------------------------------------------------------------------------- JSONL

def _load_jsonl(path: Path) -> list[Probe]:
    probes: list[Probe] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object like {{\"prompt\": ..., \"answer\": ...}}")
        probes.append(_make_probe(row, where, default_match="exact"))
    if not probes:
        raise ConfigError(f"{path}: no probes in the file")
    return probes


def _make_probe(row: dict, where: str, default_match: str) -> Probe:
    for key in row:
        if key not in _PROBE_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{did_you_mean(str(key), _PROBE_KEYS)}")
    if "expect" in row and "answer" in row:
        raise ConfigError(f"{where}: give 'expect' or 'answer', not both")
    if "prompt" not in row:
        raise ConfigError(f"{where}: missing key 'prompt'")
    expect_key = "expect" if "expect" in row else "answer"
    if expect_key not in row:
        raise ConfigError(f"{where}: missing key 'answer' (or 'expect')")
    prompt, expect = row["prompt"], row[expect_key]
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
    if expect is None or isinstance(expect, bool) or not isinstance(expect, (str, int, float)):
        raise ConfigError(f"{where}: '{expect_key}' must be a string")
    expect = str(expect)
    kind = row.get("match", default_match)
    if kind not in MATCH_KINDS:
        raise ConfigError(f"{where}: 'match' must be one of {', '.join(MATCH_KINDS)}, not '{kind}'{did_you_mean(str(kind), MATCH_KINDS)}")
    if kind == "regex":
        try:
            re.compile(expect)
        except re.error as exc:
            raise ConfigError(f"{where}: '{expect_key}' is not a valid regular expression ({exc})") from None
    return Probe(prompt, expect, kind, where)


# ----------------------------------------------------------------------------------------------- YAML
# Walk the composed node tree rather than the loaded data: nodes carry line numbers for messages, and a
# scalar's text as written ("007", "yes", "1.0") instead of what YAML would turn it into (7, True, 1.0).

def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _load_yaml(path: Path) -> dict[str, list[Probe]]:
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{at}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}: expected a mapping with a 'skills' key")
    top = _mapping(root, path)
    for key, (knode, _) in top.items():
        if key not in ("skills", "match"):
            raise ConfigError(f"{path}:{_line(knode)}: unknown key '{key}'{did_you_mean(key, ('skills', 'match'))}")
    default_match = "exact"
    if "match" in top:
        knode, vnode = top["match"]
        default_match = _scalar(vnode, path, "match")
        if default_match not in MATCH_KINDS:
            raise ConfigError(f"{path}:{_line(vnode)}: 'match' must be one of {', '.join(MATCH_KINDS)}, not '{default_match}'")
    if "skills" not in top:
        raise ConfigError(f"{path}: missing key 'skills'")
    skills_node = top["skills"][1]
    if not isinstance(skills_node, yaml.MappingNode) or not skills_node.value:
        raise ConfigError(f"{path}:{_line(skills_node)}: 'skills' must map skill names to lists of probes")
    out: dict[str, list[Probe]] = {}
    for name, (knode, vnode) in _mapping(skills_node, path).items():
        where = f"{path}:{_line(knode)}"
        if not isinstance(vnode, yaml.SequenceNode) or not vnode.value:
            raise ConfigError(f"{where}: skills.{name} must be a non-empty list of {{prompt, expect}} items")
        probes = []
        for i, item in enumerate(vnode.value):
            item_where = f"{path}:{_line(item)}"
            if not isinstance(item, yaml.MappingNode):
                raise ConfigError(f"{item_where}: skills.{name}[{i}] must be a mapping with 'prompt' and 'expect'")
            row = {}
            for key, (kn, vn) in _mapping(item, path).items():
                row[key] = _scalar(vn, path, f"skills.{name}[{i}].{key}")
            try:
                probes.append(_make_probe(row, item_where, default_match))
            except ConfigError as exc:
                raise ConfigError(exc.problems[0].replace(f"{item_where}: ", f"{item_where}: skills.{name}[{i}]: ", 1)) from None
        out[name] = probes
    return out


def _mapping(node: yaml.MappingNode, path: Path) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for knode, vnode in node.value:
        key = _scalar(knode, path, "key")
        if key in out:
            raise ConfigError(f"{path}:{_line(knode)}: duplicate key '{key}'")
        out[key] = (knode, vnode)
    return out


def _scalar(node: yaml.Node, path: Path, what: str) -> str | None:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{path}:{_line(node)}: {what} must be a plain value, not a list or mapping")
    if node.tag == "tag:yaml.org,2002:null":
        return None
    return node.value


# ----------------------------------------------------------------------------------------- generation

def _stop_token_ids(tokenizer) -> list[int]:
    """End-of-sequence plus the token(s) that are exactly a newline in this vocabulary.

    Stopping is only a shortcut: answers are cut at their first newline anyway, so a vocabulary whose newline
    hides inside longer tokens still scores correctly, it just generates up to `max_tokens`.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for t in eos if isinstance(eos, list) else [eos]:
        if t is not None and t not in ids:
            ids.append(int(t))
    encoded = tokenizer.encode("\n", add_special_tokens=False)
    if len(encoded) == 1 and encoded[0] not in ids and encoded[0] != tokenizer.unk_token_id:
        ids.append(int(encoded[0]))
    return ids


def generate_answers(model, tokenizer, prompts: list[str], *, max_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy continuations of `prompts`, cut at the first newline, batched with left padding.

    Left padding keeps every prompt's last token at the end of its row, where generation continues; the
    attention mask keeps the padding out of the computation. Prompts are batched in order of length so that
    little of each batch is padding; the answers come back in the prompts' order.
    """
    import torch

    stop = _stop_token_ids(tokenizer)
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    try:
        for i in range(0, len(order), max(1, batch_size)):
            rows = order[i : i + batch_size]
            batch = tokenizer([prompts[r] for r in rows], return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                    eos_token_id=stop or None, pad_token_id=tokenizer.pad_token_id,
                    temperature=None, top_p=None, top_k=None,
                )
            new = out[:, batch["input_ids"].shape[1] :].cpu()
            for r, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[r] = text.split("\n", 1)[0]
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
    return answers


def score_probes(model, tokenizer, probes: dict[str, list[Probe]], *, max_tokens: int = 16, batch_size: int = 32) -> dict[str, float]:
    """Accuracy per skill: the share of a skill's probes whose greedy answer matches."""
    flat = [(skill, p) for skill, items in probes.items() for p in items]
    answers = generate_answers(model, tokenizer, [p.prompt for _, p in flat], max_tokens=max_tokens, batch_size=batch_size)
    hits: dict[str, list[bool]] = {skill: [] for skill in probes}
    for (skill, probe), answer in zip(flat, answers):
        hits[skill].append(matches(answer, probe.expect, probe.match))
    return {skill: sum(h) / len(h) for skill, h in hits.items()}
