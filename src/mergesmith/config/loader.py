"""Read a merge config from YAML text, a file or a dict, turning every schema problem into one clear line.

Pydantic's own messages ("Extra inputs are not permitted") do not tell a user what they meant; here each
problem names the file and the key path, and an unknown key comes with the closest valid one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from mergesmith.config.schema import MergeConfiguration
from mergesmith.errors import ConfigError, did_you_mean

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], MergeConfiguration]


def load_config(source: ConfigLike) -> tuple[MergeConfiguration, str]:
    """Return the parsed config and a label for messages (the file name, or '<config>')."""
    if isinstance(source, MergeConfiguration):
        return source, "<config>"
    if isinstance(source, Mapping):
        return parse_config(dict(source), "<config>"), "<config>"
    path = Path(source)
    text_is_yaml = isinstance(source, str) and ("\n" in source or ":" in source) and not path.exists()
    if text_is_yaml:
        return parse_config(_parse_yaml(source, "<config>"), "<config>"), "<config>"
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    label = str(path)
    return parse_config(_parse_yaml(path.read_text(encoding="utf-8"), label), label), label


def _parse_yaml(text: str, label: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}:{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a YAML mapping with 'merge_method', got {type(data).__name__}")
    return data


def parse_config(data: dict, label: str = "<config>") -> MergeConfiguration:
    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as exc:
        problems = _describe_errors(exc, label)
        raise ConfigError(problems) from None


def _describe_errors(exc: ValidationError, label: str) -> list[str]:
    problems: list[str] = []
    seen_paths: set[str] = set()
    for err in exc.errors():
        loc = _user_location(err["loc"])
        path = ".".join(str(part) for part in loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            valid = _valid_keys(loc[:-1])
            problems.append(f"{label}: unknown key '{path}'{did_you_mean(key, valid)}")
        elif kind == "missing":
            problems.append(f"{label}: missing required key '{path}'")
        else:
            # Union types produce one error per alternative; report the location once.
            if path in seen_paths:
                continue
            seen_paths.add(path)
            message = err["msg"].removeprefix("Value error, ")
            where = f"'{path}'" if path else "config"
            problems.append(f"{label}: {where}: {message}")
    return problems


def _user_location(loc: tuple) -> tuple:
    """Drop pydantic's union-branch names (e.g. 'list[float]') from an error location."""
    return tuple(part for part in loc if isinstance(part, int) or not _looks_like_type_name(str(part)))


def _looks_like_type_name(part: str) -> bool:
    return "[" in part or part in {"str", "int", "float", "bool", "ConditionalParameter"} or part.startswith(
        ("function-", "TokenSource", "literal")
    )


def _valid_keys(loc: tuple) -> list[str]:
    """Field names valid at a location, found by walking the schema along the key path."""
    model: Any = MergeConfiguration
    for part in loc:
        if isinstance(part, int):
            continue
        model = _field_model(model, str(part))
        if model is None:
            return []
    return list(model.model_fields) if _is_model(model) else []


def _field_model(model: Any, name: str) -> Any:
    if not _is_model(model) or name not in model.model_fields:
        return None
    return _first_model(model.model_fields[name].annotation)


def _first_model(annotation: Any) -> Any:
    if _is_model(annotation):
        return annotation
    if get_origin(annotation) is dict:
        return None
    for arg in get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)
