"""The merge config: mergekit's YAML schema, loaded strictly."""

from mergesmith.config.loader import load_config, parse_config
from mergesmith.config.schema import (
    ConditionalParameter,
    InputModelDefinition,
    InputSliceDefinition,
    MergeConfiguration,
    OutputSliceDefinition,
    ParameterSetting,
)

__all__ = [
    "ConditionalParameter",
    "InputModelDefinition",
    "InputSliceDefinition",
    "MergeConfiguration",
    "OutputSliceDefinition",
    "ParameterSetting",
    "load_config",
    "parse_config",
]
