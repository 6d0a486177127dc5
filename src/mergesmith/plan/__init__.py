"""Planning: from config and headers to one task per output tensor."""

from mergesmith.plan.planner import MergePlan, TensorInput, TensorTask, parse_dtype, plan_merge

__all__ = ["MergePlan", "TensorInput", "TensorTask", "parse_dtype", "plan_merge"]
