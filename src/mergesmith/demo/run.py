"""The embedded default job: merge the shipped specialists, evaluate every model on every skill, report.

This is what `mergesmith demo` runs, with no download: the whole product on the family that ships in the
package (see `mergesmith.demo`). Each step is the public API a user would call on their own models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from mergesmith.demo import FAMILY_DIR, SPECIALIST_SKILLS, family_paths
from mergesmith.demo.skills import HELDOUT_TEXT, PROBES_DIR

DEFAULT_METHOD = "task_arithmetic"
DEFAULT_PARAMETERS: dict[str, dict[str, Any]] = {
    # Per-model parameters that suit the shipped family for each method the demo offers (see bench/quality.py).
    "task_arithmetic": {"weight": 0.75},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "linear": {"weight": 1.0},
    "model_stock": {},
    "karcher": {},
    "breadcrumbs": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    "sce": {},
    "ram": {},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {},
    "multislerp": {"weight": 1.0},
}
NO_BASE = ("linear", "karcher")


@dataclass
class DemoResult:
    out_dir: Path
    merged: Path
    config: Path
    report: Path
    eval_json: Path
    status: str | None


def demo_config(method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """The merge config of the demo: the three specialists merged onto the shipped base."""
    paths = family_paths()
    params = DEFAULT_PARAMETERS[method]
    config: dict[str, Any] = {"merge_method": method}
    if method not in NO_BASE:
        config["base_model"] = str(paths["base"])
    config["models"] = [{"model": str(paths[s]), **({"parameters": dict(params)} if params else {})} for s in SPECIALIST_SKILLS]
    config["dtype"] = "float32"
    return config


def run_demo(
    out_dir: str | Path = "mergesmith-demo",
    *,
    method: str = DEFAULT_METHOD,
    device: str = "cpu",
    say: Callable[[str], None] = print,
) -> DemoResult:
    from mergesmith.analyze import analyze
    from mergesmith.api import merge
    from mergesmith.eval.probes import load_probes
    from mergesmith.eval.runner import EvalOptions, ModelSpec, evaluate
    from mergesmith.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yml"
    config_path.write_text(yaml.safe_dump(demo_config(method), sort_keys=False), encoding="utf-8")
    say(f"demo family: {FAMILY_DIR}")
    say(f"merging base + {', '.join(SPECIALIST_SKILLS)} specialists with {method} ({config_path})")
    result = merge(config_path, out / "merged", device=device, overwrite=True)
    say(f"merged model: {result.out_path} ({result.tensors_written} tensors, {result.seconds:.1f} s)")

    analysis = analyze(config_path) if method not in NO_BASE else None
    paths = family_paths()
    models = [ModelSpec("base", paths["base"], "base")]
    models += [ModelSpec(skill, paths[skill], "source") for skill in SPECIALIST_SKILLS]
    models.append(ModelSpec(f"merged ({method})", result.out_path, "merged"))
    say("evaluating every model on every skill and on held-out text ...")
    report = evaluate(
        models,
        texts={"heldout": HELDOUT_TEXT.read_text(encoding="utf-8")},
        probes=load_probes(PROBES_DIR),
        options=EvalOptions(device=device, max_tokens=12, batch_size=64),
    )
    say("")
    say(report.render_text())
    eval_json = out / "eval.json"
    report.write_json(eval_json)
    report_path = write_report(out / "report.html", analysis=analysis, eval_result=report.to_dict(), config=config_path,
                               title=f"mergesmith demo: {method}")  # fmt: skip
    say("")
    say(f"report: {report_path}")
    status = report.verdict.status if report.verdict else None
    return DemoResult(out, result.out_path, config_path, report_path, eval_json, status)
