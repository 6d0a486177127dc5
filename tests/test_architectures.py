"""Architectures are inferred from tensor names and config.json, with no per-architecture table.

For each tiny model built with transformers (Llama, Mistral, Qwen2, Gemma2, Phi-3, SmolLM3, GPT-2, GPT-NeoX, Falcon,
BERT, a Mixtral-style MoE, and vision-language LLaVA / Qwen2-VL): a task_arithmetic merge equals its formula
tensor by tensor, and a frankenmerge updates whatever key holds the layer count (top level or text_config,
per-layer lists included); both load in transformers and run a forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import mergesmith
from fixtures import read_state

_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=64)

ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(**_TEXT, num_key_value_heads=1),
    "mistral": lambda: transformers.MistralConfig(**_TEXT, num_key_value_heads=1),
    "qwen2": lambda: transformers.Qwen2Config(**_TEXT, num_key_value_heads=1),
    "gemma2": lambda: transformers.Gemma2Config(**_TEXT, num_key_value_heads=1, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**_TEXT, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "smollm3": lambda: transformers.SmolLM3Config(**_TEXT, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                  no_rope_layers=[1, 0, 1]),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_TEXT),
    "falcon": lambda: transformers.FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2),
    "bert": lambda: transformers.BertConfig(**_TEXT),
    "mixtral": lambda: transformers.MixtralConfig(**_TEXT, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1),
    "llava": lambda: transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**_TEXT, num_key_value_heads=1),
        vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    image_size=16, patch_size=8, projection_dim=16),
        image_token_index=63,
    ),
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config=dict(**_TEXT, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, in_chans=3, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=60, video_token_id=61, vision_start_token_id=62,
    ),
}  # fmt: skip


def model_class(config: transformers.PretrainedConfig) -> type:
    return getattr(transformers, config.architectures[0]) if config.architectures else _auto_class(config)


def _auto_class(config: transformers.PretrainedConfig) -> type:
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText, transformers.AutoModelForMaskedLM):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    return transformers.AutoModel._model_mapping[type(config)]


def build(folder: Path, arch: str, seed: int, base: Path | None = None) -> Path:
    config = ARCHITECTURES[arch]()
    torch.manual_seed(seed)
    model = _auto_class(config)(config)
    if base is not None:  # a fine-tune: the base's weights plus a small delta
        state = model_class(config).from_pretrained(base).state_dict()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name] + 0.02 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def forward(folder: Path) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.from_pretrained(folder)
    model, info = model_class(config).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[3, 5, 7, 9]]))
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(logits).all()
    return model


def layer_count(config: dict) -> int:
    for holder in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in holder:
                return holder[key]
    raise AssertionError("no layer count")


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_merge_and_frankenmerge(arch, tmp_path):
    base = build(tmp_path / "base", arch, seed=0)
    ft = build(tmp_path / "ft", arch, seed=1, base=base)

    cfg = write(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(ft), "parameters": {"weight": 0.5}}]})  # fmt: skip
    mergesmith.merge(cfg, tmp_path / "ta")
    b, f, out = read_state(base), read_state(ft), read_state(tmp_path / "ta")
    assert set(out) == set(b)
    for name, tensor in out.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, b[name] + 0.5 * (f[name] - b[name]), msg=name)
    forward(tmp_path / "ta")

    cfg = write(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(ft), "layer_range": [1, 3]}]}]})  # fmt: skip
    result = mergesmith.merge(cfg, tmp_path / "franken")
    assert result.num_layers == 4
    config = json.loads((tmp_path / "franken" / "config.json").read_text())
    assert layer_count(config) == 4
    for holder in (config, config.get("text_config") or {}):
        for key in ("layer_types", "no_rope_layers"):
            if key in holder:
                assert len(holder[key]) == 4, key
    if arch == "smollm3":  # per-layer lists follow their layers: base 0, 1 then ft 1, 2
        assert config["no_rope_layers"] == [1, 0, 0, 1]
    model = forward(tmp_path / "franken")
    assert model.config.get_text_config().num_hidden_layers == 4
