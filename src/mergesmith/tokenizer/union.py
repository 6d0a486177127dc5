"""Build the union of several tokenizer.json files: the base tokenizer, extended with every other token.

The base keeps its ids. Each other tokenizer's vocabulary tokens the output lacks are appended to the
output *model* vocabulary when both tokenizers use the same model type (BPE, WordLevel, WordPiece), with
the other's BPE merges appended after the base's (lower priority), so that words the other tokenizer
spells with its own tokens still encode to them; with a different model type (or Unigram, whose ids are
list positions) they become added tokens, as in mergekit. Added (special) tokens are united by content.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from mergesmith.tokenizer.files import vocabulary_of

_EXTENSIBLE_MODELS = ("BPE", "WordLevel", "WordPiece")


def _merge_key(merge: Any) -> tuple[str, ...]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)


def _new_added_token(content: str, token_id: int, like: dict[str, Any] | None = None) -> dict[str, Any]:
    entry = {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
    if like:
        entry.update({k: v for k, v in like.items() if k not in ("id", "content")})
    return entry


def union_tokenizer_json(base: dict[str, Any], others: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    model = out["model"]
    vocab = vocabulary_of(out)
    next_id = max(vocab.values(), default=-1) + 1
    merges = model.get("merges") if model.get("type") == "BPE" else None
    known_merges = {_merge_key(m) for m in merges} if merges is not None else set()
    for other in others:
        other_model = other.get("model") or {}
        other_vocab = other_model.get("vocab")
        same_kind = other_model.get("type") == model.get("type") in _EXTENSIBLE_MODELS and isinstance(other_vocab, dict)
        ordered = sorted(other_vocab.items(), key=lambda kv: kv[1]) if isinstance(other_vocab, dict) else [(e[0], i) for i, e in enumerate(other_vocab or [])]
        for token, _ in ordered:
            if token in vocab:
                continue
            vocab[token] = next_id
            if same_kind:
                model["vocab"][token] = next_id
            else:
                out.setdefault("added_tokens", []).append(_new_added_token(token, next_id))
            next_id += 1
        if same_kind and merges is not None:
            for merge in other_model.get("merges") or []:
                key = _merge_key(merge)
                if key not in known_merges:
                    known_merges.add(key)
                    merges.append(merge)
        for added in other.get("added_tokens") or []:
            content = added["content"]
            if content in vocab:
                continue
            vocab[content] = next_id
            out.setdefault("added_tokens", []).append(_new_added_token(content, next_id, added))
            next_id += 1
    return out


def with_added_tokens(tokenizer_json: dict[str, Any], tokens: Sequence[str]) -> dict[str, Any]:
    """A copy with `tokens` (those it lacks) appended as added tokens, as `tokenizer: tokens:` asks."""
    vocab = vocabulary_of(tokenizer_json)
    missing = [t for t in tokens if t not in vocab]
    if not missing:
        return tokenizer_json
    out = copy.deepcopy(tokenizer_json)
    next_id = max(vocab.values(), default=-1) + 1
    for i, token in enumerate(missing):
        out.setdefault("added_tokens", []).append(_new_added_token(token, next_id + i))
    return out
