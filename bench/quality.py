"""Which merge method keeps the most of every skill? Every method on the shipped demo family, scored.

A benchmark, not a test. For every method (and a small grid of its main parameters) it merges the three
shipped specialists onto the shipped base, measures exact-match accuracy on each skill's held-out probes,
and prints a Markdown table: each skill's accuracy as a fraction of its specialist's, and their mean.

    python bench/quality.py [--probes 100] [--methods ties,dare_ties] [--out bench/results/quality.md]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import mergesmith
from mergesmith.demo import SPECIALIST_SKILLS, evaluate_skills, family_paths

# Each method's grid of its main parameters; per-model parameters apply to every specialist.
GRID: dict[str, dict[str, list[Any]]] = {
    "linear": {"weight": [1.0]},
    "task_arithmetic": {"weight": [0.5, 0.75, 1.0]},
    "ties": {"weight": [1.0], "density": [0.3, 0.5, 0.8]},
    "dare_ties": {"weight": [1.0], "density": [0.3, 0.5, 0.8]},
    "dare_linear": {"weight": [1.0], "density": [0.5]},
    "breadcrumbs": {"weight": [1.0], "density": [0.8, 0.9], "gamma": [0.01]},
    "breadcrumbs_ties": {"weight": [1.0], "density": [0.9], "gamma": [0.01]},
    "della": {"weight": [1.0], "density": [0.5], "epsilon": [0.1]},
    "della_linear": {"weight": [1.0], "density": [0.5], "epsilon": [0.1]},
    "sce": {"select_topk": [0.5, 1.0]},
    "model_stock": {},
    "karcher": {},
    "multislerp": {"weight": [1.0]},
    "ram": {},
    "ramplus_tl": {},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {},
}
GLOBAL_PARAMS = {"select_topk", "lambda"}
NO_BASE = {"linear", "karcher"}


def configs(method: str, paths: dict[str, Path]) -> list[tuple[str, dict[str, Any]]]:
    grid = GRID[method]
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        chosen = dict(zip(keys, values))
        per_model = {k: v for k, v in chosen.items() if k not in GLOBAL_PARAMS}
        global_params = {k: v for k, v in chosen.items() if k in GLOBAL_PARAMS}
        config: dict[str, Any] = {"merge_method": method, "dtype": "float32"}
        if method not in NO_BASE:
            config["base_model"] = str(paths["base"])
        config["models"] = [{"model": str(paths[s]), **({"parameters": per_model} if per_model else {})} for s in SPECIALIST_SKILLS]
        if global_params:
            config["parameters"] = global_params
        label = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "defaults"
        out.append((label, config))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=100, help="probes per skill (default 100)")
    parser.add_argument("--methods", default="", help="comma-separated subset of: " + ", ".join(GRID))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.md"))
    args = parser.parse_args()

    paths = family_paths()
    methods = args.methods.split(",") if args.methods else list(GRID)
    skills = list(SPECIALIST_SKILLS)
    reference = {name: evaluate_skills(paths[name], n_probes=args.probes) for name in ("base", *skills)}
    specialist = {s: reference[s][s] for s in skills}
    rows = []

    def row(label: str, scores: dict[str, float]) -> list[str]:
        fractions = [scores[s] / specialist[s] if specialist[s] else 0.0 for s in skills]
        return [label, *(f"{scores[s]:.2f} ({f:.0%})" for s, f in zip(skills, fractions)), f"{sum(fractions) / len(fractions):.0%}"]

    rows.append(row("base (no merge)", reference["base"]))
    for s in skills:
        rows.append(row(f"specialist: {s}", reference[s]))
    work = Path(tempfile.mkdtemp(prefix="mergesmith-quality-"))
    try:
        for method in methods:
            for label, config in configs(method, paths):
                start = time.perf_counter()
                out = work / "merged"
                mergesmith.merge(config, out, overwrite=True)
                scores = evaluate_skills(out, n_probes=args.probes)
                rows.append(row(f"{method} ({label})", scores))
                print(f"{method} ({label}): {scores} [{time.perf_counter() - start:.1f} s]", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = ["merge", *skills, "mean kept"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    note = (f"Exact-match accuracy on {args.probes} held-out probes per skill; in parentheses, the fraction of the "
            f"specialist's own accuracy kept. Command: `python bench/quality.py --probes {args.probes}`.")  # fmt: skip
    print(table + "\n\n" + note)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n\n" + note + "\n", encoding="utf-8")
    print(yaml.safe_dump({"written": args.out}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
