"""Tiny Hugging Face models built in the tests themselves (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
    ),
    "llama_wide": lambda: transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    ),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=64),
}  # fmt: skip


def make_model(folder: Path, arch: str = "llama", seed: int = 0, *, dtype: torch.dtype = torch.float32,
               safe: bool = True, shard_size: str | None = None, base: Path | None = None, delta_scale: float = 0.02) -> Path:
    """Save a tiny random model. With `base`, the weights are the base's plus a small random delta (a fine-tune)."""
    config = TINY_CONFIGS[arch]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if base is not None:
        base_model = transformers.AutoModelForCausalLM.from_pretrained(base)
        state = base_model.state_dict()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name] + delta_scale * torch.randn_like(param))
    model = model.to(dtype)
    kwargs = {}
    if shard_size:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(folder, **kwargs)
    if not safe:  # transformers 5 always writes safetensors; produce the legacy pickle format by hand
        for f in folder.glob("*.safetensors*"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model folder, by name (safetensors only)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state
