"""Write the output tokenizer: the donor's tokenizer files with tokenizer.json replaced by the planned one."""

from __future__ import annotations

import json
from pathlib import Path

from mergesmith.tokenizer.build import VocabularyPlan

# Files of the slow tokenizers that would contradict a rebuilt tokenizer.json; transformers would prefer some.
STALE_WITH_NEW_VOCABULARY = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "added_tokens.json")


def write_output_tokenizer(vocabulary: VocabularyPlan, folder: Path) -> None:
    """Call after the donor's tokenizer files were copied into `folder`."""
    if vocabulary.tokenizer_json is None:
        return
    for name in STALE_WITH_NEW_VOCABULARY:
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(vocabulary.tokenizer_json, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
