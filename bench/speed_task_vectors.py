"""Time the task-vector methods against `linear` on the same in-memory tensors (not a test).

    PYTHONPATH=src python bench/speed_task_vectors.py [--size 4096] [--models 3] [--svd-size 1024] [--threads 2]
    PYTHONPATH=src /work/mkenv/bin/python bench/speed_task_vectors.py --mergekit   # also time mergekit's
    PYTHONPATH=src python bench/speed_task_vectors.py --clock cpu --repeat 7      # CPU time, median of 7

Prints seconds per call (best of --repeat wall-clock, or with `--clock cpu` the median process CPU time,
all threads, which is steadier on a shared, loaded machine) and the ratio to `linear`, plus the process's
peak RSS at the end (run one method per process to attribute it). The SVD methods (tsv, iso_c, iso_cts)
are timed on a smaller --svd-size matrix, with their own linear baseline.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from mergesmith.methods import get_method

CONFIGS = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "dare_linear": {"weight": 0.5, "density": 0.5},
    "breadcrumbs": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
    "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    "della_linear": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    "sce": {"select_topk": 0.5},
}
SVD_METHODS = ("tsv", "iso_c", "iso_cts")


def call_ours(name, base, models):
    spec = get_method(name)
    kwargs = {}
    for p in spec.params:
        if p.name in CONFIGS.get(name, {}):
            v = CONFIGS[name][p.name]
            kwargs[p.arg] = [v] * len(models) if p.per_model else v
    if spec.random:
        kwargs["generator"] = torch.Generator(device=base.device).manual_seed(0)
    if spec.base == "ignored":
        return spec.func(models, **kwargs)
    return spec.func(models, base=base, **kwargs)


def call_mergekit(name, base, models):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    params = {}
    for k, v in CONFIGS.get(name, {}).items():
        params[k] = {i + 1: v for i in range(len(models))} if k in ("weight", "density", "gamma", "epsilon") else v
    if name == "linear":
        group = TensorGroup.from_tensors(models)
        params = {"weight": {i: 0.5 for i in range(len(models))}}
    else:
        group = TensorGroup.from_tensors([base] + models, base_index=0)
    (out,) = get(name)([group], parameters=params)
    return out


CLOCK = "wall"


def best(fn, repeat):
    clock = time.process_time if CLOCK == "cpu" else time.perf_counter
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times) if CLOCK == "cpu" else min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--svd-size", type=int, default=1024)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mergekit", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--methods", default=",".join(list(CONFIGS) + list(SVD_METHODS)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = args.clock
    methods = args.methods.split(",")

    def make(size):
        g = torch.Generator().manual_seed(0)
        base = torch.randn(size, size, generator=g) * 0.02
        models = [base + torch.randn(size, size, generator=g) * 0.002 for _ in range(args.models)]
        return base.to(args.device), [m.to(args.device) for m in models]

    print(f"{args.models} models, float32, {args.device}, {torch.get_num_threads()} threads, {args.clock} clock")
    print(f"{'method':18s} {'shape':>11s} {'ours s':>8s} {'x linear':>9s}" + (f" {'mergekit s':>11s}" if args.mergekit else ""))
    for size, names in ((args.size, [m for m in methods if m not in SVD_METHODS]), (args.svd_size, [m for m in methods if m in SVD_METHODS])):
        if not names:
            continue
        base, models = make(size)
        lin = best(lambda: call_ours("linear", base, models), args.repeat)
        for name in (["linear"] if "linear" not in names else []) + names:
            t = lin if name == "linear" else best(lambda: call_ours(name, base, models), args.repeat)
            line = f"{name:18s} {f'{size}x{size}':>11s} {t:8.3f} {t / lin:9.2f}"
            if args.mergekit and name not in SVD_METHODS:
                line += f" {best(lambda: call_mergekit(name, base, models), 1):11.3f}"
            print(line, flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
