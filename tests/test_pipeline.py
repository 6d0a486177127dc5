"""The streaming executor: row chunks, read-ahead and vocab trimming give the same tensors as one-shot merging."""

from __future__ import annotations

import torch
import transformers

from fixtures import read_state
from mergesmith.api import prepare
from mergesmith.execute.pipeline import ExecutionOptions, execute_plan, work_units
from mergesmith.io.shard_writer import ShardWriter


def _run(config, folder, options):
    plan = prepare(config)
    folder.mkdir()
    writer = ShardWriter(folder, [t.output for t in plan.tasks], 10**9)
    try:
        stats = execute_plan(plan, writer, options)
    finally:
        writer.close()
    return plan, stats, read_state(folder)


def test_row_chunks_and_tiny_read_ahead_match_whole_tensors(llama_family, tmp_path):
    f = llama_family
    config = {"merge_method": "linear", "models": [{"model": str(f["math"]), "parameters": {"weight": 0.25}},
                                                   {"model": str(f["code"]), "parameters": {"weight": 0.75}}]}  # fmt: skip
    plan, _, whole = _run(config, tmp_path / "whole", ExecutionOptions())
    chunked_options = ExecutionOptions(chunk_bytes=300, prefetch_bytes=1)
    units = work_units(plan, chunked_options)
    assert len(units) > len(plan.tasks)  # the 64x16 embedding and head really are split
    assert any(u.rows is not None and u.rows[0] > 0 for u in units)
    _, stats, chunked = _run(config, tmp_path / "chunked", chunked_options)
    assert stats.tensors_written == len(plan.tasks)
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def test_different_vocab_sizes_merge_on_common_rows_with_a_warning(tmp_path):
    from fixtures import make_model

    small = make_model(tmp_path / "small", "llama", seed=0)
    config = transformers.LlamaConfig.from_pretrained(small)
    config.vocab_size = 72
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "big")
    merge_config = {"merge_method": "linear", "parameters": {"weight": 1.0},
                    "models": [{"model": str(small)}, {"model": str(tmp_path / "big")}]}  # fmt: skip
    plan, _, out = _run(merge_config, tmp_path / "out", ExecutionOptions(chunk_bytes=512))
    assert any("model.embed_tokens.weight" in w and "64 rows" in w for w in plan.warnings)
    a, b = read_state(small), read_state(tmp_path / "big")
    assert out["model.embed_tokens.weight"].shape == (64, 16)
    torch.testing.assert_close(out["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"][:64]) / 2)
