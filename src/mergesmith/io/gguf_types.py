"""GGUF weight types mergesmith writes; a module of its own so the CLI can list them without importing torch."""

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
