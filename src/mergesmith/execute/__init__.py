"""Execution: the streaming pipeline that turns a plan into written tensors."""

from mergesmith.execute.pipeline import ExecutionOptions, ExecutionStats, execute_plan

__all__ = ["ExecutionOptions", "ExecutionStats", "execute_plan"]
