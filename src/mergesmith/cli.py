"""Command line: parses arguments, calls the API, and turns user errors into one line each plus an exit code.

Exit codes: 0 success, 2 a problem with the input (config, models, options), 130 interrupted.
Anything else escaping is a bug and shows a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mergesmith.errors import MergesmithError

MERGEKIT_NO_OPS = {
    "--lazy-unpickle": "mergekit flag; mergesmith always reads tensor by tensor",
    "--low-cpu-memory": "mergekit flag; mergesmith always streams with bounded memory",
    "--trust-remote-code": "mergekit flag; mergesmith reads config.json and weights only and never runs model code",
    "--clone-tensors": "mergekit flag; not needed",
    "--safe-serialization": "mergekit flag; output is always safetensors",
    "--async-write": "mergekit flag; mergesmith always writes behind",
    "--read-to-gpu": "mergekit flag; inputs go to --device as they are computed",
    "--multi-gpu": "mergekit flag; one device is used",
    "--verbose": "mergekit flag; accepted",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except MergesmithError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output folder was written", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesmith", description="Merge fine-tuned language models (mergekit-compatible YAML).")
    from mergesmith import __version__

    parser.add_argument("--version", action="version", version=f"mergesmith {__version__}")
    sub = parser.add_subparsers(dest="command")
    _add_merge(sub)
    _add_methods(sub)
    return parser


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models as a YAML config says", description="Merge models as a mergekit-style YAML config says.")
    p.add_argument("config", help="mergekit-style YAML config")
    p.add_argument("out_dir", help="output folder (appears only when the merge is complete)")
    p.add_argument("--device", default="cpu", help="where the math runs: cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit flag)")
    p.add_argument("--out-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB; as in mergekit '1B' means 10^9 bytes (default 5GB)")
    p.add_argument("--dtype", default=None, help="output dtype (float32, float16, bfloat16); overrides out_dtype/dtype of the config")
    p.add_argument("--dry-run", action="store_true", help="validate and plan, print the plan, write nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder that holds no previous merge")
    p.add_argument("--random-seed", type=int, default=0, help="seed for random methods (DARE, DELLA); same seed, same output")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True, help="copy the tokenizer files (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy tokenizer files")
    p.add_argument("--write-model-card", dest="write_model_card", action="store_true", default=True, help="write README.md (default)")
    p.add_argument("--no-write-model-card", dest="write_model_card", action="store_false", help="do not write README.md")
    p.add_argument("--allow-crimes", action="store_true", help="mergekit flag; allow merging different architecture classes whose tensors match (the tensor checks still apply)")
    for flag, why in MERGEKIT_NO_OPS.items():
        p.add_argument(flag, action="store_true", help=f"no-op: {why}")
    for flag in ("--lora-merge-cache", "--transformers-cache", "--num-threads"):
        p.add_argument(flag, default=None, help="no-op: mergekit option, accepted for compatibility")
    p.set_defaults(handler=run_merge)


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.add_argument("name", nargs="?", help="show one method in detail")
    p.set_defaults(handler=run_methods)


def run_merge(args: argparse.Namespace) -> int:
    from mergesmith.api import merge
    from mergesmith.cli_progress import ProgressBar, describe_plan

    device = "cuda" if args.cuda else args.device
    bar = ProgressBar(enabled=not args.quiet and not args.dry_run)

    def on_plan(plan):
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.dry_run:
            print(describe_plan(plan, args.out_shard_size))
        bar.start(plan.output_bytes, len(plan.tasks))

    try:
        result = merge(
            args.config,
            args.out_dir,
            device=device,
            out_shard_size=args.out_shard_size,
            dtype=args.dtype,
            dry_run=args.dry_run,
            copy_tokenizer=args.copy_tokenizer,
            write_model_card=args.write_model_card,
            random_seed=args.random_seed,
            overwrite=args.overwrite,
            allow_crimes=args.allow_crimes,
            on_plan=on_plan,
            on_progress=bar.update,
        )
    finally:
        bar.close()
    if not result.dry_run and not args.quiet:
        gb = result.bytes_written / 1e9
        print(f"wrote {result.tensors_written} tensors ({gb:.2f} GB, {result.num_layers} layers) to {result.out_path} in {result.seconds:.1f} s")
    return 0


def run_methods(args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
