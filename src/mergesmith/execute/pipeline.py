"""Run a plan as a bounded pipeline: read ahead, compute, write behind.

Reader threads fetch the inputs of upcoming tasks while the current one is computed, up to a cap on bytes
in flight; a writer thread puts finished tensors at their planned offsets. torch and file reads release the
GIL, so the three stages overlap. Memory is bounded by the cap plus a few tensors, never by model size.
Huge tensors of elementwise methods are processed in row chunks read straight from the files.
"""

from __future__ import annotations

import collections
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from mergesmith.errors import ConfigError
from mergesmith.io.shard_writer import ShardWriter
from mergesmith.methods.registry import MethodInputError
from mergesmith.plan.planner import MergePlan, TensorTask
from mergesmith.tokenizer.embed import merge_vocab_rows


@dataclass(frozen=True)
class ExecutionOptions:
    device: torch.device = torch.device("cpu")
    compute_dtype: torch.dtype = torch.float32
    tie_order: str = "position"  # passed to methods with `breaks_ties` (see methods._sparsify.TIE_ORDERS)
    # Inputs read ahead of the computation (counted in compute-dtype bytes). Reads are a small share of the
    # time (bench/speed.py), so a few tensors' worth keeps the reader busy without growing peak memory.
    prefetch_bytes: int = 384 << 20
    chunk_bytes: int = 24 << 20  # elementwise tensors larger than this (in compute dtype) go in row chunks
    max_pending_writes: int = 4


@dataclass(frozen=True)
class WorkUnit:
    task: TensorTask
    rows: tuple[int, int] | None  # None: the whole tensor (or its first keep_rows rows)

    @property
    def input_bytes(self) -> int:
        shape = self.task.output.shape
        rows = (self.rows[1] - self.rows[0]) if self.rows else (shape[0] if shape else 1)
        per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
        return rows * per_row * 4 * (len(self.task.inputs) + (1 if self.task.base else 0))


@dataclass
class ExecutionStats:
    tensors_written: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    compute_seconds: float = 0.0


ProgressCallback = Callable[[int, str], None]  # (bytes just written, tensor name)


def work_units(plan: MergePlan, options: ExecutionOptions) -> list[WorkUnit]:
    units = []
    itemsize = options.compute_dtype.itemsize
    for task in plan.tasks:
        shape = task.output.shape
        full = math.prod(shape) * itemsize
        chunkable = task.method.elementwise and not task.method.random and not task.copy_only and task.row_maps is None and len(shape) >= 2
        if chunkable and full > options.chunk_bytes and shape[0] > 1:
            rows_per_chunk = max(1, options.chunk_bytes // (full // shape[0]))
            for start in range(0, shape[0], rows_per_chunk):
                units.append(WorkUnit(task, (start, min(shape[0], start + rows_per_chunk))))
        else:
            units.append(WorkUnit(task, None))
    return units


def execute_plan(
    plan: MergePlan,
    writer: ShardWriter,
    options: ExecutionOptions = ExecutionOptions(),
    on_progress: ProgressCallback | None = None,
) -> ExecutionStats:
    stats = ExecutionStats()
    units = work_units(plan, options)
    remaining_rows = {t.output.name: (t.output.shape[0] if t.output.shape else 1) for t in plan.tasks}

    def read_inputs(unit: WorkUnit) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        rows = unit.rows or ((0, unit.task.keep_rows) if unit.task.keep_rows is not None else None)
        tensors = [plan.models[i.model].read(i.name, rows) for i in unit.task.inputs]
        base = plan.models[unit.task.base.model].read(unit.task.base.name, rows) if unit.task.base else None
        return tensors, base

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="read") as readers, ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="write"
    ) as write_pool:
        pending_reads: collections.deque[tuple[WorkUnit, Future]] = collections.deque()
        pending_writes: collections.deque[Future] = collections.deque()
        next_unit = 0
        in_flight = 0

        def fill() -> None:
            nonlocal next_unit, in_flight
            while next_unit < len(units) and (not pending_reads or in_flight + units[next_unit].input_bytes <= options.prefetch_bytes):
                unit = units[next_unit]
                pending_reads.append((unit, readers.submit(read_inputs, unit)))
                in_flight += unit.input_bytes
                next_unit += 1

        fill()
        while pending_reads:
            unit, future = pending_reads.popleft()
            start = time.perf_counter()
            tensors, base = future.result()
            stats.read_seconds += time.perf_counter() - start
            in_flight -= unit.input_bytes
            fill()
            start = time.perf_counter()
            result = compute(unit.task, tensors, base, options)
            stats.compute_seconds += time.perf_counter() - start
            del tensors, base
            while len(pending_writes) >= options.max_pending_writes:
                pending_writes.popleft().result()
            first_row = unit.rows[0] if unit.rows else 0
            name = unit.task.output.name

            def write(result: torch.Tensor = result, first_row: int = first_row, name: str = name) -> None:
                written = writer.write(name, result, first_row)
                stats.bytes_written += written
                remaining_rows[name] -= result.shape[0] if result.dim() else 1
                if remaining_rows[name] <= 0:
                    stats.tensors_written += 1
                if on_progress is not None:
                    on_progress(written, name)

            pending_writes.append(write_pool.submit(write))
        for pending in pending_writes:
            pending.result()
    return stats


