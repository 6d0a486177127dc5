"""What GGUF and Hugging Face call the same model: tensor names, the Q/K row order, and config ↔ metadata.

Shared by `gguf_reader` (GGUF → HF names and config.json) and `gguf_writer` (HF folder → GGUF), so the two
directions are each other's inverse by construction. Covered: the llama family (Llama, Mistral: GGUF arch
`llama`, whose Q and K rows llama.cpp permutes for its rotary layout) and Qwen2 (arch `qwen2`, q/k/v biases,
no permutation). Adding an architecture is one `GGUFArch` entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergesmith.errors import NotYetSupportedError


@dataclass(frozen=True)
class GGUFArch:
    gguf_name: str  # general.architecture
    hf_architecture: str  # config.json "architectures"[0] written when reading a GGUF
    model_type: str
    hf_architectures: tuple[str, ...]  # HF classes exported under this GGUF arch
    permute_qk: bool
    attention_bias: bool = False


ARCHES = (
    GGUFArch("llama", "LlamaForCausalLM", "llama", ("LlamaForCausalLM", "MistralForCausalLM"), permute_qk=True),
    GGUFArch("qwen2", "Qwen2ForCausalLM", "qwen2", ("Qwen2ForCausalLM",), permute_qk=False, attention_bias=True),
)


def arch_for_gguf(name: str) -> GGUFArch:
    for arch in ARCHES:
        if arch.gguf_name == name:
            return arch
    known = ", ".join(a.gguf_name for a in ARCHES)
    raise NotYetSupportedError(f"GGUF architecture '{name}' is not supported yet (supported: {known})")


def arch_for_hf(config: dict[str, Any]) -> GGUFArch:
    names = config.get("architectures") or []
    for arch in ARCHES:
        if any(n in arch.hf_architectures for n in names):
            return arch
    known = ", ".join(n for a in ARCHES for n in a.hf_architectures)
    raise NotYetSupportedError(f"GGUF export of {', '.join(names) or 'this model'} is not supported yet (supported: {known})")


# -- tensor names ------------------------------------------------------------------------------------------

_TOP_LEVEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_LEVEL_BACK = {v: k for k, v in _TOP_LEVEL.items()}
_PER_LAYER_BACK = {v: k for k, v in _PER_LAYER.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_to_gguf_name(name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor, or None when GGUF has no place for it."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _HF_LAYER.match(name)
    if match and match[2] in _PER_LAYER:
        return f"blk.{match[1]}.{_PER_LAYER[match[2]]}"
    return None


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None (e.g. `rope_freqs.weight`, which HF computes)."""
    if name in _TOP_LEVEL_BACK:
        return _TOP_LEVEL_BACK[name]
    match = _GGUF_LAYER.match(name)
    if match and match[2] in _PER_LAYER_BACK:
        return f"model.layers.{match[1]}.{_PER_LAYER_BACK[match[2]]}"
    return None


# -- llama.cpp's Q/K row permutation -----------------------------------------------------------------------
#
# convert_hf_to_gguf.py stores q_proj/k_proj rows of each head as (2, head_dim/2) → (head_dim/2, 2): HF rotates
# the two halves of a head, GGML rotates neighbouring pairs. Rows move within their head only.


def qk_heads(hf_name: str, config: dict[str, Any]) -> int | None:
    """How many heads a tensor's rows are grouped in when it is Q or K (weights or biases), else None."""
    if ".self_attn.q_proj." in hf_name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def gguf_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """`order[j]` = the HF row stored at GGUF row j (so gguf = hf[order] and hf[r] = gguf[argsort(order)[r]])."""
    if n_rows % (2 * n_heads):
        raise ValueError(f"{n_rows} rows cannot be split into {n_heads} heads of rotary pairs")
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, 2, half).swapaxes(1, 2).reshape(-1)


def hf_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """`order[r]` = the GGUF row holding HF row r."""
    return np.argsort(gguf_row_order(n_rows, n_heads))


# -- config.json ↔ GGUF metadata ---------------------------------------------------------------------------


def config_from_metadata(arch: GGUFArch, meta: dict[str, Any], *, vocab_size: int, tied: bool, torch_dtype: str) -> dict[str, Any]:
    """A Hugging Face config.json for a GGUF file's `<arch>.*` metadata."""
    p = arch.gguf_name + "."
    hidden = int(meta[p + "embedding_length"])
    heads = int(meta[p + "attention.head_count"])
    kv_heads = int(meta.get(p + "attention.head_count_kv", heads))
    head_dim = int(meta.get(p + "attention.key_length", meta.get(p + "rope.dimension_count", hidden // heads)))
    config: dict[str, Any] = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta[p + "feed_forward_length"]),
        "num_hidden_layers": int(meta[p + "block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "rms_norm_eps": _f32(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta.get(p + "rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": torch_dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch.model_type == "llama":
        config["attention_bias"] = False
        config["mlp_bias"] = False
    for key, hf_key in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                        ("tokenizer.ggml.padding_token_id", "pad_token_id")):  # fmt: skip
        if key in meta:
            config[hf_key] = int(meta[key])
    scaling = meta.get(p + "rope.scaling.type")
    if scaling == "linear" and p + "rope.scaling.factor" in meta:
        config["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": _f32(meta[p + "rope.scaling.factor"])}
    return config


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.999999747378752e-06 → 1e-05)."""
    return float(str(np.float32(value)))


def metadata_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `<arch>.*` metadata keys for a Hugging Face config.json (values as Python numbers)."""
    arch = arch_for_hf(config)
    p = arch.gguf_name + "."
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    meta: dict[str, Any] = {
        p + "context_length": int(config.get("max_position_embeddings", 2048)),
        p + "embedding_length": hidden,
        p + "block_count": int(config["num_hidden_layers"]),
        p + "feed_forward_length": int(config["intermediate_size"]),
        p + "attention.head_count": heads,
        p + "attention.head_count_kv": int(config.get("num_key_value_heads") or heads),
        p + "attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        p + "rope.freq_base": float(_rope_theta(config)),
        p + "rope.dimension_count": head_dim,
        p + "vocab_size": int(config["vocab_size"]),
    }
    if head_dim != hidden // heads:
        meta[p + "attention.key_length"] = head_dim
        meta[p + "attention.value_length"] = head_dim
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        meta[p + "rope.scaling.type"] = "linear"
        meta[p + "rope.scaling.factor"] = float(scaling["factor"])
    elif kind not in (None, "default"):
        raise NotYetSupportedError(f"GGUF export: rope_scaling type '{kind}' is not supported yet")
    return meta


def _rope_theta(config: dict[str, Any]) -> float:
    if "rope_theta" in config:
        return config["rope_theta"]
    params = config.get("rope_parameters") or {}  # transformers 5 spelling
    return params.get("rope_theta", 10000.0)
