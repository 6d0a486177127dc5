"""The output folder: written in a hidden sibling folder and renamed into place only when complete.

An interrupted or failed merge therefore never leaves a folder that looks like a finished model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mergesmith.errors import OutputError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
PREVIOUS_MERGE_MARKERS = ("mergekit_config.yml", "mergesmith_config.yml")


def check_output_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a folder that is not a previous merge unless asked to."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output '{out_dir}' exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        if not any((out_dir / m).exists() for m in PREVIOUS_MERGE_MARKERS):
            raise OutputError(f"output folder '{out_dir}' is not empty and holds no previous merge; pass --overwrite to replace it")


class StagingFolder:
    """A hidden folder beside the target; `commit()` moves it into place, `discard()` removes it."""

    def __init__(self, out_dir: Path):
        self.target = out_dir.resolve()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()

    def commit(self) -> Path:
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, old)
        os.rename(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


def copy_generation_config(source: Path, dest: Path) -> bool:
    path = source / "generation_config.json"
    if path.is_file():
        shutil.copy2(path, dest / path.name)
        return True
    return False
