"""The Python API: `merge(config, out_dir, **options)`; the CLI is a thin layer over it."""

from __future__ import annotations

import os
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from mergesmith.config.loader import ConfigLike, load_config
from mergesmith.device import resolve_device
from mergesmith.errors import ConfigError
from mergesmith.execute.pipeline import ExecutionOptions, execute_plan
from mergesmith.io.model_card import render_model_card
from mergesmith.io.output_folder import (
    StagingFolder,
    check_output_target,
    copy_generation_config,
    copy_tokenizer_files,
    write_json,
)
from mergesmith.io.shard_writer import ShardWriter
from mergesmith.io.tokenizer_output import resolve_chat_template, tokenizer_donor_name, write_chat_template
from mergesmith.io.source_model import SourceModel
from mergesmith.methods import TIE_ORDERS
from mergesmith.plan.planner import MergePlan, parse_dtype, plan_merge
from mergesmith.tokenizer.output import write_output_tokenizer
from mergesmith.validate.compatibility import check_compatibility


@dataclass
class MergeResult:
    """What a merge produced. `peak_rss_bytes` is the process's peak resident memory."""

    out_path: Path
    tensors_written: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int | None
    num_layers: int
    shard_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False


def parse_size(text: str | int) -> int:
    """'5GB' / '500M' / '2GiB' / 1000000 → bytes. As in mergekit, a bare 'B' suffix means billions ('1B')."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGTB]?)(I?B)?\s*", text.upper())
    if not match:
        raise ConfigError(f"--out-shard-size: cannot read size '{text}' (examples: 5GB, 500MB, 2GiB)")
    number, unit, suffix = float(match[1]), match[2], match[3] or ""
    base = 1024 if suffix == "IB" else 1000
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "B": 3, "T": 4}
    return max(1, int(number * base ** powers[unit]))


def _mergekit_math_dtype(plan: MergePlan) -> torch.dtype:
    """The dtype mergekit does its arithmetic in: the config's `dtype`, else the one the outputs share (the
    models' stored dtype when nothing overrides it), else float32."""
    declared = parse_dtype(plan.config.dtype, "dtype")
    if declared is not None:
        return declared
    outputs = {t.output.dtype for t in plan.tasks if not t.copy_only}
    return outputs.pop() if len(outputs) == 1 else torch.float32


def prepare(
    config: ConfigLike,
    *,
    random_seed: int = 0,
    dtype: str | None = None,
    allow_crimes: bool = False,
    on_models: Callable[[list[SourceModel]], None] | None = None,
) -> MergePlan:
    """Load and validate a config and plan the merge: every check that needs no tensor data.

    `on_models` sees the opened input models before they are checked (`mergesmith check` lists them even
    when they turn out to be incompatible).
    """
    parsed, label = load_config(config)
    base_dir = Path(label).parent if label != "<config>" else None

    def check_models(models: list[SourceModel]) -> list[str]:
        if on_models is not None:
            on_models(models)
        return check_compatibility(models, allow_crimes=allow_crimes)

    plan = plan_merge(
        parsed, base_dir=base_dir, random_seed=random_seed, out_dtype_override=dtype, allow_crimes=allow_crimes, check_models=check_models
    )
    if plan.vocabulary is not None:  # tokenizer_source / tokenizer: planned with the vocabulary
        plan.tokenizer_donor = plan.vocabulary.donor
    else:
        donor_name = tokenizer_donor_name(parsed, plan.models[plan.donor].name)
        plan.tokenizer_donor = next(i for i, m in enumerate(plan.models) if m.name == donor_name)
    resolve_chat_template(parsed.chat_template, [m.folder for m in plan.models])
    return plan


