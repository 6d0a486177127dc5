"""`mergesmith export-gguf`: a Hugging Face model folder (e.g. a merge) → one GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import sys

from mergesmith.io.gguf_types import OUT_TYPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-gguf",
        help="export a model folder to a GGUF file",
        description="Export a Hugging Face folder (Llama/Mistral/Qwen2, byte-level BPE tokenizer) to GGUF: weights as "
        "f16, bf16, f32 or q8_0 (1-D tensors stay F32), vocabulary, special tokens and chat template.",
    )
    p.add_argument("model", help="model folder (or a .gguf file to re-quantize)")
    p.add_argument("out", help="output .gguf file (appears only when complete)")
    p.add_argument("--type", dest="out_type", default="f16", choices=OUT_TYPES, help="weight type (default f16)")
    p.add_argument("--name", default=None, help="general.name stored in the file (default: the folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.io.gguf_writer import export_gguf

    result = export_gguf(args.model, args.out, args.out_type, overwrite=args.overwrite, name=args.name)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(result.types.items()))
        print(f"wrote {result.tensors} tensors ({kinds}; {result.bytes / 1e9:.2f} GB) to {result.path}")
    return 0
