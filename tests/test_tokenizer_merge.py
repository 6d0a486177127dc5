"""tokenizer_source: union | base | <model> and the `tokenizer:` block, on hand-built tokenizers whose vocabularies differ.

Each output embedding / lm_head row is checked against its donors: a token one model has takes that
model's row, a token several have takes the method applied to theirs, padding rows the mean row, and
`tokens:` entries the row they name. The merged model and tokenizer load in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import mergesmith
from fixtures import read_state

SPECIALS = ["[UNK]", "<s>", "</s>"]
VOCAB_A = SPECIALS + ["hello", "world", "cat", "dog", "the"]
VOCAB_B = SPECIALS + ["world", "hello", "fish", "the", "bird", "sky"]  # shared words at other ids


def word_level(words: list[str], extra_special: list[str] = ()) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(extra_special))
    return tok


def save_model(folder: Path, tokenizer: Tokenizer, seed: int, base: Path | None = None) -> Path:
    """A tiny Llama whose embedding has one row per token of `tokenizer`, saved with that tokenizer."""
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=None, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if base is not None:
        state = transformers.LlamaForCausalLM.from_pretrained(base).state_dict()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name] + 0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=seed + 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    a = save_model(root / "a", word_level(VOCAB_A), seed=0)
    return {
        "a": a,
        "a_ft": save_model(root / "a_ft", word_level(VOCAB_A), seed=1, base=a),
        "b": save_model(root / "b", word_level(VOCAB_B, ["<|im_start|>"]), seed=2),
    }


def vocab_of(folder: Path) -> dict[str, int]:
    return json.loads(json.dumps(transformers.AutoTokenizer.from_pretrained(folder).get_vocab()))


def merge(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    mergesmith.merge(path, tmp_path / "out")
    return tmp_path / "out"


def runs(folder: Path, text: str) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(text)["input_ids"]
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
    return ids


def test_union_keeps_every_token_and_takes_each_row_from_its_donors(family, tmp_path):
    out = merge(tmp_path, {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
                           "models": [{"model": str(family["a"]), "parameters": {"weight": 1.0}},
                                      {"model": str(family["b"]), "parameters": {"weight": 3.0}}]})  # fmt: skip
    vocab, va, vb = vocab_of(out), vocab_of(family["a"]), vocab_of(family["b"])
    assert set(vocab) == set(va) | set(vb)
    assert all(vocab[t] == i for t, i in va.items())  # the base (first model) keeps its ids
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(vocab) == 12
    state, a, b = read_state(out), read_state(family["a"]), read_state(family["b"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert state[name].shape == (12, 16)
        for token, row in vocab.items():
            if token in va and token in vb:
                expected = (1.0 * a[name][va[token]] + 3.0 * b[name][vb[token]]) / 4.0
            else:
                expected = a[name][va[token]] if token in va else b[name][vb[token]]
            torch.testing.assert_close(state[name][row], expected, msg=f"{name} {token}")
    ids = runs(out, "hello fish cat <|im_start|> sky")
    assert [vocab[t] for t in ("hello", "fish", "cat", "<|im_start|>", "sky")] == ids
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 3  # from the tokenizer donor


def test_tokenizer_source_model_reorders_rows_to_its_vocabulary(family, tmp_path):
    out = merge(tmp_path, {"merge_method": "linear", "tokenizer_source": str(family["b"]), "parameters": {"weight": 1.0},
                           "models": [{"model": str(family["a"])}, {"model": str(family["b"])}]})  # fmt: skip
    assert (out / "tokenizer.json").read_text() == (family["b"] / "tokenizer.json").read_text()
    vb, va = vocab_of(family["b"]), vocab_of(family["a"])
    state, a, b = read_state(out), read_state(family["a"]), read_state(family["b"])
    emb = "model.embed_tokens.weight"
    assert state[emb].shape[0] == len(vb)
    torch.testing.assert_close(state[emb][vb["hello"]], (a[emb][va["hello"]] + b[emb][vb["hello"]]) / 2)
    torch.testing.assert_close(state[emb][vb["sky"]], b[emb][vb["sky"]])
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 5
    runs(out, "hello sky")


def test_tokens_block_sources_padding_and_task_arithmetic(family, tmp_path):
    out = merge(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(family["a"]), "dtype": "float32",
        "models": [{"model": str(family["a_ft"]), "parameters": {"weight": 0.5}}, {"model": str(family["b"]), "parameters": {"weight": 0.5}}],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
            "<new>": {"source": {"kind": "zero"}},
            "hello": {"source": str(family["b"]), "force": True},
            "dog": {"source": {"kind": "model_token", "model": str(family["a"]), "token": "cat"}},
            "the": {"source": str(family["a_ft"])},  # present everywhere and not forced: merged as usual
        }},
    })  # fmt: skip
    vocab, va, vb = vocab_of(out), vocab_of(family["a"]), vocab_of(family["b"])
    assert vocab["<new>"] == 12 and json.loads((out / "config.json").read_text())["vocab_size"] == 16
    state, base, ft, b = read_state(out), read_state(family["a"]), read_state(family["a_ft"]), read_state(family["b"])
    emb = state["model.embed_tokens.weight"]
    name = "model.embed_tokens.weight"
    assert emb.shape == (16, 16)
    assert torch.count_nonzero(emb[vocab["<new>"]]) == 0
    torch.testing.assert_close(emb[vocab["hello"]], b[name][vb["hello"]])
    torch.testing.assert_close(emb[vocab["dog"]], base[name][va["cat"]])
    # in base, a_ft and b: task arithmetic over all three
    the = base[name][va["the"]] + 0.5 * (ft[name][va["the"]] - base[name][va["the"]]) + 0.5 * (b[name][vb["the"]] - base[name][va["the"]])
    torch.testing.assert_close(emb[vocab["the"]], the)
    # in base and a_ft only: task arithmetic of a_ft against the base
    cat = base[name][va["cat"]] + 0.5 * (ft[name][va["cat"]] - base[name][va["cat"]])
    torch.testing.assert_close(emb[vocab["cat"]], cat)
    torch.testing.assert_close(emb[vocab["fish"]], b[name][vb["fish"]])  # only in b
    real = [r for t, r in vocab.items() if t != "<new>"]
    for pad in range(13, 16):
        torch.testing.assert_close(emb[pad], emb[real].mean(dim=0))
    runs(out, "hello <new> dog")


def bpe(corpus: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False))
    return tok


def test_union_of_bpe_tokenizers_encodes_each_models_words_with_its_tokens(tmp_path):
    tok_a = bpe(["the cat sat on the mat"] * 20 + ["a cat and a hat"] * 10, 40)
    tok_b = bpe(["fish swim in the sea"] * 20 + ["seaweed and sunfish"] * 10, 40)
    a, b = save_model(tmp_path / "a", tok_a, seed=0), save_model(tmp_path / "b", tok_b, seed=1)
    out = merge(tmp_path, {"merge_method": "linear", "tokenizer_source": "union", "parameters": {"weight": 1.0},
                           "models": [{"model": str(a)}, {"model": str(b)}]})  # fmt: skip
    merged = transformers.AutoTokenizer.from_pretrained(out)
    assert set(merged.get_vocab()) == set(tok_a.get_vocab()) | set(tok_b.get_vocab())
    for tok, words in ((tok_a, ["cat", "mat", "hat"]), (tok_b, ["fish", "sea", "sunfish"])):
        for word in words:
            assert merged.convert_ids_to_tokens(merged(word)["input_ids"]) == tok.encode(word).tokens, word
    runs(out, "the cat and the sunfish")


def test_same_vocabulary_everywhere_needs_no_row_gathering(family, tmp_path):
    from mergesmith.api import prepare

    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "tokenizer_source": "base", "base_model": str(family["a"]),
                                    "parameters": {"weight": 1.0}, "models": [{"model": str(family["a_ft"])}]}))  # fmt: skip
    plan = prepare(path)
    assert plan.vocabulary is not None and not plan.vocabulary.remap
    assert all(t.row_maps is None for t in plan.tasks)
