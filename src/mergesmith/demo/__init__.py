"""The demo model family shipped with mergesmith: a tiny real Llama base, three full fine-tunes and a LoRA adapter.

Regenerate with `python demo/train.py` from a source checkout (see demo/README.md).
"""

from __future__ import annotations

from pathlib import Path

from mergesmith.demo.skills import LORA_SKILL, SKILLS, SPECIALIST_SKILLS, evaluate_skills

FAMILY_DIR = Path(__file__).parent / "family"

__all__ = ["FAMILY_DIR", "LORA_SKILL", "SKILLS", "SPECIALIST_SKILLS", "evaluate_skills", "family_paths"]


def family_paths() -> dict[str, Path]:
    """Folders of the shipped family: {"base", "add", "reverse", "sort", "lora_upper"} -> path.

    The full models are Hugging Face folders (config.json, model.safetensors, tokenizer); the LoRA folder is
    in PEFT format (adapter_config.json, adapter_model.safetensors) and applies to "base".
    """
    names = ("base", *SPECIALIST_SKILLS, f"lora_{LORA_SKILL}")
    return {name: FAMILY_DIR / name for name in names}
