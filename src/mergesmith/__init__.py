"""mergesmith: merge the weights of fine-tuned language models, streamed, checked and evaluated."""

__version__ = "0.1.0"

from mergesmith.api import MergeResult, merge  # noqa: E402

__all__ = ["MergeResult", "merge", "__version__"]
