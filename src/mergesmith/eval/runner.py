"""Runs an evaluation: loads each model in turn, measures it, and builds the report with the verdict.

Models are loaded one at a time and released before the next, so evaluating N models needs the memory of
one. Each model is scored with its own tokenizer; a folder without tokenizer files borrows the first other
model's (merged folders normally carry their donor's).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mergesmith.errors import ConfigError, InputError
from mergesmith.eval.perplexity import text_perplexity
from mergesmith.eval.probes import Probe, score_probes
from mergesmith.eval.table import EvalReport
from mergesmith.eval.verdict import ModelScores, judge
from mergesmith.device import resolve_device

ROLES = ("source", "base", "merged")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    folder: Path
    role: str  # "source" | "base" | "merged"


@dataclass(frozen=True)
class EvalOptions:
    device: str = "cpu"
    max_tokens: int = 16
    window: int | None = None
    stride: int | None = None
    batch_size: int = 8
    lm_eval_tasks: tuple[str, ...] = ()


def load_texts(paths: list[str | Path]) -> dict[str, str]:
    """Held-out texts by name (file stem); a folder contributes its *.txt files in name order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise ConfigError(f"--text: {p} holds no .txt files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"--text: {p} not found")
    texts: dict[str, str] = {}
    for f in files:
        name = f.stem if f.stem not in texts else str(f)
        text = f.read_text(encoding="utf-8")
        if not text.strip():
            raise ConfigError(f"--text: {f} is empty")
        texts[name] = text
    return texts


def display_names(folders: list[str]) -> list[str]:
    """Short names for the table: the folder's last part, or the path as given where two would collide."""
    short = [Path(f.rstrip("/")).name or f for f in folders]
    return [s if short.count(s) == 1 else f for s, f in zip(short, folders)]


def evaluate(
    models: list[ModelSpec],
    *,
    texts: dict[str, str] | None = None,
    probes: dict[str, list[Probe]] | None = None,
    options: EvalOptions = EvalOptions(),
    on_model: Callable[[ModelSpec], None] | None = None,
) -> EvalReport:
    """Measure every model and judge the merged one (if any) against the sources and the base."""
    if not texts and not probes and not options.lm_eval_tasks:
        raise ConfigError("nothing to evaluate: give --text FILE, --probes FILE|DIR or --lm-eval TASKS")
    device = resolve_device(options.device)
    fallback_tokenizer = next((m.folder for m in models if _has_tokenizer(m.folder)), None)
    report = EvalReport()
    for spec in models:
        if on_model is not None:
            on_model(spec)
        report.models.append(_evaluate_one(spec, texts or {}, probes or {}, options, device, fallback_tokenizer))
    merged = [m for m in report.models if m.role == "merged"]
    if merged:
        sources = [m for m in report.models if m.role == "source"]
        base = next((m for m in report.models if m.role == "base"), None)
        report.verdict = judge(merged[0], sources, base)
    return report


def _evaluate_one(spec: ModelSpec, texts, probes, options: EvalOptions, device: torch.device, fallback_tokenizer) -> ModelScores:
    model, tokenizer = _load(spec, device, fallback_tokenizer)
    scores = ModelScores(spec.name, str(spec.folder.absolute()), spec.role)
    try:
        for name, text in texts.items():
            result = text_perplexity(model, tokenizer, text, window=options.window, stride=options.stride, batch_size=options.batch_size)
            if result.tokens == 0:
                raise ConfigError(f"--text '{name}': too short to score (it needs at least 2 tokens)")
            scores.perplexity[name] = result.perplexity if math.isfinite(result.nll_sum) else float("inf")
        if probes:
            scores.skills.update(score_probes(model, tokenizer, probes, max_tokens=options.max_tokens, batch_size=max(8, options.batch_size * 4)))
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if options.lm_eval_tasks:
        scores.skills.update(run_lm_eval(spec.folder, options.lm_eval_tasks, device, options.batch_size))
    return scores


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _load(spec: ModelSpec, device: torch.device, fallback_tokenizer: Path | None):
    import transformers

    if not (spec.folder / "config.json").is_file():
        raise InputError(f"model '{spec.name}': {spec.folder} has no config.json")
    tok_folder = spec.folder if _has_tokenizer(spec.folder) else fallback_tokenizer
    if tok_folder is None:
        raise InputError(f"model '{spec.name}': no tokenizer files in {spec.folder} nor in any other model given")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_folder)
    except (OSError, ValueError) as exc:
        raise InputError(f"model '{spec.name}': cannot load the tokenizer from {tok_folder} ({exc})") from None
    # float32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype on a GPU.
    dtype = torch.float32 if device.type == "cpu" else "auto"
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # one "evaluating ..." line per model is enough
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec.folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"model '{spec.name}': cannot load {spec.folder} as a causal LM ({exc})") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


def run_lm_eval(folder: Path, tasks: tuple[str, ...], device: torch.device, batch_size: int) -> dict[str, float]:
    """lm-evaluation-harness tasks, if it is installed (not a dependency); one 'lm:<task>' column each.

    The harness fetches its data sets itself; run it where they are cached or reachable.
    """
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder}", tasks=list(tasks), device=str(device), batch_size=batch_size
    )
    out: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        value = _headline_metric(metrics)
        if value is not None:
            out[f"lm:{task}"] = value
    return out


def _headline_metric(metrics: dict) -> float | None:
    for key in ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match,none"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and "stderr" not in key and key != "alias":
            return float(value)
    return None
