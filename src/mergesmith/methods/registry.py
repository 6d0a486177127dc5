"""The registry of merge methods: names, parameter schemas and the functions that do the math.

A method is a pure function of tensors and plain parameter values. It is registered with `@merge_method`,
which records what the validator, the planner and `mergesmith methods` need to know about it:

* `params`: each `Param` is either *global* (one value per tensor, e.g. `normalize`) or *per-model*
  (one value per input model, e.g. `weight`); per-model values reach the function as a list aligned with
  `tensors`. Each reaches the function as a keyword argument named `Param.arg` (the name, or `lambda_`).
* `base`: how the method treats `base_model`:
    - "required": the base tensor is passed separately as `base=` and is not part of `tensors`;
    - "optional": as "required" when the config names a base, `base=None` otherwise;
    - "ignored": every input, base included if listed, is an ordinary member of `tensors`.
* `min_models` / `max_models`: how many non-base tensors the method accepts.
* `random`: the function takes `generator=` (a seeded `torch.Generator`) for reproducible randomness.
* `check`: optional plan-time check of resolved parameters (a dict keyed like the function's keywords); it
  returns a problem description or None, so a bad value fails before any tensor is read.
* `elementwise`: each output element depends only on the same element of the inputs, so the executor may
  split a huge tensor into row chunks and call the function per chunk.

The function receives float tensors already on the compute device and in the compute dtype, all of the
same shape, and returns one tensor of that shape. It never sees files, YAML or the CLI.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

REQUIRED: Any = object()
"""Default marking a parameter the user must set."""

BasePolicy = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method."""

    name: str
    type: type = float
    default: Any = REQUIRED
    per_model: bool = False
    doc: str = ""
    choices: tuple[str, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def arg(self) -> str:
        """The keyword the function receives: the name, with "_" appended when it is a Python keyword (lambda)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    def coerce(self, value: Any) -> Any:
        """Convert a YAML value to this parameter's type; raises ValueError with a reason."""
        if value is None:
            return None
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            raise ValueError(f"expected true or false, got {value!r}")
        if self.type in (int, float):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"expected a number, got {value!r}") from None
            if self.type is int:
                if number != int(number):
                    raise ValueError(f"expected an integer, got {value!r}")
                return int(number)
            return number
        if self.type is str:
            text = str(value)
            if self.choices and text not in self.choices:
                raise ValueError(f"expected one of {', '.join(self.choices)}, got {value!r}")
            return text
        return value


@dataclass(frozen=True)
class MethodSpec:
    """Everything known about a merge method before any tensor is read."""

    name: str
    func: Callable[..., Any]
    params: tuple[Param, ...] = ()
    base: BasePolicy = "ignored"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    elementwise: bool = False
    # The method takes a `compute_dtype` keyword and input tensors in any float dtype that it holds exactly
    # (bf16 for float32), converting chunk by chunk as it works: the executor hands them over as read, with no
    # full-size float32 copies.
    converts_inputs: bool = False
    # The method selects entries by a threshold and takes a `tie_order` keyword saying how entries tied at it
    # are chosen (`_sparsify.TIE_ORDERS`); the executor passes its option on.
    breaks_ties: bool = False
    # The method takes an `output_dtype` keyword (the dtype the executor stores) and may return its result in
    # it, rounded once from its compute dtype, when writing it directly saves a pass over the output.
    rounds_output: bool = False
    summary: str = ""
    reference: str = ""
    aliases: tuple[str, ...] = field(default=())
    check: Callable[[dict[str, Any]], str | None] | None = None

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def describe_model_count(self) -> str:
        if self.max_models is None:
            return f"{self.min_models} or more models"
        if self.min_models == self.max_models:
            return f"exactly {self.min_models} model" + ("s" if self.min_models != 1 else "")
        return f"{self.min_models} to {self.max_models} models"


class MethodInputError(ValueError):
    """Raised by a method for a problem caused by the user's inputs or parameters, not by a bug."""


_REGISTRY: dict[str, MethodSpec] = {}


def merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    base: BasePolicy = "ignored",
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    elementwise: bool = False,
    converts_inputs: bool = False,
    breaks_ties: bool = False,
    rounds_output: bool = False,
    summary: str = "",
    reference: str = "",
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `func` as the merge method `name` (see the module docstring for the contract)."""

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        register_spec(
            MethodSpec(
                name=name,
                func=func,
                params=tuple(params),
                base=base,
                min_models=min_models,
                max_models=max_models,
                random=random,
                elementwise=elementwise,
                converts_inputs=converts_inputs,
                breaks_ties=breaks_ties,
                rounds_output=rounds_output,
                summary=summary or (func.__doc__ or "").strip().split("\n")[0],
                reference=reference,
                check=check,
            )
        )
        return func

    return register


def register_spec(spec: MethodSpec) -> None:
    """Add a spec; used by `merge_method` and by modules that register variants of one function."""
    if spec.name in _REGISTRY:
        raise RuntimeError(f"merge method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec


def get_method(name: str) -> MethodSpec | None:
    _load_all()
    return _REGISTRY.get(name)


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def all_methods() -> list[MethodSpec]:
    _load_all()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def _load_all() -> None:
    # Importing the package imports every method module, which registers it.
    import mergesmith.methods  # noqa: F401
