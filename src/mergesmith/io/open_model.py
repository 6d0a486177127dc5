"""Open whatever a model reference points at: a Hugging Face folder (`SourceModel`) or a GGUF file (`GGUFModel`).

Both offer the same interface (name, folder, config, tensors, read(name, rows)), so the planner and the engine
never ask which one they hold. A reference is GGUF when it names a `.gguf` file, or a folder that holds exactly
one `.gguf` file and no safetensors/.bin weights.
"""

from __future__ import annotations

from pathlib import Path

from mergesmith.io.model_ref import ModelReference, resolve_model_folder
from mergesmith.io.source_model import SourceModel


def open_model(name: str, ref: ModelReference, *, base_dir: Path | None = None):
    """A SourceModel or GGUFModel for the reference `ref`, which the config calls `name`."""
    if not ref.lora and not ref.revision:
        local = Path(ref.path).expanduser()
        if not local.is_absolute() and base_dir is not None and not local.exists() and (base_dir / local).exists():
            local = base_dir / local
        from mergesmith.io.gguf_reader import find_gguf

        gguf_path = find_gguf(local)
        if gguf_path is not None:
            from mergesmith.io.gguf_reader import GGUFModel

            return GGUFModel.open(name, gguf_path)
    return SourceModel.open(name, resolve_model_folder(ref, base_dir=base_dir))
