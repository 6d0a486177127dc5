"""`mergesmith check`: will this config merge? Reads only config.json, headers and tokenizer files.

Prints the inventory of the input models, then either "compatible" with the planned output or one
`error:` line per problem (exit 2). `merge` runs the same checks before reading any tensor.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="check that a config can be merged, without reading tensor data",
        description="List the input models (architecture, sizes, dtype, parameters, tensor fingerprint) and check that the "
        "config can be merged, reading only config.json, safetensors headers and tokenizer files.",
    )
    p.add_argument("config", help="mergekit-style YAML config")
    p.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False, help="accept different architecture classes (or model types) whose tensors match, with a warning")
    p.add_argument("--dtype", default=None, help="output dtype to plan for (as merge --dtype)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.api import prepare
    from mergesmith.validate.inventory import describe_models, format_inventory

    def show(models) -> None:
        print(format_inventory(describe_models(models)))
        sys.stdout.flush()

    plan = prepare(args.config, dtype=args.dtype, allow_crimes=args.allow_crimes, on_models=show)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"compatible: merge_method {plan.method.name}, {len(plan.tasks)} tensors, "
        f"{plan.output_bytes / 1e9:.3f} GB ({plan.output_bytes} bytes), {plan.num_layers} layers"
    )
    return 0
