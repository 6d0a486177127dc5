"""Read a model folder's vocabulary (token -> id) from its tokenizer files, without loading a tokenizer.

`tokenizer.json` is the source of truth (model vocabulary plus added tokens). Folders with only the slow
files (`vocab.json` + `added_tokens.json`, `vocab.txt`) are read directly; anything else (a sentencepiece
`tokenizer.model` alone) is converted once through transformers' fast tokenizer, from the local folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergesmith.errors import InputError


def load_tokenizer_json(folder: Path, model_name: str) -> dict[str, Any] | None:
    """The folder's tokenizer.json as a dict, converting slow tokenizer files if needed; None without any."""
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"model '{model_name}': {path} is not valid JSON ({exc.msg})") from None
    if not any((folder / f).is_file() for f in ("tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")):
        return None
    try:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
        return json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot read this tokenizer"
        raise InputError(f"model '{model_name}': cannot read the tokenizer in {folder} ({str(exc).splitlines()[0]})") from None


def vocabulary_of(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    """token -> id: the model's vocabulary plus the added tokens (which win on a clash, as in tokenizers)."""
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab")
    out: dict[str, int] = {}
    if isinstance(vocab, dict):
        out.update({str(k): int(v) for k, v in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        out.update({str(entry[0]): i for i, entry in enumerate(vocab)})
    for added in tokenizer_json.get("added_tokens") or []:
        out[str(added["content"])] = int(added["id"])
    return out
