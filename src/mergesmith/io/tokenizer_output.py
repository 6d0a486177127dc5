"""Which model's tokenizer the output gets, and the chat template written with it.

A config with `tokenizer_source` or a `tokenizer:` block gets its tokenizer from the vocabulary plan
(`mergesmith.tokenizer`); `tokenizer_donor_name` answers for the others.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergesmith.config.schema import MergeConfiguration
from mergesmith.errors import ConfigError, did_you_mean

BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


def tokenizer_donor_name(config: MergeConfiguration, default: str) -> str:
    """The model whose tokenizer files are copied: `tokenizer_source` (base or a model), else the config donor."""
    source = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
    if source is None:
        return default
    if source == "union":
        return config.base_model or default
    if source == "base":
        if config.base_model is None:
            raise ConfigError("tokenizer_source: base needs a base_model")
        return config.base_model
    models = config.referenced_models()
    if source not in models:
        raise ConfigError(f"tokenizer_source '{source}' is not one of the merged models{did_you_mean(source, models)}")
    return source


def resolve_chat_template(value: str | None, tokenizer_folders: list[Path]) -> str | None:
    """A literal Jinja template, a built-in name, or 'auto' (the template most inputs share)."""
    if value is None:
        return None
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    if value == "auto":
        found = [t for t in (read_chat_template(f) for f in tokenizer_folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if "{{" in value or "{%" in value:
        return value
    names = list(BUILTIN_CHAT_TEMPLATES) + ["auto"]
    raise ConfigError(f"chat_template '{value}' is neither a built-in ({', '.join(names)}) nor a Jinja template{did_you_mean(value, names)}")


def read_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError:
            return None
        return template if isinstance(template, str) else None
    return None


def write_chat_template(folder: Path, template: str) -> None:
    """Store the template where both older and newer transformers read it."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