def merge(
    config: ConfigLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    out_shard_size: str | int = "5GB",
    dtype: str | None = None,
    dry_run: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    random_seed: int = 0,
    overwrite: bool = False,
    allow_crimes: bool = False,
    compute_dtype: str | None = None,
    tie_order: str = "position",
    mergekit_numerics: bool = False,
    on_plan: Callable[[MergePlan], None] | None = None,
    on_progress: Callable[[int, str], None] | None = None,
) -> MergeResult:
    """Merge the models a mergekit-style config names into a Hugging Face folder at `out_dir`.

    Every check runs before any tensor is read; the folder appears only once complete. The math runs in
    `compute_dtype` (float32 by default; "bfloat16" reproduces mergekit's arithmetic on bf16 models, which
    rounds every intermediate). `tie_order` says how TIES, Breadcrumbs and SCE choose among entries tied at
    their selection threshold: "position" (the default, O(n)) or "mergekit" (its sort order, at its cost).
    `mergekit_numerics` sets both as mergekit has them: the config's `dtype` (unless `compute_dtype` is
    given) and mergekit's tie order.
    """
    started = time.perf_counter()
    out_path = Path(out_dir)
    max_shard = parse_size(out_shard_size)
    torch_device = resolve_device(device)
    math_dtype = parse_dtype(compute_dtype, "--compute-dtype") if compute_dtype is not None else None
    if mergekit_numerics:
        tie_order = "mergekit"
    if tie_order not in TIE_ORDERS:
        raise ConfigError(f"--tie-order {tie_order!r}: expected one of {', '.join(TIE_ORDERS)}")
    plan = prepare(config, random_seed=random_seed, dtype=dtype, allow_crimes=allow_crimes)
    if math_dtype is None:
        math_dtype = _mergekit_math_dtype(plan) if mergekit_numerics else torch.float32
    check_output_target(out_path, overwrite)
    if on_plan is not None:
        on_plan(plan)
    if dry_run:
        return MergeResult(out_path, len(plan.tasks), plan.output_bytes, time.perf_counter() - started, _peak_rss(), plan.num_layers, warnings=plan.warnings, dry_run=True)

    staging = StagingFolder(out_path)
    try:
        writer = ShardWriter(staging.path, [t.output for t in plan.tasks], max_shard, metadata={"merged_with": "mergesmith"})
        try:
            stats = execute_plan(plan, writer, ExecutionOptions(device=torch_device, compute_dtype=math_dtype, tie_order=tie_order), on_progress)
        finally:
            writer.close()
        writer.write_index()
        _write_metadata(plan, staging.path, copy_tokenizer, write_model_card)
        final = staging.commit()
    except BaseException:
        staging.discard()
        raise
    return MergeResult(
        final,
        stats.tensors_written,
        stats.bytes_written,
        time.perf_counter() - started,
        _peak_rss(),
        plan.num_layers,
        shard_files=list(writer.file_names),
        warnings=plan.warnings,
    )


def _write_metadata(plan: MergePlan, folder: Path, copy_tokenizer: bool, write_model_card: bool) -> None:
    write_json(folder / "config.json", plan.out_config)
    donor = plan.models[plan.tokenizer_donor if plan.tokenizer_donor is not None else plan.donor]
    copy_generation_config(donor.folder, folder)
    if copy_tokenizer:
        copy_tokenizer_files(donor.folder, folder)
        if plan.vocabulary is not None:
            write_output_tokenizer(plan.vocabulary, folder)
        template = resolve_chat_template(plan.config.chat_template, [m.folder for m in plan.models])
        if template:
            write_chat_template(folder, template)
    config_yaml = yaml.safe_dump(plan.config.to_yaml_dict(), sort_keys=False)
    (folder / "mergekit_config.yml").write_text(config_yaml, encoding="utf-8")
    if write_model_card:
        (folder / "README.md").write_text(render_model_card(plan.config, config_yaml), encoding="utf-8")


def _peak_rss() -> int | None:
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (AttributeError, ValueError):
        return None


def evaluate_merge(
    config: ConfigLike,
    out_dir: str | os.PathLike,
    *,
    probes: str | os.PathLike | None = None,
    texts: list[str | os.PathLike] | tuple = (),
    device: str = "cpu",
    max_tokens: int = 16,
    on_model: Callable | None = None,
):
    """Evaluate a finished merge against the config's models (`mergesmith merge --eval`); returns an EvalReport.

    The merged folder is judged against the config's models (base_model as "base", the others as sources)
    and the Markdown table goes into the folder's README.md as an "## Evaluation" section (replacing an
    earlier one), when the folder has a model card.
    """
    from mergesmith.eval import EvalOptions, ModelSpec, evaluate, load_probes, load_texts
    from mergesmith.io.model_ref import ModelReference, resolve_model_folder

    parsed, label = load_config(config)
    base_dir = Path(label).parent if label != "<config>" else None
    out_path = Path(out_dir)
    specs = [
        ModelSpec(name, resolve_model_folder(ModelReference.parse(name), base_dir=base_dir), "base" if name == parsed.base_model else "source")
        for name in parsed.referenced_models()
    ]
    specs.sort(key=lambda s: s.role == "base")  # table order: sources, base, merged (stable otherwise)
    specs.append(ModelSpec(out_path.name or str(out_path), out_path, "merged"))
    report = evaluate(
        specs,
        texts=load_texts(list(texts)) if texts else None,
        probes=load_probes(probes) if probes else None,
        options=EvalOptions(device=device, max_tokens=max_tokens),
        on_model=on_model,
    )
    card = out_path / "README.md"
    if card.is_file():
        card.write_text(_with_section(card.read_text(encoding="utf-8"), report.render_markdown("## Evaluation")), encoding="utf-8")
    return report


def _with_section(card: str, section: str) -> str:
    """`card` with `section` (starting with its "## " heading) replacing the section of that heading, or appended."""
    heading = section.splitlines()[0]
    lines = card.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip("\n") + "\n"
    return card.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
