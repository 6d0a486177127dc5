"""The README.md model card: Hugging Face front matter plus what was merged and how, written offline."""

from __future__ import annotations

from pathlib import Path

import yaml

from mergesmith.config.schema import MergeConfiguration
from mergesmith.io.model_ref import ModelReference


def hub_id(name: str) -> str | None:
    """The Hub id of a model reference when it is one (org/name), else None for local folders."""
    ref = ModelReference.parse(name)
    if ref.path.count("/") == 1 and not ref.path.startswith((".", "/", "~")) and not Path(ref.path).exists():
        return ref.path
    return None


def render_model_card(config: MergeConfiguration, config_yaml: str, extra_sections: list[str] | None = None) -> str:
    models = config.referenced_models()
    base_models = [h for h in (hub_id(m) for m in models) if h]
    front = {"base_model": base_models, "library_name": "transformers", "tags": ["merge", "mergesmith"]}
    if not base_models:
        del front["base_model"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", "# Merged model", ""]
    lines.append(f"This model was made by merging the models below with mergesmith using the `{config.merge_method}` method.")
    lines += ["", "## Models merged", ""]
    base = config.base_model
    for m in models:
        lines.append(f"* {m}" + (" (base)" if m == base else ""))
    lines += ["", "## Configuration", "", "```yaml", config_yaml.strip(), "```", ""]
    for section in extra_sections or []:
        lines += [section.strip(), ""]
    return "\n".join(lines)
