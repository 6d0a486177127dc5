"""`mergesmith eval`: perplexity and skill probes for sources, base and merged model, and a verdict on the merge.

Exit code 3 (EXIT_FAILED_MERGE) when the verdict is "failed merge", so a script can gate on the merge.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate models: held-out perplexity, skill probes, verdict on a merge",
        description="Evaluate models (Hugging Face folders): perplexity on held-out text and accuracy on skill "
        "probes, one row per model. With --merged, judge the merge against the sources and the base: "
        "'degraded' if its perplexity is above 1.10x the best source's or it scores below the base on a skill, "
        "'failed merge' (exit code 3) above 2x.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="source models (folders or cached Hugging Face ids)")
    p.add_argument("--merged", help="the merged model the verdict is about")
    p.add_argument("--base", help="the base model (skills scoring below it count as lost)")
    p.add_argument("--text", action="append", default=[], metavar="FILE|DIR", help="held-out text file, or a folder of .txt files (repeatable)")
    p.add_argument("--probes", metavar="FILE|DIR", help="probes: YAML (skills: {name: [{prompt, expect, match}]}) or a folder of <skill>.jsonl")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--max-tokens", type=int, default=16, help="most tokens generated per probe answer (default 16)")
    p.add_argument("--window", type=int, default=None, help="perplexity window in tokens (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=int, default=None, help="tokens the window advances by (default half the window)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (probes use 4x this)")
    p.add_argument("--lm-eval", metavar="TASKS", default=None, help="comma-separated lm-evaluation-harness tasks (needs `pip install lm-eval`)")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--markdown", metavar="OUT.md", help="write the table as Markdown")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.errors import EXIT_FAILED_MERGE, ConfigError
    from mergesmith.eval import EvalOptions, evaluate, load_probes, load_texts

    specs = model_specs(args.models, base=args.base, merged=args.merged)
    if args.max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if args.window is not None and args.window < 2:
        raise ConfigError("--window must be at least 2")
    texts = load_texts(args.text) if args.text else {}
    probes = load_probes(args.probes) if args.probes else None
    tasks = tuple(t.strip() for t in (args.lm_eval or "").split(",") if t.strip())
    options = EvalOptions(device=args.device, max_tokens=args.max_tokens, window=args.window, stride=args.stride,
                          batch_size=args.batch_size, lm_eval_tasks=tasks)

    def on_model(spec):
        if not args.quiet:
            print(f"evaluating {spec.name} ({spec.role}) ...", file=sys.stderr)

    report = evaluate(specs, texts=texts, probes=probes, options=options, on_model=on_model)
    print(report.render_text())
    if args.json:
        report.write_json(args.json)
    if args.markdown:
        report.write_markdown(args.markdown)
    return EXIT_FAILED_MERGE if report.verdict is not None and report.verdict.status == "failed merge" else 0


def model_specs(sources: list[str], *, base: str | None, merged: str | None):
    """Roles and folders for the models named on the command line, in table order: sources, base, merged."""
    from mergesmith.errors import ConfigError
    from mergesmith.eval import ModelSpec
    from mergesmith.eval.runner import display_names
    from mergesmith.io.model_ref import ModelReference, resolve_model_folder

    named = [(s, "source") for s in sources if s not in (base, merged)]
    if base:
        named.append((base, "base"))
    if merged:
        if merged == base:
            raise ConfigError("--merged and --base name the same model")
        named.append((merged, "merged"))
    if not named:
        raise ConfigError("no models to evaluate: name source models, --base and/or --merged")
    names = display_names([n for n, _ in named])
    return [ModelSpec(name, resolve_model_folder(ModelReference.parse(ref)), role) for name, (ref, role) in zip(names, named)]
