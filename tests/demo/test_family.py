"""The demo family shipped in the package: loads in transformers, specialists are specialists, merging works.

Everything here runs on the shipped weights with plain torch (no mergesmith merge code), so it checks the
family itself: a failure means the family needs regenerating (python demo/train.py), not a merge bug.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from mergesmith.demo import FAMILY_DIR, LORA_SKILL, SKILLS, SPECIALIST_SKILLS, evaluate_skills, family_paths
from mergesmith.demo.skills import HELDOUT_TEXT, PROBES_DIR, heldout_perplexity, load_probes

N_PROBES = 60
# Task arithmetic weight the family is tuned for: base + TA_WEIGHT * sum(specialist - base).
TA_WEIGHT = 0.75


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(FAMILY_DIR / "base")


@pytest.fixture(scope="module")
def states():
    return {name: load_file(family_paths()[name] / "model.safetensors") for name in ("base", *SPECIALIST_SKILLS)}


def model_from_state(state: dict) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.from_pretrained(FAMILY_DIR / "base")
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def apply_lora(state: dict, folder) -> dict:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    adapter = load_file(folder / "adapter_model.safetensors")
    out = dict(state)
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            out[f"{module}.weight"] = state[f"{module}.weight"].float() + scale * (b.float() @ a.float())
    return out


@pytest.fixture(scope="module")
def scores(tokenizer, states):
    out = {name: evaluate_skills(family_paths()[name], tokenizer, n_probes=N_PROBES) for name in states}
    base = states["base"]
    merged = {k: base[k].float() + TA_WEIGHT * sum(states[s][k].float() - base[k].float() for s in SPECIALIST_SKILLS)
              for k in base}
    out["merge"] = evaluate_skills(model_from_state(merged), tokenizer, n_probes=N_PROBES)
    out["lora"] = evaluate_skills(model_from_state(apply_lora(base, family_paths()[f"lora_{LORA_SKILL}"])), tokenizer,
                                  n_probes=N_PROBES)
    print("\n" + "\n".join(f"{name:>8}: " + " ".join(f"{k}={v:.2f}" for k, v in row.items()) for name, row in out.items()))
    return out


def test_family_files_and_size():
    paths = family_paths()
    assert set(paths) == {"base", *SPECIALIST_SKILLS, f"lora_{LORA_SKILL}"}
    for name in ("base", *SPECIALIST_SKILLS):
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (paths[name] / f).is_file(), (name, f)
    lora = paths[f"lora_{LORA_SKILL}"]
    assert (lora / "adapter_config.json").is_file() and (lora / "adapter_model.safetensors").is_file()
    total = sum(f.stat().st_size for f in FAMILY_DIR.rglob("*") if f.is_file())
    assert total < 40 * 2**20, total
    for skill in SKILLS:
        assert len(load_probes(skill)) >= 100
        assert (PROBES_DIR / f"{skill}.jsonl").is_file()
    assert HELDOUT_TEXT.stat().st_size > 1000


def test_models_load_in_transformers(tokenizer):
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    text = "Q: reverse abcd\nA: dcba\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for name in ("base", *SPECIALIST_SKILLS):
        model = transformers.AutoModelForCausalLM.from_pretrained(family_paths()[name])
        assert type(model).__name__ == "LlamaForCausalLM"
        n = sum(p.numel() for p in model.parameters())
        assert 1_000_000 <= n <= 5_000_000


def test_lora_is_peft_format(states):
    folder = family_paths()[f"lora_{LORA_SKILL}"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    adapter = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    for key, t in adapter.items():
        assert key.startswith("base_model.model.model.layers.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        w = states["base"][f"{module}.weight"]
        if ".lora_A." in key:
            assert t.shape == (cfg["r"], w.shape[1])
        else:
            assert t.shape == (w.shape[0], cfg["r"])


def test_each_specialist_beats_base_and_the_others(scores):
    for skill in SPECIALIST_SKILLS:
        own = scores[skill][skill]
        assert own >= scores["base"][skill] + 0.3, (skill, scores)
        for other in SPECIALIST_SKILLS:
            if other != skill:
                assert own > scores[other][skill] + 0.2, (skill, other, scores)


def test_lora_adapter_teaches_its_skill(scores):
    assert scores["lora"][LORA_SKILL] >= scores["base"][LORA_SKILL] + 0.3, scores


def test_task_arithmetic_keeps_every_skill(scores):
    for skill in SPECIALIST_SKILLS:
        assert scores["merge"][skill] >= scores["base"][skill] + 0.05, (skill, scores)


def test_perplexity_on_heldout_text(tokenizer):
    ppl = heldout_perplexity(FAMILY_DIR / "base", tokenizer, max_chars=4000)
    assert 1.0 < ppl < 8.0, ppl
