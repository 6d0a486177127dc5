"""Streaming over model folders: per-layer grouping, embeddings' share, vocab trimming, config and CLI inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from _analyze_families import write_tensors
from mergesmith.analyze import analyze
from mergesmith.cli import main
from mergesmith.errors import ConfigError


def _tensors(seed: int, vocab: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "model.embed_tokens.weight": r(vocab, 3),
        "model.layers.0.mlp.weight": r(3, 3),
        "model.layers.0.norm.weight": r(3),
        "model.layers.1.mlp.weight": r(3, 3),
        "model.norm.weight": r(3),
        "lm_head.weight": r(vocab, 3),
    }


@pytest.fixture(scope="module")
def hand_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    base = _tensors(0)
    a = {k: v + d for (k, v), d in zip(base.items(), _tensors(1).values())}
    b = {k: v + d for (k, v), d in zip(base.items(), _tensors(2).values())}
    return root, base, a, b, write_tensors(root / "base", base, 2), write_tensors(root / "a", a, 2), write_tensors(root / "b", b, 2)


def test_layers_and_overall_equal_computations_on_the_full_tensors(hand_family):
    _, base, a, b, pb, pa, pbb = hand_family
    result = analyze(models=[str(pa), str(pbb)], base=str(pb), top_k=0.25)
    assert [g["name"] for g in result["layers"]] == ["embeddings", "layer 0", "layer 1", "final"]
    groups = {"embeddings": ["model.embed_tokens.weight"], "layer 0": ["model.layers.0.mlp.weight", "model.layers.0.norm.weight"],
              "layer 1": ["model.layers.1.mlp.weight"], "final": ["model.norm.weight", "lm_head.weight"]}  # fmt: skip
    for layer in result["layers"]:
        da = torch.cat([(a[n] - base[n]).flatten() for n in groups[layer["name"]]]).double()
        db = torch.cat([(b[n] - base[n]).flatten() for n in groups[layer["name"]]]).double()
        assert layer["norm"] == pytest.approx([float(da.norm()), float(db.norm())], rel=1e-5)
        assert layer["cosine"][0][1] == pytest.approx(float(da @ db / (da.norm() * db.norm())), rel=1e-5)
        assert layer["tensors"] == len(groups[layer["name"]])
    all_a = torch.cat([(a[n] - base[n]).flatten() for n in base]).double()
    emb_a = sum(float((a[n] - base[n]).double().square().sum()) for n in ("model.embed_tokens.weight", "lm_head.weight"))
    o = result["overall"]
    assert o["norm"][0] == pytest.approx(float(all_a.norm()), rel=1e-5)
    assert o["embedding_fraction"][0] == pytest.approx(emb_a / float(all_a.square().sum()), rel=1e-5)
    assert o["numel"] == sum(t.numel() for t in base.values())
    # top-k is taken per tensor: ceil(0.25 · numel) entries of each
    assert o["topk_fraction"][0] == pytest.approx(sum(math.ceil(0.25 * t.numel()) for t in base.values()) / o["numel"])
    assert result["base"]["parameters"] == o["numel"] and result["models"][1]["role"] == "source"
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN


def test_different_vocab_sizes_are_compared_on_common_rows(hand_family, tmp_path):
    root, base, a, _, pb, pa, _ = hand_family
    big = _tensors(3, vocab=6)
    for name in base:
        if big[name].shape == base[name].shape:
            big[name] = base[name] + big[name]
    pc = write_tensors(tmp_path / "c", big, 2)
    result = analyze(models=[str(pa), str(pc)], base=str(pb))
    assert any("first 4 rows" in n and "embed_tokens" in n for n in result["notes"])
    assert result["overall"]["tensors"] == len(base)


def test_config_input_takes_base_model_as_reference(llama_family, tmp_path):
    f = llama_family
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(f["base"]),
                                   "models": [{"model": str(f["math"]), "parameters": {"weight": 1.0}},
                                              {"model": str(f["code"]), "parameters": {"weight": 1.0}}]}))  # fmt: skip
    by_config = analyze(cfg, rank=False)
    by_paths = analyze(models=[str(f["math"]), str(f["code"])], base=str(f["base"]), rank=False)
    assert by_config["base"]["name"] == str(f["base"]) and [m["name"] for m in by_config["models"]] == [str(f["math"]), str(f["code"])]
    assert by_config["overall"]["cosine"] == by_paths["overall"]["cosine"]
    assert by_config["config"] == str(cfg)
    assert [g["name"] for g in by_config["layers"]] == ["embeddings"] + [f"layer {i}" for i in range(4)] + ["final"]


def test_bad_inputs_are_one_line_errors(hand_family, capsys):
    _, _, _, _, pb, pa, _ = hand_family
    with pytest.raises(ConfigError):
        analyze(models=[str(pa)])  # one model and no base: nothing to compare
    assert main(["analyze", "--base", str(pb), "--models", str(pa), "/nonexistent/model"]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main(["analyze", "--base", str(pb), "--models", str(pa), "--top-k", "1.5"]) == 2
    assert main(["analyze"]) == 2


def test_reads_one_tensor_of_each_model_at_a_time(hand_family, monkeypatch):
    from mergesmith.io.source_model import SourceModel

    _, base, _, _, pb, pa, pbb = hand_family
    reads: list[tuple[str, str]] = []
    original = SourceModel.read

    def spy(self, name, rows=None):
        reads.append((self.name, name))
        return original(self, name, rows)

    monkeypatch.setattr(SourceModel, "read", spy)
    analyze(models=[str(pa), str(pbb)], base=str(pb))
    # every tensor is read once per model, and all reads of one tensor come before the next tensor's
    assert len(reads) == 3 * len(base)
    names = [name for _, name in reads]
    for k in range(0, len(names), 3):
        assert len(set(names[k : k + 3])) == 1 and {m for m, _ in reads[k : k + 3]} == {str(pa), str(pbb), str(pb)}
    assert len(set(names)) == len(base)