def compute(task: TensorTask, tensors: list[torch.Tensor], base: torch.Tensor | None, options: ExecutionOptions) -> torch.Tensor:
    """Apply the task's method on the compute device in the compute dtype; return the result on the CPU in the output dtype."""
    if task.copy_only:
        return tensors[0].to(task.output.dtype)
    device, dtype = options.device, options.compute_dtype
    # Inputs go to a converts_inputs method as read when the compute dtype holds their values exactly (bf16 into
    # float32); a wider input (float32 into a bf16 compute dtype) is rounded first, as mergekit rounds it.
    as_read = task.method.converts_inputs and task.row_maps is None and all(
        t.is_floating_point() and torch.promote_types(t.dtype, dtype) == dtype for t in [*tensors, *([base] if base is not None else [])]
    )
    inputs = [t.to(device=device, dtype=None if as_read else dtype, non_blocking=True) for t in tensors]
    base_in = base.to(device=device, dtype=None if as_read else dtype, non_blocking=True) if base is not None else None
    if task.row_maps is not None:
        result = _compute_vocab_rows(task, inputs, base_in, device)
    else:
        kwargs = {**task.kwargs, "compute_dtype": dtype} if task.method.converts_inputs else task.kwargs
        if task.method.breaks_ties:
            kwargs = {**kwargs, "tie_order": options.tie_order}
        if task.method.rounds_output:
            kwargs = {**kwargs, "output_dtype": task.output.dtype}
        result = _apply_method(task, inputs, base_in, kwargs, device)
    return result.to(dtype=task.output.dtype).to("cpu")


def _apply_method(task: TensorTask, inputs: list[torch.Tensor], base: torch.Tensor | None, task_kwargs: dict, device: torch.device) -> torch.Tensor:
    kwargs = dict(task_kwargs)
    if task.base is not None or task.method.base == "required":
        kwargs["base"] = base
    elif task.method.base == "optional":
        kwargs["base"] = None
    if task.method.random:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(task.seed or 0)
    try:
        return task.method.func(inputs, **kwargs)
    except MethodInputError as exc:
        raise ConfigError(f"merge_method {task.method.name}, tensor {task.output.name}: {exc}") from None


def _compute_vocab_rows(task: TensorTask, inputs: list[torch.Tensor], base: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Rebuild a vocabulary tensor for the output tokenizer: the method runs on the rows that several inputs share.

    Rows a subset of the inputs has are merged by the method over that subset (its per-model parameters
    subset alike). When the method needs a base and the base lacks the token, the mean of the present
    rows stands in for it; a subset too small for the method (slerp with only one side) takes the mean.
    """
    per_model = [p.arg for p in task.method.model_params]
    method = task.method

    def combine(positions: list[int], rows: list[torch.Tensor], base_rows: torch.Tensor | None) -> torch.Tensor:
        too_few = len(rows) < method.min_models or (method.max_models is not None and len(rows) > method.max_models)
        if too_few:
            return torch.stack(rows + ([base_rows] if base_rows is not None else [])).mean(dim=0)
        kwargs = {k: ([v[j] for j in positions] if k in per_model else v) for k, v in task.kwargs.items()}
        if base_rows is None and method.base == "required":
            base_rows = torch.stack(rows).mean(dim=0)
        return _apply_method(task, rows, base_rows, kwargs, device)

    maps = [m.to(device) for m in task.row_maps or ()]
    base_map = task.base_row_map.to(device) if task.base_row_map is not None else None
    return merge_vocab_rows(inputs, base, maps, base_map, task.explicit_rows, combine)
