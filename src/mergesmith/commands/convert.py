"""`mergesmith convert`: a GGUF file → a Hugging Face model folder (safetensors, config, tokenizer)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a GGUF file to a Hugging Face folder",
        description="Convert a GGUF file (llama family, Qwen2) to a Hugging Face folder: dequantized safetensors, "
        "config.json, generation_config.json and a tokenizer rebuilt from the GGUF vocabulary.",
    )
    p.add_argument("gguf", help="the .gguf file (or a folder holding exactly one)")
    p.add_argument("out_dir", help="output folder (appears only when complete)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="auto (default): F16/BF16/F32 tensors as stored, quantized ones dequantized to float32")  # fmt: skip
    p.add_argument("--out-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.api import parse_size
    from mergesmith.io.gguf_reader import convert_gguf_to_hf

    result = convert_gguf_to_hf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, max_shard_bytes=parse_size(args.out_shard_size))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {result.tensors} tensors ({result.bytes / 1e9:.2f} GB) to {result.path}")
    return 0
