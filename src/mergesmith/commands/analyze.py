"""`mergesmith analyze`: task-vector statistics of a model family and a recommended merge (see docs/analyze.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="measure the task vectors of a family and recommend a merge",
        description="Stream the task vectors (fine-tune − base) tensor by tensor and report norms, cosine similarity, "
        "sign conflicts and overlap of the top-k entries, effective rank, mass fraction and the embeddings' share, "
        "per layer and overall; then recommend a merge method with its parameters.",
    )
    p.add_argument("config", nargs="?", help="a mergekit-style config naming the models (and base_model)")
    p.add_argument("--base", default=None, help="the base model (folder or cached hub id), instead of a config")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL", help="the fine-tuned models, instead of a config")
    p.add_argument("--top-k", type=float, default=0.1, help="fraction of each tensor's largest entries used for sign conflicts and overlap (default 0.1)")
    p.add_argument("--no-rank", dest="rank", action="store_false", help="skip the effective rank (the slowest statistic on big models)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT.json", help="write the full analysis as JSON")
    p.add_argument("--emit-config", default=None, metavar="OUT.yml", help="write the recommended merge as a config for `mergesmith merge`")
    p.add_argument("--report", default=None, metavar="OUT.html", help="write a self-contained HTML report")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import yaml
    from tqdm import tqdm

    from mergesmith.analyze import analyze, emit_config
    from mergesmith.errors import ConfigError

    if args.config is None and not args.models:
        raise ConfigError("analyze: give a config file, or --models A B ... (with --base BASE for task vectors)")
    bar = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc="analyzing", file=sys.stderr, dynamic_ncols=True)
        bar.update(1)

    try:
        result = analyze(args.config, models=args.models, base=args.base, top_k=args.top_k, rank=args.rank, on_progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(format_summary(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"analysis written to {args.json_out}")
    if args.emit_config:
        text = "# recommended by `mergesmith analyze` (rule: {rule})\n".format(rule=result["recommendation"]["rule"])
        text += yaml.safe_dump(emit_config(result), sort_keys=False, allow_unicode=True)
        Path(args.emit_config).write_text(text, encoding="utf-8")
        print(f"config written to {args.emit_config}")
    if args.report:
        from mergesmith.report import write_report

        write_report(args.report, analysis=result, config=args.config)
        print(f"report written to {args.report}")
    return 0


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def format_summary(result: dict) -> str:
    from mergesmith.analyze.recommend import mean_pairwise

    names = [m["name"] for m in result["models"]]
    lines = []
    base = result["base"]
    lines.append(f"base: {base['name'] if base else '(none: deviations from the models mean)'}")
    for i, name in enumerate(names):
        lines.append(f"model {i}: {name}")
    lines.append("")
    header = f"{'layer':<12}" + "".join(f"{'norm ' + str(i):>10}" for i in range(len(names)))
    header += f"{'cos':>8}{'conflict':>10}{'jaccard':>9}{'erank':>8}{'mass':>8}"
    lines.append(header)
    rows = result["layers"] + [dict(result["overall"], name="overall")]
    for row in rows:
        erank = [r for r in row["normalized_effective_rank"] if r is not None]
        line = f"{row['name']:<12}" + "".join(f"{v:>10.4g}" for v in row["norm"])
        line += f"{_f(mean_pairwise(row['cosine'])):>8}{_f(row['conflict_rate']):>10}{_f(mean_pairwise(row['jaccard'])):>9}"
        line += f"{_f(sum(erank) / len(erank) if erank else None, '.2f'):>8}{_f(sum(row['mass_fraction']) / len(names)):>8}"
        lines.append(line)
    lines.append("(cos, jaccard: mean over pairs; conflict: share of overlapping top-k entries with disagreeing signs; "
                 "erank: effective rank / full rank; mass: share of entries carrying 90 % of the squared mass)")  # fmt: skip
    o = result["overall"]
    lines.append("embeddings' share of each task vector (norm²): " + ", ".join(_f(x) for x in o["embedding_fraction"]))
    for note in result["notes"]:
        lines.append(f"note: {note}")
    rec = result["recommendation"]
    lines.append("")
    params = dict(rec["parameters"])
    lines.append(f"recommendation: {rec['method']}" + (f" {params}" if params else ""))
    for name, mp in zip(names, rec["model_parameters"]):
        if mp:
            lines.append(f"  {name}: {mp}")
    for reason in rec["rationale"]:
        lines.append(f"  - {reason}")
    for note in rec["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
