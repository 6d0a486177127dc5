"""Model references as written in mergekit configs, and where they live on disk.

Forms: a local folder; `org/name` found in the local Hugging Face cache (never downloaded); `name@revision`;
`model+lora_adapter` (parsed; applying the adapter is not implemented yet).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergesmith.errors import InputError, NotYetSupportedError

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelReference:
    path: str
    revision: str | None = None
    lora: str | None = None
    lora_revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelReference":
        model_part, _, lora_part = text.partition("+")
        path, revision = _split_revision(model_part)
        lora, lora_revision = _split_revision(lora_part) if lora_part else (None, None)
        return cls(path=path, revision=revision, lora=lora, lora_revision=lora_revision)

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        if self.lora:
            text += "+" + self.lora + (f"@{self.lora_revision}" if self.lora_revision else "")
        return text


def _split_revision(text: str) -> tuple[str, str | None]:
    # A local path may itself contain '@'; only treat '@' as a revision marker when the full text is not a folder.
    if "@" in text and not Path(text).exists():
        path, _, revision = text.rpartition("@")
        return path, revision or None
    return text, None


def hf_cache_dir() -> Path:
    """The hub cache folder, following huggingface_hub's environment variables."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_model_folder(ref: ModelReference, *, base_dir: Path | None = None) -> Path:
    """Find the folder holding the model's files, offline; raise InputError naming the reference if absent."""
    if ref.lora:
        raise NotYetSupportedError(
            f"model '{ref}': LoRA adapters ('model+adapter') are not supported yet; "
            "merge the adapter into the model first, then reference the merged folder"
        )
    local = Path(ref.path).expanduser()
    if not local.is_absolute() and base_dir is not None and not local.exists() and (base_dir / local).exists():
        local = base_dir / local
    if local.exists():
        if not local.is_dir():
            raise InputError(f"model '{ref}': {local} is not a folder")
        if ref.revision:
            raise InputError(f"model '{ref}': a revision (@{ref.revision}) only applies to Hugging Face cache ids")
        return local
    if ref.path.count("/") == 1 and not ref.path.startswith((".", "/", "~")):
        return _from_hf_cache(ref)
    raise InputError(f"model '{ref}': folder not found")


def _from_hf_cache(ref: ModelReference) -> Path:
    repo_dir = hf_cache_dir() / ("models--" + ref.path.replace("/", "--"))
    if not repo_dir.is_dir():
        raise InputError(
            f"model '{ref}': not a local folder and not in the Hugging Face cache ({hf_cache_dir()}); "
            f"mergesmith never downloads: run `huggingface-cli download {ref.path}` first"
        )
    revision = ref.revision or "main"
    commit = revision if _COMMIT.match(revision) else None
    ref_file = repo_dir / "refs" / revision
    if commit is None and ref_file.is_file():
        commit = ref_file.read_text().strip()
    snapshots = repo_dir / "snapshots"
    if commit and (snapshots / commit).is_dir():
        return snapshots / commit
    available = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
    if ref.revision is None and len(available) == 1:
        return snapshots / available[0]
    raise InputError(
        f"model '{ref}': revision '{revision}' is not in the Hugging Face cache"
        + (f" (cached: {', '.join(available)})" if available else "")
    )
