"""The compute of the SVD methods (tsv, iso_c, iso_cts) on a whole model, and the floor under it (not a test).

    PYTHONPATH=src python bench/svd_cost.py --size 1B [--methods tsv,iso_c,iso_cts] [--linear-seconds 4.30]

A whole 1B tsv merge runs for many minutes, so instead of timing merges this times each method once per
distinct matrix shape of the bench's model family (`speed.py`'s generated base and two fine-tunes, in
memory, no I/O) and multiplies by how many matrices have that shape. Tensors that are not matrices (the
norms) are left out: they cost microseconds.

The floor column is one float32 Gram product AᵀA of one task vector per matrix (A's smaller side squared):
every exact method that needs a matrix's singular values or vectors does at least this much arithmetic, and
a matrix product is the fastest thing a CPU does per operation. With `--linear-seconds` (a whole linear
merge's wall time from `speed.py`, same machine) the totals are also given as multiples of it.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import SIZES, make_family_tensor, tensor_shapes  # noqa: E402

from mergesmith.methods import get_method  # noqa: E402


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gram_floor(delta: torch.Tensor) -> None:
    tall = delta if delta.shape[0] >= delta.shape[1] else delta.T
    tall.T @ tall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1B", choices=sorted(SIZES))
    parser.add_argument("--methods", default="tsv,iso_c,iso_cts")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many calls per shape")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--linear-seconds", type=float, default=None, help="a whole linear merge's wall time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]

    counts: dict[tuple[int, ...], list[str]] = collections.defaultdict(list)
    for name, shape in tensor_shapes(SIZES[args.size]):
        if len(shape) == 2:
            counts[shape].append(name)

    columns = ["floor", *methods]
    totals = dict.fromkeys(columns, 0.0)
    print(f"size {args.size}, torch {torch.__version__}, {torch.get_num_threads()} threads; seconds per matrix")
    print("| shape | matrices | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for shape, names in counts.items():
        base, *fine_tunes = make_family_tensor(names[0], shape)
        delta = fine_tunes[0].float() - base.float()
        row = {"floor": best_of(args.repeat, lambda: gram_floor(delta))}
        for method in methods:
            func = get_method(method).func
            row[method] = best_of(args.repeat, lambda: func(fine_tunes, base=base))
        for column in columns:
            totals[column] += row[column] * len(names)
        cells = " | ".join(f"{row[c]:.3f}" for c in columns)
        print(f"| {shape[0]}x{shape[1]} | {len(names)} | {cells} |", flush=True)
    print("| **model** | | " + " | ".join(f"**{totals[c]:.1f}**" for c in columns) + " |")
    if args.linear_seconds:
        ratios = " | ".join(f"{totals[c] / args.linear_seconds:.1f}x" for c in columns)
        print(f"| × linear ({args.linear_seconds:.2f} s) | | {ratios} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
