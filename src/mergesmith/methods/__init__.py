"""Merge methods: one module per method, each registering itself with `registry.merge_method`.

Every public module in this package is imported here, so adding a method means adding one file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

from mergesmith.methods._sparsify import TIE_ORDERS  # noqa: E402
from mergesmith.methods.registry import Param, all_methods, get_method, merge_method, method_names  # noqa: E402

__all__ = ["TIE_ORDERS", "Param", "all_methods", "get_method", "merge_method", "method_names"]
