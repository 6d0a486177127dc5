"""End to end: configs in, Hugging Face folders out, checked tensor by tensor against formulas and loaded in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import mergesmith
from fixtures import make_model, read_state


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def generates(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    return out


def test_linear_matches_weighted_average_and_loads(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {
        "merge_method": "linear",
        "models": [{"model": str(f["math"]), "parameters": {"weight": 0.3}},
                   {"model": str(f["code"]), "parameters": {"weight": 0.9}}],
    })  # fmt: skip
    result = mergesmith.merge(cfg, tmp_path / "out")
    a, b, out = read_state(f["math"]), read_state(f["code"]), read_state(tmp_path / "out")
    assert set(out) == set(a)
    for name in a:
        expected = (0.3 * a[name] + 0.9 * b[name]) / 1.2
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)
    assert result.tensors_written == len(a)
    assert result.bytes_written == sum(t.numel() * t.element_size() for t in out.values())
    generates(tmp_path / "out")


def test_task_arithmetic_with_gradient_and_filter(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {
        "merge_method": "task_arithmetic",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["math"]), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(f["code"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.25}, {"value": 0.5}]}},
        ],
        "parameters": {"lambda": 2.0},
        "dtype": "float32",
    })  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "out")
    base, a, b, out = (read_state(p) for p in (f["base"], f["math"], f["code"], tmp_path / "out"))
    for name in base:
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            w_math = layer / 3  # gradient [0, 1] over 4 layers: t = i / (n - 1)
        else:
            w_math = 0.0  # non-layer tensors take t = 0, as in mergekit
        w_code = 0.25 if "mlp" in name else 0.5
        expected = base[name] + 2.0 * (w_math * (a[name] - base[name]) + w_code * (b[name] - base[name]))
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-5, msg=name)
    generates(tmp_path / "out")


def test_bf16_output_is_rounded_once_from_float32(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": str(f["math"]), "parameters": {"weight": 1.0}}, {"model": str(f["code"]), "parameters": {"weight": 1.0}}],
    })  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "out")
    a, b, out = read_state(f["math"]), read_state(f["code"]), read_state(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    assert out[name].dtype == torch.bfloat16
    assert torch.equal(out[name], ((a[name] + b[name]) / 2).to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_frankenmerge_renumbers_layers_and_updates_config(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(f["math"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(f["code"]), "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    })  # fmt: skip
    result = mergesmith.merge(cfg, tmp_path / "out")
    assert result.num_layers == 6
    out, a, b = read_state(tmp_path / "out"), read_state(f["math"]), read_state(f["code"])
    origins = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    for k, (src, layer) in enumerate(origins):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{k}.{suffix}"], src[f"model.layers.{layer}.{suffix}"])
    assert not any(n.startswith("model.layers.6.") for n in out)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # pre-weights from slice 0
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])  # post-weights from the last slice
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6
    generates(tmp_path / "out")


def test_slice_may_use_two_ranges_of_the_same_model(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {
        "merge_method": "linear",
        "slices": [{"sources": [
            {"model": str(f["math"]), "layer_range": [0, 2], "parameters": {"weight": 1.0}},
            {"model": str(f["math"]), "layer_range": [2, 4], "parameters": {"weight": 3.0}},
        ]}],
    })  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "out")
    out, a = read_state(tmp_path / "out"), read_state(f["math"])
    name = "self_attn.k_proj.weight"
    for k in range(2):
        expected = (1.0 * a[f"model.layers.{k}.{name}"] + 3.0 * a[f"model.layers.{k + 2}.{name}"]) / 4.0
        torch.testing.assert_close(out[f"model.layers.{k}.{name}"], expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


def test_passthrough_scale_by_filter(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(f["math"]), "layer_range": [0, 4],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]}],
    })  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "out")
    out, a = read_state(tmp_path / "out"), read_state(f["math"])
    assert torch.count_nonzero(out["model.layers.2.self_attn.o_proj.weight"]) == 0
    assert torch.equal(out["model.layers.2.self_attn.q_proj.weight"], a["model.layers.2.self_attn.q_proj.weight"])


@pytest.mark.parametrize("family", ["mistral_family", "gpt2_family"])
def test_other_architectures_merge_and_generate(family, request, tmp_path):
    f = request.getfixturevalue(family)
    cfg = write_config(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(f["base"]),
        "models": [{"model": str(f["a"]), "parameters": {"weight": 0.5}}],
    })  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "out")
    base, a, out = read_state(f["base"]), read_state(f["a"]), read_state(tmp_path / "out")
    for name in out:
        if out[name].is_floating_point():
            torch.testing.assert_close(out[name], base[name] + 0.5 * (a[name] - base[name]), msg=name)
    generates(tmp_path / "out")


def test_sharded_output_with_index_loads(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(f["math"]), "parameters": {"weight": 1.0}}]})
    result = mergesmith.merge(cfg, tmp_path / "out", out_shard_size="8KB")
    assert len(result.shard_files) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(result.shard_files)
    assert result.shard_files[0] == f"model-00001-of-{len(result.shard_files):05d}.safetensors"
    assert torch.equal(read_state(tmp_path / "out")["lm_head.weight"], read_state(f["math"])["lm_head.weight"])
    generates(tmp_path / "out")


def test_reads_sharded_safetensors_and_bin_inputs(llama_family, tmp_path):
    f = llama_family
    sharded = make_model(tmp_path / "sharded", "llama", seed=5, base=f["base"], shard_size="20KB")
    pickled = make_model(tmp_path / "pickled", "llama", seed=6, base=f["base"], safe=False)
    assert (sharded / "model.safetensors.index.json").exists() and (pickled / "pytorch_model.bin").exists()
    cfg = write_config(tmp_path, {
        "merge_method": "linear",
        "models": [{"model": str(sharded), "parameters": {"weight": 1.0}}, {"model": str(pickled), "parameters": {"weight": 1.0}}],
    })  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "out")
    s = read_state(sharded)
    p = torch.load(pickled / "pytorch_model.bin", weights_only=True)
    out = read_state(tmp_path / "out")
    for name in out:
        torch.testing.assert_close(out[name], (s[name] + p[name]) / 2)


def test_tied_embeddings_stay_tied(tmp_path):
    base = make_model(tmp_path / "base", "llama_tied", seed=0)
    ft = make_model(tmp_path / "ft", "llama_tied", seed=1, base=base)
    assert "lm_head.weight" not in read_state(base)
    cfg = write_config(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                                  "models": [{"model": str(ft), "parameters": {"weight": 1.0}}]})
    mergesmith.merge(cfg, tmp_path / "out")
    out = read_state(tmp_path / "out")
    assert "lm_head.weight" not in out
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_model_merges_with_tied_one_through_its_embedding(tmp_path):
    untied = make_model(tmp_path / "untied", "llama", seed=0)
    tied = make_model(tmp_path / "tied", "llama_tied", seed=1)
    cfg = write_config(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(untied), "parameters": {"weight": 1.0}}, {"model": str(tied), "parameters": {"weight": 1.0}}]})
    mergesmith.merge(cfg, tmp_path / "out")
    out, u, t = read_state(tmp_path / "out"), read_state(untied), read_state(tied)
    torch.testing.assert_close(out["lm_head.weight"], (u["lm_head.weight"] + t["model.embed_tokens.weight"]) / 2)


def test_dry_run_writes_nothing_and_reports_plan(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(f["math"]), "parameters": {"weight": 1.0}}]})
    result = mergesmith.merge(cfg, tmp_path / "out", dry_run=True)
    assert result.dry_run and not (tmp_path / "out").exists()
    assert result.tensors_written == len(read_state(f["math"]))


def test_output_folder_has_card_config_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = make_model(tmp_path / "base", "llama", seed=0)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(base)
    cfg = write_config(tmp_path, {"merge_method": "linear", "chat_template": "chatml",
                                  "models": [{"model": str(base), "parameters": {"weight": 1.0}}]})
    mergesmith.merge(cfg, tmp_path / "out")
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["tags"] == ["merge", "mergesmith"]
    assert "merge_method: linear" in card
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"
    assert (out / "generation_config.json").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello world")["input_ids"] == [1, 2]
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_base_model_outside_models_is_an_input_as_in_mergekit(llama_family, tmp_path):
    f = llama_family
    cfg = write_config(tmp_path, {"merge_method": "linear", "base_model": str(f["base"]), "parameters": {"weight": 1.0},
                                  "models": [{"model": str(f["math"])}, {"model": str(f["code"])}]})  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "out")
    base, a, b, out = (read_state(p) for p in (f["base"], f["math"], f["code"], tmp_path / "out"))
    name = "model.layers.3.mlp.gate_proj.weight"
    torch.testing.assert_close(out[name], (base[name] + a[name] + b[name]) / 3)


def test_compute_dtype_bfloat16_rounds_like_mergekit(llama_family, tmp_path):
    """--compute-dtype bfloat16 does the arithmetic on bf16 tensors, as mergekit does for bf16 models."""
    f = llama_family
    cfg = write_config(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "bfloat16",
                                  "models": [{"model": str(f["math"]), "parameters": {"weight": 0.3}},
                                             {"model": str(f["code"]), "parameters": {"weight": 0.7}}]})  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "bf16", compute_dtype="bfloat16")
    mergesmith.merge(cfg, tmp_path / "fp32")
    base, a, b = (read_state(p) for p in (f["base"], f["math"], f["code"]))
    bf16, fp32 = read_state(tmp_path / "bf16"), read_state(tmp_path / "fp32")
    name = "model.layers.1.mlp.up_proj.weight"
    x, y, z = (t[name].to(torch.bfloat16) for t in (base, a, b))
    # mergekit's generalized task arithmetic: bf16 weight tensor, products rounded, sum(dim=0), base + sum
    weights = torch.tensor([0.3, 0.7], dtype=torch.bfloat16).view(2, 1, 1)
    mixed = (torch.stack([y - x, z - x]) * weights).sum(dim=0)
    assert torch.equal(bf16[name], x + mixed)
    assert torch.equal(fp32[name], (base[name] + 0.3 * (a[name] - base[name]) + 0.7 * (b[name] - base[name])).to(torch.bfloat16))
    assert not torch.equal(bf16[name], fp32[name])  # the two really differ
