"""Command line: parses arguments, calls the API, and turns user errors into one line each plus an exit code.

Each subcommand lives in `mergesmith.commands.<name>` with a `register(subparsers)` function; adding a
command means adding a module and its name to COMMANDS.

Exit codes: 0 success, 2 a problem with the input (config, models, options), 3 an evaluation verdict of
"failed merge", 130 interrupted, 141 the reader of the output went away (a closed pipe). Anything else escaping is a bug and shows a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from mergesmith.errors import MergesmithError
from mergesmith.runtime import exit_now, tune_for_streaming

COMMANDS = ("merge", "demo", "check", "methods", "eval", "convert", "export_gguf", "analyze", "report")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    tune_for_streaming()
    try:
        return args.handler(args)
    except MergesmithError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output folder was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read our output left (`mergesmith methods | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush has somewhere to go
        return 141  # 128 + SIGPIPE, as a process the signal ended


def entry() -> None:
    """The `mergesmith` console script: `main`, then a quick exit (see `runtime.exit_now`). A bug's
    exception still leaves through the normal path, with its traceback."""
    exit_now(main())


def build_parser() -> argparse.ArgumentParser:
    from mergesmith import __version__

    parser = argparse.ArgumentParser(prog="mergesmith", description="Merge fine-tuned language models (mergekit-compatible YAML).")
    parser.add_argument("--version", action="version", version=f"mergesmith {__version__}")
    sub = parser.add_subparsers(dest="command")
    for name in COMMANDS:
        importlib.import_module(f"mergesmith.commands.{name}").register(sub)
    return parser


if __name__ == "__main__":
    entry()
