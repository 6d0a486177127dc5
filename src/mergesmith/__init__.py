"""mergesmith: merge the weights of fine-tuned language models, streamed, checked and evaluated."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MergeResult", "merge", "__version__"]

if TYPE_CHECKING:
    from mergesmith.api import MergeResult, merge


def __getattr__(name: str) -> Any:
    # Imported lazily: `mergesmith --version` and `mergesmith methods` should not pay for importing torch's
    # whole merge stack up front.
    if name in ("merge", "MergeResult"):
        from mergesmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'mergesmith' has no attribute {name!r}")
