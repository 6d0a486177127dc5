"""Cheap checks before merging: an inventory of the input models and their compatibility.

Everything here reads only config.json, safetensors headers (or index) and tokenizer files, never tensor
data, so `mergesmith check` is instant even on 70B models and `merge` fails before reading a byte.
"""

from mergesmith.validate.compatibility import check_compatibility, config_differences
from mergesmith.validate.inventory import ModelInventory, describe_models, format_inventory

__all__ = ["ModelInventory", "check_compatibility", "config_differences", "describe_models", "format_inventory"]
