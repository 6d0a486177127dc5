"""`mergesmith merge`: run a mergekit-style YAML config."""

from __future__ import annotations

import argparse
import sys

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
    "--unsafe-truncate-embeddings": "mergekit flag; embeddings of different vocab sizes are always merged on their common rows, with a warning",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models as a YAML config says", description="Merge models as a mergekit-style YAML config says.")
    p.add_argument("config", help="mergekit-style YAML config")
    p.add_argument("out_dir", help="output folder (appears only when the merge is complete)")
    p.add_argument("--device", default="cpu", help="where the math runs: cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=False, help="same as --device cuda (mergekit flag)")
    p.add_argument("--out-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB; as in mergekit '1B' means 10^9 bytes (default 5GB)")
    p.add_argument("--dtype", default=None, help="output dtype (float32, float16, bfloat16); overrides out_dtype/dtype of the config")
    p.add_argument("--compute-dtype", default=None, help="dtype of the math (default float32); bfloat16 reproduces mergekit's bf16 arithmetic on bf16 models")
    p.add_argument("--tie-order", default="position", choices=("position", "mergekit"),
                   help="how TIES, Breadcrumbs and SCE choose among entries tied at their threshold: position (default, fast) "
                        "or mergekit (its sort order: bit-equal masks on bf16 task vectors, at mergekit's speed)")  # fmt: skip
    p.add_argument("--mergekit-numerics", action="store_true",
                   help="mergekit's arithmetic, to reproduce its tensors: math in the config's dtype and --tie-order mergekit "
                        "(slower for TIES, Breadcrumbs and SCE)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="validate and plan, print the plan, write nothing")
    p.add_argument("--quiet", "-q", action=argparse.BooleanOptionalAction, default=False, help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder that holds no previous merge")
    p.add_argument("--random-seed", type=int, default=0, help="seed for random methods (DARE, DELLA); same seed, same output")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True, help="copy the tokenizer files (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy tokenizer files")
    p.add_argument("--write-model-card", dest="write_model_card", action="store_true", default=True, help="write README.md (default)")
    p.add_argument("--no-write-model-card", dest="write_model_card", action="store_false", help="do not write README.md")
    p.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False, help="mergekit flag; allow merging different architecture classes whose tensors match (the tensor checks still apply)")
    for flag, why in MERGEKIT_NO_OPS.items():
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=False, help=f"no-op: {why}")
    p.add_argument("--gpu-rich", action="store_true", help="mergekit alias; here the same as --device cuda")
    p.add_argument("-v", dest="verbosity", action="count", default=0, help="no-op: mergekit verbosity flag")
    for flag in ("--lora-merge-cache", "--lora-merge-dtype", "--transformers-cache", "--write-threads"):
        p.add_argument(flag, default=None, help="no-op: mergekit option, accepted for compatibility")
    p.add_argument("-j", "--num-threads", default=None, help="no-op: mergekit option; torch uses every core")
    p.add_argument("--gguf", default=None, metavar="TYPE", choices=("f32", "f16", "bf16", "q8_0"),
                   help="also export the merge to GGUF (f32, f16, bf16 or q8_0), as <out_dir>/<name>.<TYPE>.gguf")  # fmt: skip
    p.add_argument("--gguf-path", default=None, help="where --gguf writes the file instead")
    p.add_argument("--eval", dest="eval_probes", default=None, metavar="PROBES",
                   help="after merging, evaluate the merge against the config's models on these probes (YAML or a folder of <skill>.jsonl), "
                        "add the table to README.md, and exit 3 if the verdict is 'failed merge'")  # fmt: skip
    p.add_argument("--eval-text", action="append", default=[], metavar="FILE|DIR", help="held-out text for --eval's perplexity (repeatable; also allowed without --eval)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.api import merge
    from mergesmith.commands.progress import ProgressBar, describe_plan

    device = "cuda" if (args.cuda or args.gpu_rich) else args.device
    if args.eval_probes or args.eval_text:  # a typo in a probe file should not cost a whole merge: read them first
        from mergesmith.eval import load_probes, load_texts

        load_probes(args.eval_probes) if args.eval_probes else None
        load_texts(args.eval_text) if args.eval_text else None
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
            compute_dtype=args.compute_dtype,
            tie_order=args.tie_order,
            mergekit_numerics=args.mergekit_numerics,
            on_plan=on_plan,
            on_progress=bar.update,
        )
    finally:
        bar.close()
    if not result.dry_run and not args.quiet:
        gb = result.bytes_written / 1e9
        print(f"wrote {result.tensors_written} tensors ({gb:.2f} GB, {result.num_layers} layers) to {result.out_path} in {result.seconds:.1f} s")
    if args.gguf and not result.dry_run:
        from pathlib import Path

        from mergesmith.io.gguf_writer import export_gguf

        out = Path(result.out_path)
        gguf_path = Path(args.gguf_path) if args.gguf_path else out / f"{out.name}.{args.gguf.upper()}.gguf"
        exported = export_gguf(out, gguf_path, args.gguf, overwrite=args.overwrite)
        for warning in exported.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if not args.quiet:
            print(f"wrote {exported.path} ({exported.bytes / 1e9:.2f} GB, {args.gguf})")
    if (args.eval_probes or args.eval_text) and not result.dry_run:
        return _evaluate(args, device, result.out_path)
    return 0


def _evaluate(args: argparse.Namespace, device: str, out_path) -> int:
    """`--eval`: judge the merge against the config's models; the table goes to stdout and README.md."""
    from mergesmith.api import evaluate_merge
    from mergesmith.errors import EXIT_FAILED_MERGE

    def on_model(spec):
        if not args.quiet:
            print(f"evaluating {spec.name} ({spec.role}) ...", file=sys.stderr)

    report = evaluate_merge(args.config, out_path, probes=args.eval_probes, texts=args.eval_text, device=device, on_model=on_model)
    print(report.render_text())
    return EXIT_FAILED_MERGE if report.verdict is not None and report.verdict.status == "failed merge" else 0
