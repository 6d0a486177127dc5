"""GGUF in and out: a tiny Llama with a tiny byte-level BPE tokenizer, exported to GGUF, read back by `gguf`'s own
reader, converted back to a Hugging Face folder by ours, merged straight from GGUF files, and loaded in transformers.

The Q/K row permutation is checked against llama.cpp's formula written out here, independently of ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

import mergesmith  # noqa: E402
from fixtures import read_state  # noqa: E402
from mergesmith.cli import main  # noqa: E402
from mergesmith.errors import InputError, MergesmithError  # noqa: E402
from mergesmith.io.gguf_arch import gguf_row_order, hf_row_order  # noqa: E402
from mergesmith.io.gguf_reader import GGUFModel, convert_gguf_to_hf  # noqa: E402
from mergesmith.io.gguf_writer import export_gguf  # noqa: E402

TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "def merge(models): return sum(models) / len(models)  # 12345",
] * 20
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
Q, K = gguf.GGMLQuantizationType, gguf.constants.Keys


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXT, trainer)
    tk.add_tokens(["<think>"])  # a non-special added token: USER_DEFINED in GGUF
    tk.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": TEMPLATE}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_llama(folder: Path, *, tied: bool = False, seed: int = 0) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        initializer_range=0.3, rope_theta=5000.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    hf = make_llama(root / "hf")
    return {"root": root, "hf": hf, "f16": export_gguf(hf, root / "tiny.f16.gguf", "f16").path,
            "q8_0": export_gguf(hf, root / "tiny.q8_0.gguf", "q8_0").path}  # fmt: skip


def test_row_orders_are_llama_cpp_permutation_and_its_inverse():
    w = np.arange(48 * 3).reshape(48, 3)
    for heads in (1, 2, 4, 6):
        assert (w[gguf_row_order(48, heads)] == llama_cpp_permute(w, heads)).all()
        assert (llama_cpp_permute(w, heads)[hf_row_order(48, heads)] == w).all()


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_export_reads_back_with_gguf_reader(tiny, kind):
    state = read_state(tiny["hf"])
    reader = gguf.GGUFReader(tiny[kind])
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == (gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    expected_meta = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
                     "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.context_length": 128,
                     "llama.rope.dimension_count": 16, "llama.vocab_size": 320}  # fmt: skip
    assert {k: fields[k] for k in expected_meta} == expected_meta
    assert fields["llama.rope.freq_base"] == pytest.approx(5000.0)
    # vocabulary: every id's token, specials as CONTROL, the added token as USER_DEFINED, padding rows UNUSED
    tok = json.loads((tiny["hf"] / "tokenizer.json").read_text())
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    for content, i in tok["model"]["vocab"].items():
        assert tokens[i] == content
    types = fields["tokenizer.ggml.token_type"]
    assert [types[tokens.index(s)] for s in SPECIALS] == [3, 3, 3]
    assert types[tokens.index("<think>")] == 4 and tokens[-1] == "[PAD319]" and types[-1] == 5
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == "<|im_start|>"
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[fields["tokenizer.ggml.padding_token_id"]] == "<|endoftext|>"
    assert fields["tokenizer.chat_template"] == TEMPLATE and fields["tokenizer.ggml.add_bos_token"] is False
    # tensors: llama.cpp names, 1-D in F32, Q/K permuted, values within the type's rounding
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 * 9
    want = {"token_embd.weight": state["model.embed_tokens.weight"], "output.weight": state["lm_head.weight"],
            "output_norm.weight": state["model.norm.weight"]}  # fmt: skip
    for i in range(2):
        p = f"model.layers.{i}."
        want |= {f"blk.{i}.attn_q.weight": llama_cpp_permute(state[p + "self_attn.q_proj.weight"].numpy(), 4),
                 f"blk.{i}.attn_k.weight": llama_cpp_permute(state[p + "self_attn.k_proj.weight"].numpy(), 2),
                 f"blk.{i}.attn_v.weight": state[p + "self_attn.v_proj.weight"],
                 f"blk.{i}.attn_output.weight": state[p + "self_attn.o_proj.weight"],
                 f"blk.{i}.ffn_gate.weight": state[p + "mlp.gate_proj.weight"], f"blk.{i}.ffn_up.weight": state[p + "mlp.up_proj.weight"],
                 f"blk.{i}.ffn_down.weight": state[p + "mlp.down_proj.weight"],
                 f"blk.{i}.attn_norm.weight": state[p + "input_layernorm.weight"],
                 f"blk.{i}.ffn_norm.weight": state[p + "post_attention_layernorm.weight"]}  # fmt: skip
    assert set(tensors) == set(want)
    for name, expected in want.items():
        expected = np.asarray(expected, dtype=np.float32)
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        if expected.ndim == 1:
            assert t.tensor_type == Q.F32 and (got == expected).all()
            continue
        assert t.tensor_type == (Q.F16 if kind == "f16" else Q.Q8_0)
        if kind == "f16":  # exactly numpy's rounding to float16
            assert (got == expected.astype(np.float16).astype(np.float32)).all(), name
            continue
        # q8_0: within half a step (1/127 of the largest magnitude of each block of 32), plus the f16 scale's rounding
        step = np.abs(expected.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        err = np.abs(got - expected).reshape(-1, 32)
        assert (err <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
        assert err.max() > 0  # really quantized


def test_gguf_to_hf_round_trip_reproduces_tensors_tokenizer_and_logits(tiny, tmp_path):
    state = read_state(tiny["hf"])
    result = convert_gguf_to_hf(tiny["f16"], tmp_path / "back")
    back = read_state(tmp_path / "back")
    assert set(back) == set(state) and result.tensors == len(state)
    for name, tensor in state.items():
        assert back[name].dtype == (torch.float16 if tensor.dim() > 1 else torch.float32), name
        torch.testing.assert_close(back[name].float(), tensor.half().float() if tensor.dim() > 1 else tensor, rtol=0, atol=0)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] == 2 and config["rope_theta"] == pytest.approx(5000.0)
    ids = torch.tensor([[1, 40, 57, 99, 7, 250, 2]])
    torch.testing.assert_close(logits(tmp_path / "back", ids), logits(tiny["hf"], ids), rtol=2e-2, atol=2e-2)
    # the rebuilt tokenizer tokenizes like the original and applies the chat template
    a = transformers.AutoTokenizer.from_pretrained(tiny["hf"])
    b = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    for text in TEXT[:3] + ["<|im_start|>user\nhi <think> 987<|im_end|>", "  spaces\n\nand café"]:
        assert b(text)["input_ids"] == a(text)["input_ids"], text
    chat = [{"role": "user", "content": "Hello there"}]
    assert b.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == a.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (b.bos_token, b.eos_token, b.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_q8_0_gguf_reader_dequantizes_rows_and_undoes_permutation(tiny):
    model = GGUFModel.open("q8", tiny["q8_0"])
    state = read_state(tiny["hf"])
    reader = gguf.GGUFReader(tiny["q8_0"])
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight")
    full = gguf.quants.dequantize(t.data, t.tensor_type).reshape(32, 64)
    hf = model.read("model.layers.1.self_attn.k_proj.weight")
    assert (llama_cpp_permute(hf.numpy(), 2) == full).all()  # exactly the dequantized rows, un-permuted
    assert (model.read("model.layers.1.self_attn.k_proj.weight", (5, 19)) == hf[5:19]).all()
    torch.testing.assert_close(hf, state["model.layers.1.self_attn.k_proj.weight"], rtol=0, atol=0.02)
    assert model.tensors["model.layers.1.self_attn.k_proj.weight"].dtype == torch.float32


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_reader_handles_quant_types(tmp_path, qtype):
    """Tensors of each type (K-quants from random blocks with sane scales) read as gguf's dequantize says, by rows."""
    qt = Q[qtype]
    rng = np.random.default_rng(0)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    cols = max(block, 256)

    def quantized(rows: int) -> np.ndarray:
        if qtype.endswith("_K"):
            raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
            scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            at = (0, 2) if qtype == "Q4_K" else (size - 2,)  # Q4_K: d, dmin first; Q6_K: d last
            for off in at:
                raw[:, :, off : off + 2] = scale
            return raw.reshape(rows, -1)
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)

    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    for key, value in {"embedding_length": cols, "block_count": 1, "feed_forward_length": cols, "attention.head_count": 4,
                       "attention.head_count_kv": 2, "context_length": 64}.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    tensors = {"token_embd.weight": quantized(8), "blk.0.attn_q.weight": quantized(cols), "blk.0.attn_k.weight": quantized(cols // 2)}
    for name, data in tensors.items():
        w.add_tensor(name, data, raw_dtype=qt)
    w.add_tensor("rope_freqs.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = GGUFModel.open("m", tmp_path / "m.gguf")
    assert any("rope_freqs.weight" in warning for warning in model.warnings)
    assert model.config["tie_word_embeddings"] is True and "tokenizer" in " ".join(model.warnings)
    for gguf_name, hf_name, heads in (("token_embd.weight", "model.embed_tokens.weight", None),
                                      ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 4),
                                      ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 2)):  # fmt: skip
        full = gguf.quants.dequantize(tensors[gguf_name], qt)
        got = model.read(hf_name).numpy()
        assert np.isfinite(full).all()
        assert (llama_cpp_permute(got, heads) if heads else got).tobytes() == full.tobytes()
        assert (model.read(hf_name, (3, 7)).numpy() == got[3:7]).all()


def test_merge_straight_from_gguf_files_equals_merge_of_converted_folders(tmp_path):
    a = export_gguf(make_llama(tmp_path / "a", seed=1), tmp_path / "a.gguf", "f16").path
    b = export_gguf(make_llama(tmp_path / "b", seed=2), tmp_path / "b.gguf", "q8_0").path
    convert_gguf_to_hf(a, tmp_path / "a_hf")
    convert_gguf_to_hf(b, tmp_path / "b_hf")
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.25}}, {"model": str(b), "parameters": {"weight": 0.75}}]}  # fmt: skip
    mergesmith.merge(config, tmp_path / "from_gguf")
    config["models"] = [{"model": str(tmp_path / "a_hf"), "parameters": {"weight": 0.25}}, {"model": str(tmp_path / "b_hf"), "parameters": {"weight": 0.75}}]
    mergesmith.merge(config, tmp_path / "from_hf")
    x, y = read_state(tmp_path / "from_gguf"), read_state(tmp_path / "from_hf")
    assert set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x)
    # the GGUF's rebuilt tokenizer travels into the merge
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "from_gguf")
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == TEMPLATE


