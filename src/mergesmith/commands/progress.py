"""Terminal output of the merge command: the progress bar and the dry-run plan summary."""

from __future__ import annotations

import sys

from tqdm import tqdm

from mergesmith.plan.planner import MergePlan


class ProgressBar:
    """Bytes written with an ETA, and tensors done, on stderr; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._tensors_total = 0
        self._names: set[str] = set()

    def start(self, total_bytes: int, tensors: int) -> None:
        if self.enabled:
            self._tensors_total = tensors
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merging", file=sys.stderr, dynamic_ncols=True)

    def update(self, nbytes: int, name: str) -> None:
        if self._bar is not None:
            self._names.add(name)
            self._bar.set_postfix_str(f"{len(self._names)}/{self._tensors_total} tensors", refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def describe_plan(plan: MergePlan, shard_size: str) -> str:
    lines = [
        f"merge_method: {plan.method.name}",
        "models:",
        *[f"  - {m.name} ({m.folder})" for m in plan.models],
        f"output: {len(plan.tasks)} tensors, {plan.output_bytes / 1e9:.3f} GB, {plan.num_layers} layers, shards of at most {shard_size}",
        f"input read: {plan.input_bytes / 1e9:.3f} GB",
        "nothing written (--dry-run)",
    ]
    return "\n".join(lines)
