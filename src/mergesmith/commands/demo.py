"""`mergesmith demo`: the main job on the embedded default (the shipped demo family), with no download."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from mergesmith.demo.run import DEFAULT_METHOD, DEFAULT_PARAMETERS

    p = sub.add_parser(
        "demo",
        help="merge the shipped demo specialists, evaluate every skill, write the model and a report",
        description="Merge the tiny demo family that ships with mergesmith (a base and three specialists: addition, "
        "string reversal, letter sorting), evaluate sources and merged model on every skill and on held-out text, "
        "print the table and the verdict, and write the merged model and an HTML report.",
    )
    p.add_argument("--out", default="mergesmith-demo", help="output folder (default ./mergesmith-demo)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(DEFAULT_PARAMETERS), help=f"merge method (default {DEFAULT_METHOD})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.demo.run import run_demo

    result = run_demo(args.out, method=args.method, device=args.device)
    return 3 if result.status == "failed merge" else 0