def test_cli_convert_export_and_merge_gguf(tmp_path, capsys):
    hf = make_llama(tmp_path / "m", tied=True)
    assert main(["export-gguf", str(hf), str(tmp_path / "m.gguf"), "--type", "bf16", "-q"]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses the embedding
    assert {t.tensor_type for t in reader.tensors if len(t.shape) > 1 and t.shape[1] > 1} == {Q.BF16}
    assert main(["export-gguf", str(hf), str(tmp_path / "m.gguf")]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back"), "-q"]) == 0
    back, state = read_state(tmp_path / "back"), read_state(hf)
    assert set(back) == set(state)  # no lm_head either way
    for name, tensor in state.items():  # matrices rounded to bf16, 1-D tensors exact
        expected = tensor.bfloat16().float() if tensor.dim() > 1 else tensor
        torch.testing.assert_close(back[name].float(), expected, rtol=0, atol=0)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    rounded = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.dim() > 1:
                param.copy_(param.bfloat16().float())
        torch.testing.assert_close(logits(tmp_path / "back", ids), rounded(ids).logits, rtol=1e-4, atol=1e-4)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'm.gguf'}\n    parameters: {{weight: 1.0}}\n  - model: {hf}\n    parameters: {{weight: 1.0}}\n")
    assert main(["merge", str(cfg), str(tmp_path / "merged"), "-q", "--gguf", "q8_0"]) == 0
    out = gguf.GGUFReader(tmp_path / "merged" / "merged.Q8_0.gguf")
    assert {t.tensor_type for t in out.tensors} == {Q.F32, Q.Q8_0}
    # a GGUF re-quantized to q8_0 (GGUF in, GGUF out): same tensors as a q8_0 export of the folder it came from
    assert main(["export-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "m8.gguf"), "--type", "q8_0", "-q"]) == 0
    assert main(["export-gguf", str(tmp_path / "back"), str(tmp_path / "b8.gguf"), "--type", "q8_0", "-q"]) == 0
    m8 = {t.name: bytes(t.data) for t in gguf.GGUFReader(tmp_path / "m8.gguf").tensors}
    assert m8 == {t.name: bytes(t.data) for t in gguf.GGUFReader(tmp_path / "b8.gguf").tensors}
    assert main(["convert", str(tmp_path / "nothing.gguf"), str(tmp_path / "x")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_round_trip(tmp_path, arch):
    """Qwen2 (arch qwen2: q/k/v biases, no permutation) and Mistral (exported as llama) come back with the same logits."""
    kwargs = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.3)  # fmt: skip
    config = transformers.Qwen2Config(**kwargs) if arch == "qwen2" else transformers.MistralConfig(**kwargs)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if arch == "qwen2":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)  # non-zero biases, so a lost or permuted bias shows
    model.save_pretrained(tmp_path / "hf")
    make_tokenizer(tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == ("qwen2" if arch == "qwen2" else "llama")
    assert ("blk.0.attn_q.bias" in {t.name for t in reader.tensors}) == (arch == "qwen2")
    convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back")
    state, back = read_state(tmp_path / "hf"), read_state(tmp_path / "back")
    assert set(back) == set(state) and all(torch.equal(back[n], state[n]) for n in state)
    ids = torch.tensor([[1, 40, 57, 99, 7, 250, 2]])
    torch.testing.assert_close(logits(tmp_path / "back", ids), logits(tmp_path / "hf", ids), rtol=1e-5, atol=1e-5)


def test_vocab_with_bos_and_llama3_pre_tokenizer_round_trips(tiny, tmp_path):
    """A Llama-3-style GGUF vocabulary (pre `llama-bpe`, add_bos_token) becomes a tokenizer that splits like llama.cpp's
    regex and prepends BOS, and exporting that tokenizer finds `llama-bpe` and add_bos_token again."""
    from mergesmith.io.gguf_reader import read_metadata
    from mergesmith.io.gguf_vocab import gguf_vocab_from_hf, write_hf_tokenizer

    meta = read_metadata(gguf.GGUFReader(tiny["f16"]))
    meta |= {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": True}
    folder = tmp_path / "tok"
    folder.mkdir()
    assert write_hf_tokenizer(meta, folder) == []
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok("Hello 12345")["input_ids"]
    assert ids[0] == meta["tokenizer.ggml.bos_token_id"]
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("Hello 12345")]
    assert pieces == ["Hello", "Ġ", "123", "45"]  # llama.cpp's llama-bpe regex: digits in groups of three
    back, warnings = gguf_vocab_from_hf(folder, {}, 320)
    assert warnings == [] and back["tokenizer.ggml.pre"] == "llama-bpe" and back["tokenizer.ggml.add_bos_token"] is True
    assert back["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]
    assert back["tokenizer.ggml.token_type"] == meta["tokenizer.ggml.token_type"]
    assert back["tokenizer.ggml.merges"] == meta["tokenizer.ggml.merges"]


def test_gguf_errors_are_user_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(InputError, match="cannot read GGUF"):
        GGUFModel.open("bad", bad)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"")
    (two / "b.gguf").write_bytes(b"")
    with pytest.raises(MergesmithError, match="2 GGUF files"):
        mergesmith.merge({"merge_method": "linear", "models": [{"model": str(two), "parameters": {"weight": 1.0}}]}, tmp_path / "out")
