"""`mergesmith methods`: list the merge methods and their parameters, read from the registry."""

from __future__ import annotations

import argparse

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.add_argument("name", nargs="?", help="show one method in detail")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.errors import ConfigError, did_you_mean
    from mergesmith.methods.registry import all_methods, get_method, method_names

    if args.name:
        spec = get_method(args.name)
        if spec is None:
            raise ConfigError(f"unknown merge_method '{args.name}'{did_you_mean(args.name, method_names())}")
        specs = [spec]
    else:
        specs = all_methods()
    for spec in specs:
        base = {"required": "needs base_model", "optional": "base_model optional", "ignored": "no base_model"}[spec.base]
        print(f"{spec.name}: {spec.summary}  [{spec.describe_model_count()}; {base}]")
        for p in spec.params:
            default = "required" if p.required else f"default {p.default}"
            scope = "per model" if p.per_model else "global"
            print(f"    {p.name} ({p.type.__name__}, {scope}, {default}) {p.doc}")
    return 0
