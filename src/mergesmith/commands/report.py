"""`mergesmith report`: one self-contained HTML file from an analysis JSON, an eval JSON and/or a config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report (config, sources, analysis plots, evaluation)",
        description="Write one self-contained HTML file (inline images, no external assets) from the outputs of "
        "`mergesmith analyze --json` and `mergesmith eval --json` and/or a merge config.",
    )
    p.add_argument("--analysis", metavar="ANALYSIS.json", help="output of `mergesmith analyze --json`")
    p.add_argument("--eval", dest="eval_json", metavar="EVAL.json", help="output of `mergesmith eval --json`")
    p.add_argument("--config", metavar="CONFIG.yml", help="the merge config (shown, and its models inventoried)")
    p.add_argument("--title", default="mergesmith report", help="the page title")
    p.add_argument("-o", "--output", required=True, metavar="OUT.html", help="where to write the report")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.errors import ConfigError, InputError
    from mergesmith.report import write_report

    if not (args.analysis or args.eval_json or args.config):
        raise ConfigError("report: give at least one of --analysis, --eval, --config")
    analysis = _read_json(args.analysis, "--analysis") if args.analysis else None
    eval_result = _read_json(args.eval_json, "--eval") if args.eval_json else None
    if analysis is not None and not (isinstance(analysis, dict) and "overall" in analysis and "layers" in analysis):
        raise InputError(f"--analysis {args.analysis}: not an analysis (write one with `mergesmith analyze --json`)")
    if eval_result is not None and not (isinstance(eval_result, dict) and isinstance(eval_result.get("models"), list)):
        raise InputError(f"--eval {args.eval_json}: not an evaluation (write one with `mergesmith eval --json`)")
    if args.config and not Path(args.config).is_file():
        raise InputError(f"--config {args.config}: file not found")
    write_report(args.output, analysis=analysis, eval_result=eval_result, config=args.config, title=args.title)
    print(f"report written to {args.output}")
    return 0


def _read_json(path: str, flag: str):
    from mergesmith.errors import InputError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag} {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
