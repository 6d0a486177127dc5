"""Byte-level BPE vocabularies between GGUF metadata (`tokenizer.ggml.*`) and Hugging Face tokenizer files.

GGUF stores the vocabulary as lists (tokens by id, token types, merges) plus the *name* of a pre-tokenizer
(`tokenizer.ggml.pre`) that llama.cpp maps to a regex. Going GGUF → HF we rebuild a `tokenizers` BPE with
that pre-tokenizer; going HF → GGUF we find the name by running the HF pre-tokenizer and each known
candidate on a probe text and taking the one that splits it identically (llama.cpp does the same with a hash
of the tokenization). SentencePiece vocabularies (`tokenizer.ggml.model = llama`) are not handled yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from mergesmith.errors import NotYetSupportedError

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PROBE = "Hello World! It's 2024, isn't it?  12345 67\n\n\tcafé 日本語 don't   x\r\nWE'LL 3.14 ^_^ <|im_start|>"


def _pre_tokenizers() -> dict[str, Callable[[], Any]]:
    from tokenizers import Regex, pre_tokenizers as pt

    def split(regex: str):
        return pt.Sequence([pt.Split(Regex(regex), behavior="isolated", invert=False), pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {  # first match wins when detecting: keep the most specific first
        "smollm": lambda: pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "llama-bpe": lambda: split(_LLAMA3_REGEX),
        "qwen2": lambda: split(_QWEN2_REGEX),
        "gpt2": lambda: pt.ByteLevel(add_prefix_space=False, use_regex=True),
    }


# -- GGUF → Hugging Face -----------------------------------------------------------------------------------


def write_hf_tokenizer(meta: dict[str, Any], folder: Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return warnings."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return ["the GGUF file holds no tokenizer; none was written"]
    if kind != "gpt2":
        return [f"GGUF tokenizer model '{kind}' (SentencePiece) is not converted yet; no tokenizer was written"]
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = str(meta.get("tokenizer.ggml.pre", "gpt2"))
    warnings = []
    candidates = _pre_tokenizers()
    if pre not in candidates:
        warnings.append(f"GGUF pre-tokenizer '{pre}' is not known to mergesmith; using GPT-2's byte-level split")
        pre = "gpt2"
    # UNUSED entries are llama.cpp's padding up to the embedding's rows ([PAD123]); HF leaves those ids without a token
    vocab = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=(pre == "llama-bpe"), fuse_unk=False))
    if pre == "qwen2":
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = candidates[pre]()
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    tk.add_special_tokens(special)
    tk.add_tokens(user)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.save(str(folder / "tokenizer.json"))

    specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)) if v is not None}
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("_context_length", 2048)),
    }
    if meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = str(meta["tokenizer.chat_template"])
    _write_json(folder / "tokenizer_config.json", tok_config)
    _write_json(folder / "special_tokens_map.json", specials)
    return warnings


# -- Hugging Face → GGUF -----------------------------------------------------------------------------------


def gguf_vocab_from_hf(folder: Path, config: dict[str, Any], vocab_size: int) -> tuple[dict[str, Any], list[str]]:
    """`tokenizer.*` metadata for the tokenizer in `folder`, padded to the model's `vocab_size`; and warnings."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise NotYetSupportedError(f"GGUF export needs a tokenizer.json (byte-level BPE) in {folder}; none found")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise NotYetSupportedError(
            f"GGUF export: only byte-level BPE tokenizers are supported yet ({path.name} holds a "
            f"{model.get('type')}{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''} model)"
        )
    tok_config = _read_json(folder / "tokenizer_config.json")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = int(t["id"])
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for content, i in vocab.items():
        tokens[i] = content
        types[i] = NORMAL
    for content, t in added.items():
        types[int(t["id"])] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre, warnings = _detect_pre(path)

    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, hf_key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        content = _content(tok_config.get(hf_key))
        token_id = vocab.get(content) if content is not None else None
        if token_id is None and config.get(f"{hf_key}_id") is not None and key != "unknown":
            cid = config[f"{hf_key}_id"]
            token_id = cid[0] if isinstance(cid, list) else cid
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(token_id)
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        post = json.dumps(data.get("post_processor") or {})
        bos = _content(tok_config.get("bos_token"))
        add_bos = bool(bos) and '"TemplateProcessing"' in post and json.dumps(bos) in post
    meta["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(tok_config.get("add_eos_token", False))
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        meta["tokenizer.chat_template"] = template
    return meta, warnings


def _detect_pre(tokenizer_json: Path) -> tuple[str, list[str]]:
    from tokenizers import Tokenizer

    source = Tokenizer.from_file(str(tokenizer_json)).pre_tokenizer
    if source is None:
        return "default", ["tokenizer.json has no pre-tokenizer; GGUF pre-tokenizer set to 'default'"]
    want = [piece for piece, _ in source.pre_tokenize_str(_PROBE)]
    for name, make in _pre_tokenizers().items():
        if [piece for piece, _ in make().pre_tokenize_str(_PROBE)] == want:
            return name, []
    return "default", ["the tokenizer's pre-tokenizer matches none known to mergesmith; GGUF pre-tokenizer set to 'default'"]


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
