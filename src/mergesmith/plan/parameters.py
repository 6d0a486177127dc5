"""Resolve a method parameter for one tensor: filters, gradients and precedence, as mergekit defines them.

* A scalar is used as is.
* A list of numbers is a gradient: interpolated piecewise-linearly at t in [0, 1], where t is the layer's
  position within its slice (t = i / (n - 1); 1 for a one-layer slice; 0 for non-layer tensors).
  A list of non-numbers picks the element at int(t * (len - 1)).
* A list of `{filter, value}` entries: the first entry whose filter is absent, '*', or a substring of the
  tensor name applies.
* Precedence, highest first: the slice source's (or model's) own parameters, then the slice's, then the
  top-level `parameters:`. A global parameter skips the first level.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mergesmith.config.schema import ConditionalParameter
from mergesmith.methods.registry import Param

_UNSET = object()


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value a setting takes for `tensor_name` at gradient position `t`; None when no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list) and setting and isinstance(setting[0], ConditionalParameter):
        for entry in setting:
            if entry.filter in (None, "*") or entry.filter in tensor_name:
                return evaluate_setting(entry.value, tensor_name, t)
        return None
    if isinstance(setting, list) and setting:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return interpolate_gradient([float(v) for v in setting], t)
        return setting[int(t * (len(setting) - 1))]
    return None


def interpolate_gradient(points: Sequence[float], t: float) -> float:
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * points[i0] + frac * points[i1]


class MissingParameter(Exception):
    def __init__(self, param: str):
        super().__init__(param)
        self.param = param


def resolve_parameter(param: Param, scopes: Sequence[Mapping[str, Any] | None], tensor_name: str, t: float) -> Any:
    """First non-None value among the scopes (highest precedence first), coerced; the default otherwise."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t)
            if value is not None:
                return param.coerce(value)
    if param.required:
        raise MissingParameter(param.name)
    return param.default
