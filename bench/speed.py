"""Speed benchmark: mergesmith (and optionally mergekit) on synthetic Llama-shaped model families.

This is a measuring tool, not a test: nothing here asserts on timings. Run it from the repository root:

    python bench/speed.py --size 0.1B --repeats 1 --mergekit /work/mkenv/bin/mergekit-yaml

For every size it builds (once, cached under bench/cache/) a bf16 base model plus two fine-tunes (or N, with
`--fine-tunes N`: methods that take any number of models then merge all N) whose
weights are base + a low-rank delta + a sparse delta, written as HF folders (config.json, sharded
safetensors, index). For every method it writes a YAML config, runs `mergesmith merge --quiet` (and
mergekit-yaml on the same YAML, alternating which tool goes first across repeats), and records wall time,
child CPU time (user+sys from os.wait4), the child's peak RSS (ru_maxrss: pages of memory-mapped inputs
that the child touched count too) and input GB/s. An "I/O floor" child that only maps every page of the
inputs and writes an output file of the merged size (no math), as the merge reads and writes, gives the lower
bound for each input set.

The table is printed and written to bench/results/speed-<size>.md (speed-<size>-ft<N>.md) along with the machine description and
the command line. See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / "cache"
RESULTS = BENCH / "results"
GENERATOR_VERSION = 1  # bump when the synthetic weights change, so that cached models are rebuilt

# --------------------------------------------------------------------------------------------------
# Synthetic model families
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Llama-style shapes; parameter counts are printed by --list-sizes.
SIZES: dict[str, Shape] = {
    "0.1B": Shape(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=12),
    "0.5B": Shape(hidden=1024, intermediate=2816, layers=32, heads=16, kv_heads=16),
    "1B": Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),  # TinyLlama-1.1B
    # TinyLlama's widths with twice the layers: the same largest tensor as 1B, so peak memory should not move
    "2B": Shape(hidden=2048, intermediate=5632, layers=44, heads=32, kv_heads=4),
    "3B": Shape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8),
    "7B": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
}


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    kv = s.kv_heads * s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "self_attn.q_proj.weight", (s.hidden, s.hidden)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, s.hidden)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
        ]
    out += [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]
    return out


def hf_config(s: Shape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


MODEL_NAMES = ("base", "ft1", "ft2")  # the default family; `--fine-tunes N` adds ft3 ... ftN


def model_names(fine_tunes: int) -> tuple[str, ...]:
    return ("base", *(f"ft{i + 1}" for i in range(fine_tunes)))
RANK = 16  # rank of each fine-tune's low-rank delta
SPARSE_FRACTION = 0.01  # fraction of entries with a larger, sparse update


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def make_family_tensor(name: str, shape: tuple[int, ...], fine_tunes: int = 2) -> list[torch.Tensor]:
    """[base, ft1, ..., ftN] for one tensor, in bf16. Deterministic per tensor name; ft1 and ft2 are the same
    whatever the number of fine-tunes (the later ones are drawn after them)."""
    g = torch.Generator().manual_seed(_seed(GENERATOR_VERSION, name))
    if len(shape) == 1:  # norms: around 1, fine-tunes move them a little
        base = 1.0 + 0.05 * torch.randn(shape, generator=g)
        fts = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(fine_tunes)]
        return [t.to(torch.bfloat16) for t in (base, *fts)]
    rows, cols = shape
    base = torch.randn(shape, generator=g) * 0.02
    # A shared direction (both fine-tunes learned something similar) plus each one's own: sign conflicts
    # and agreements for TIES-like methods, magnitudes for DARE/DELLA/breadcrumbs to prune.
    shared_u = torch.randn(rows, RANK // 2, generator=g)
    shared_v = torch.randn(RANK // 2, cols, generator=g)
    out = [base]
    for _ in range(fine_tunes):
        u = torch.cat([shared_u, torch.randn(rows, RANK // 2, generator=g)], dim=1)
        v = torch.cat([shared_v, torch.randn(RANK // 2, cols, generator=g)], dim=0)
        delta = (u @ v) * (0.002 / math.sqrt(RANK))
        n_sparse = max(1, int(SPARSE_FRACTION * rows * cols))
        idx = torch.randint(0, rows * cols, (n_sparse,), generator=g)
        delta.view(-1).index_add_(0, idx, torch.randn(n_sparse, generator=g) * 0.01)
        delta += torch.randn(shape, generator=g) * 0.0002  # small dense noise
        out.append(base + delta)
    return [t.to(torch.bfloat16) for t in out]


def family_dir(size: str, fine_tunes: int = 2) -> Path:
    suffix = "" if fine_tunes == 2 else f"-ft{fine_tunes}"
    return CACHE / f"llama-{size}-v{GENERATOR_VERSION}{suffix}"


def ensure_family(size: str, log, fine_tunes: int = 2) -> dict[str, Path]:
    """Build (or reuse) the base and fine-tune folders for a size; return name -> folder."""
    root = family_dir(size, fine_tunes)
    names = model_names(fine_tunes)
    folders = {n: root / n for n in names}
    if (root / "COMPLETE").is_file():
        return folders
    shape = SIZES[size]
    specs = tensor_shapes(shape)
    total = sum(math.prod(s) * 2 for _, s in specs)
    # At least 3 shards so that the sharded (indexed) layout is exercised; at most 2 GB each.
    shard_cap = min(2 * 10**9, math.ceil(total / 3))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size_acc = 0
    for name, s in specs:
        nbytes = math.prod(s) * 2
        if shards[-1] and size_acc + nbytes > shard_cap:
            shards.append([])
            size_acc = 0
        shards[-1].append((name, s))
        size_acc += nbytes
    if root.exists():
        shutil.rmtree(root)
    for folder in folders.values():
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(hf_config(shape), indent=2) + "\n")
    log(f"generating {size} family ({total / 1e9:.2f} GB per model, {len(shards)} shards) in {root} ...")
    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        per_model: list[dict[str, torch.Tensor]] = [{} for _ in names]
        for name, s in shard:
            for i, t in enumerate(make_family_tensor(name, s, fine_tunes)):
                per_model[i][name] = t
            weight_map[name] = fname
        for i, model in enumerate(names):
            save_file(per_model[i], str(folders[model] / fname), metadata={"format": "pt"})
        del per_model
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for folder in folders.values():
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "COMPLETE").write_text(f"{time.time()}\n")
    log(f"  generated in {time.perf_counter() - t0:.1f} s")
    return folders


def folder_weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def folder_tensor_inventory(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    inv: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                inv[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return inv


# --------------------------------------------------------------------------------------------------
# Method configs
# --------------------------------------------------------------------------------------------------


FIXED_COUNT = ("slerp", "nuslerp", "nearswap", "arcee_fusion")  # take one or two fine-tunes, whatever the family has


def method_config(method: str, m: dict[str, Path]) -> tuple[dict, list[str]] | None:
    """(mergekit-style YAML as a dict, the model names it reads) over every fine-tune of the family; None for
    a method that takes a fixed number of models when the family has other than two fine-tunes (its time
    would not be comparable with linear's over all of them)."""
    fine_tunes = [n for n in m if n != "base"]
    if method in FIXED_COUNT and len(fine_tunes) != 2:
        return None
    b, f1 = str(m["base"]), str(m["ft1"])
    every = lambda **p: [{"model": str(m[n]), "parameters": dict(p)} if p else {"model": str(m[n])} for n in fine_tunes]  # noqa: E731
    common = {"dtype": "bfloat16"}
    if method == "linear":
        return {"merge_method": "linear", "models": every(weight=0.5), **common}, fine_tunes
    if method == "karcher":
        return {"merge_method": "karcher", "models": every(), **common}, fine_tunes
    if method == "slerp":
        cfg = {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": f1}], "parameters": {"t": 0.5}}
        return {**cfg, **common}, ["base", "ft1"]
    with_base = ["base", *fine_tunes]
    if method == "task_arithmetic":
        return {"merge_method": method, "base_model": b, "models": every(weight=0.5), **common}, with_base
    if method in ("ties", "dare_ties", "dare_linear"):
        return {"merge_method": method, "base_model": b, "models": every(weight=0.5, density=0.5), **common}, with_base
    if method == "breadcrumbs" or method == "breadcrumbs_ties":
        return {"merge_method": method, "base_model": b, "models": every(weight=0.5, density=0.9, gamma=0.01), **common}, with_base
    if method in ("della", "della_linear"):
        cfg = {"merge_method": method, "base_model": b, "models": every(weight=0.5, density=0.5, epsilon=0.1), "parameters": {"lambda": 1.0}}
        return {**cfg, **common}, with_base
    if method == "sce":
        cfg = {"merge_method": "sce", "base_model": b, "models": every(), "parameters": {"select_topk": 0.5}}
        return {**cfg, **common}, with_base
    if method in ("nuslerp", "multislerp"):  # task vectors slerped, given a base
        return {"merge_method": method, "base_model": b, "models": every(weight=0.5), **common}, with_base
    if method in ("model_stock", "ram", "ramplus_tl", "tsv", "iso_c", "iso_cts"):
        return {"merge_method": method, "base_model": b, "models": every(), **common}, with_base
    if method in ("nearswap", "arcee_fusion"):  # exactly one model besides the base
        cfg = {"merge_method": method, "base_model": b, "models": [{"model": f1}]}
        if method == "nearswap":
            cfg["parameters"] = {"t": 0.001}
        return {**cfg, **common}, ["base", "ft1"]
    raise SystemExit(f"no benchmark config for method {method}")


def to_yaml(cfg: dict) -> str:
    # JSON is valid YAML, and avoids needing PyYAML here.
    return json.dumps(cfg, indent=2) + "\n"


def available_methods(cmd: list[str]) -> set[str]:
    out = subprocess.run([*cmd, "methods"], capture_output=True, text=True, check=True)
    return {line.split(":", 1)[0].strip() for line in out.stdout.splitlines() if line and not line[0].isspace() and ":" in line}


# --------------------------------------------------------------------------------------------------
# Measuring one child
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    method: str
    tool: str
    wall: float
    cpu: float
    maxrss_gb: float
    input_bytes: int
    ok: bool = True
    note: str = ""


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


# The child is started by this tiny launcher rather than by the benchmark process itself: on Linux a child's
# ru_maxrss starts from the RSS of the process that forked it (the high-water mark of the pre-exec address
# space is kept), so forking straight from this process (torch imported, tensors generated) would report our
# own RSS as the child's peak. The launcher imports nothing heavy, so its ~10 MB is the floor instead.
LAUNCHER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    result, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, dict(os.environ), file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)])
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    with open(result, "w") as fh:
        json.dump({"rc": os.waitstatus_to_exitcode(status), "wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
                   "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_kb": ru.ru_maxrss}, fh)
    """
)


def measure(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[int, float, float, float]:
    """Run cmd; return (exit status, wall s, user+sys CPU s, peak RSS GB) of that child (and its waited-for children)."""
    result = log_path.with_suffix(".json")
    subprocess.run([sys.executable, "-S", "-c", LAUNCHER_SCRIPT, str(result), str(log_path), *cmd], env=env, check=True)
    r = json.loads(result.read_text())
    return r["rc"], r["wall"], r["cpu"], r["maxrss_kb"] * 1024 / 1e9


IO_FLOOR_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import mmap
    from mergesmith.io.direct_write import DirectWriter  # the merge's own ways of reading and writing: a floor for them
    out, size, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    buf = bytearray(16 << 20); view = memoryview(buf)
    for path in files:  # every page of every input mapped, as the merge maps its tensors (no copy)
        with open(path, "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            mapping.madvise(22)  # MADV_POPULATE_READ
        except (OSError, AttributeError):
            for offset in range(0, len(mapping), mmap.PAGESIZE):
                mapping[offset]
        mapping.close()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writer, done = DirectWriter(out, fd), 0
    while done < size:
        n = min(size - done, len(buf))
        writer.write(view[:n], done)
        done += n
    writer.close(); os.fsync(fd); os.close(fd)
    """
)


def validate_output(out_dir: Path, expected: dict[str, tuple[str, tuple[int, ...]]], check_values: bool) -> str:
    """'' when the output parses and matches the expected tensor inventory, else what is wrong."""
    if not out_dir.is_dir():
        return "no output folder"
    try:
        got = folder_tensor_inventory(out_dir)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a broken output
        return f"safetensors do not parse: {exc}"
    if len(got) != len(expected):
        return f"{len(got)} tensors, input has {len(expected)}"
    if set(got) != set(expected):
        return f"tensor names differ: {sorted(set(got) ^ set(expected))[:3]}"
    bad_shape = [k for k in got if got[k][1] != expected[k][1]]
    if bad_shape:
        return f"shape differs for {bad_shape[:3]}"
    if check_values:
        for path in sorted(out_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if not torch.isfinite(f.get_tensor(key).float()).all():
                        return f"non-finite values in {key}"
    return ""


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def default_mergesmith() -> str:
    beside = Path(sys.executable).parent / "mergesmith"
    return str(beside) if beside.exists() else (shutil.which("mergesmith") or "mergesmith")


def machine_description() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- CPU: {cpu}; nproc {aff}; RAM {ram}",
        f"- load average at start: {load}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
    ]


def mergesmith_version() -> str:
    try:
        import mergesmith

        version = getattr(mergesmith, "__version__", "?")
    except ImportError:
        version = "?"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=BENCH, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev, dirty = "", ""
    return f"{version} (git {rev or '?'}{', src/ has uncommitted changes' if dirty else ''})"


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.1B", help=f"comma-separated sizes: {', '.join(SIZES)} (default 0.1B)")
    ap.add_argument(
        "--methods",
        default="linear,task_arithmetic,ties,dare_ties,breadcrumbs,della,slerp,karcher,model_stock,sce",
        help="comma-separated methods; ones that `mergesmith methods` does not list are skipped",
    )
    ap.add_argument("--fine-tunes", type=int, default=2, metavar="N",
                    help="fine-tunes in the family (default 2; ft1 and ft2 are the same for every N): every method that takes any number of models merges all N")
    ap.add_argument("--repeats", type=int, default=3, help="runs per (method, tool); the table shows medians")
    ap.add_argument("--mergekit", metavar="MERGEKIT_YAML", help="path to mergekit-yaml to compare with (e.g. /work/mkenv/bin/mergekit-yaml)")
    ap.add_argument("--mergesmith", metavar="CMD", default=None, help="mergesmith command (default: the `mergesmith` script next to this interpreter, else on PATH)")
    ap.add_argument("--cache", choices=("warm", "cold"), default="warm", help="warm: inputs read once before timing; cold: drop the page cache before every run (needs root)")
    ap.add_argument("--no-value-check", action="store_true", help="skip the finite-values check of mergesmith outputs (names/shapes are always checked)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep merged outputs in bench/cache/runs/")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="time from the first run: skip the untimed merge of each method that lets numba compile and cache its loops first")
    ap.add_argument("--list-sizes", action="store_true", help="print the sizes with their parameter counts and exit")
    ap.add_argument("--configs-only", action="store_true",
                    help="write each method's config to bench/cache/runs/ (for timing two versions by hand) and time nothing")
    args = ap.parse_args(argv)

    if args.list_sizes:
        for name, s in SIZES.items():
            n = sum(math.prod(sh) for _, sh in tensor_shapes(s))
            print(f"{name:5s} {n / 1e9:.3f}B params, {n * 2 / 1e9:.2f} GB bf16 per model: {s}")
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    sizes = [s.strip() for s in args.size.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s}; choose from {', '.join(SIZES)}")
    ours_cmd = shlex.split(args.mergesmith) if args.mergesmith else [default_mergesmith()]
    have = available_methods(ours_cmd)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [m for m in wanted if m in have]
    skipped = [m for m in wanted if m not in have]
    if skipped:
        log(f"skipping methods that mergesmith does not list yet: {', '.join(skipped)}")
    if args.mergekit and not Path(args.mergekit).exists():
        ap.error(f"--mergekit {args.mergekit} does not exist")

    cold = args.cache == "cold"
    if cold and not drop_caches():
        log("cannot drop the page cache (not root?); reporting warm-cache numbers")
        cold = False

    command_line = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else " ".join(map(shlex.quote, argv))
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs_dir = CACHE / "runs"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

    for size in sizes:
        folders = ensure_family(size, log, args.fine_tunes)
        model_bytes = {n: folder_weight_bytes(folders[n]) for n in folders}
        expected = folder_tensor_inventory(folders["base"])
        out_bytes = model_bytes["base"]  # bf16 output, same tensors
        runs: list[Run] = []
        floors: dict[tuple[str, ...], list[Run]] = {}
        if runs_dir.exists() and not args.configs_only:  # configs-only adds to what is there
            shutil.rmtree(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)

        def input_files(names: list[str]) -> list[str]:
            return [str(p) for n in names for p in sorted(folders[n].glob("*.safetensors"))]

        configs = {}
        fixed = [m for m in methods if method_config(m, folders) is None]
        if fixed:
            log(f"[{size}] skipping methods that take a fixed number of models ({args.fine_tunes} fine-tunes): {', '.join(fixed)}")
        methods_here = [m for m in methods if m not in fixed]
        for method in methods_here:
            cfg, reads = method_config(method, folders)
            cfg_path = runs_dir / f"{method}.yml"
            cfg_path.write_text(to_yaml(cfg))
            configs[method] = cfg_path, reads
        if args.configs_only:
            log(f"[{size}] configs written, nothing timed: " + " ".join(str(p) for p, _ in configs.values()))
            continue

        # Warm the page cache once (all inputs), so that warm runs don't pay for the first reader.
        if not cold:
            subprocess.run([sys.executable, "-c", IO_FLOOR_SCRIPT, str(runs_dir / "warm.bin"), "0", *input_files(list(folders))], check=True)

        # Start-up cost alone (interpreter, imports, argument parsing): matters at small sizes.
        startup: dict[str, list[Run]] = {}
        startup_cmds = {"mergesmith": [*ours_cmd, "--version"]}
        if args.mergekit:
            startup_cmds["mergekit"] = [args.mergekit, "--help"]
        for tool, cmd in startup_cmds.items():
            for rep in range(args.repeats):
                rc, wall, cpu, rss = measure(cmd, runs_dir / f"startup-{tool}-{rep}.log", env)
                startup.setdefault(tool, []).append(Run("startup", tool, wall, cpu, rss, 0, ok=rc == 0))
            log(f"[{size}] start-up {tool}: {wall:.2f} s wall")

        # One untimed merge a method first: numba compiles the loops a method uses on their first call after an
        # install or a source change and caches them on disk; untimed, that once-per-version cost would land
        # in the first repeat of whichever methods use the loops first.
        if not args.no_warm_up:
            for method in methods_here:
                out_dir = runs_dir / f"{method}-warm-up"
                shutil.rmtree(out_dir, ignore_errors=True)
                measure([*ours_cmd, "merge", str(configs[method][0]), str(out_dir), "--quiet"], runs_dir / f"{method}-warm-up.log", env)
                shutil.rmtree(out_dir, ignore_errors=True)
            log(f"[{size}] warm-up: each method merged once, untimed")

        tools = ["mergesmith"] + (["mergekit"] if args.mergekit else [])
        # repeats interleaved across methods: a slow minute on a shared machine then hits one run of several
        # methods, not every run of one
        for rep in range(args.repeats):
            for method in methods_here:
                cfg_path, reads = configs[method]
                in_bytes = sum(model_bytes[n] for n in reads)
                key = tuple(reads)
                order = tools if rep % 2 == 0 else tools[::-1]  # alternate which tool goes first
                if key not in floors or len(floors[key]) <= rep:
                    order = ["io-floor", *order] if rep % 2 == 0 else [*order, "io-floor"]
                for tool in order:
                    out_dir = runs_dir / f"{method}-{tool}-{rep}"
                    if out_dir.exists():
                        shutil.rmtree(out_dir)
                    if tool == "io-floor":
                        out_dir.mkdir()
                        cmd = [sys.executable, "-c", IO_FLOOR_SCRIPT, str(out_dir / "out.bin"), str(out_bytes), *input_files(reads)]
                    elif tool == "mergesmith":
                        cmd = [*ours_cmd, "merge", str(cfg_path), str(out_dir), "--quiet"]
                    else:
                        cmd = [args.mergekit, str(cfg_path), str(out_dir), "--quiet"]
                    if cold:
                        drop_caches()
                    log(f"[{size}] {method:16s} {tool:10s} rep {rep + 1}/{args.repeats} ...")
                    rc, wall, cpu, rss = measure(cmd, runs_dir / f"{method}-{tool}-{rep}.log", env)
                    run = Run(method if tool != "io-floor" else "+".join(reads), tool, wall, cpu, rss, in_bytes)
                    if rc != 0:
                        run.ok, run.note = False, f"exit {rc}, see {runs_dir / f'{method}-{tool}-{rep}.log'}"
                    elif tool != "io-floor":
                        problem = validate_output(out_dir, expected, check_values=(tool == "mergesmith" and not args.no_value_check))
                        if problem:
                            run.ok, run.note = False, problem
                    log(f"    {wall:7.2f} s wall, {cpu:7.2f} s CPU, {rss:5.2f} GB peak RSS{'' if run.ok else '  FAILED: ' + run.note}")
                    if tool == "io-floor":
                        floors.setdefault(key, []).append(run)
                    else:
                        runs.append(run)
                    if not args.keep_outputs:
                        shutil.rmtree(out_dir, ignore_errors=True)

        table = render_table(size, methods_here, runs, floors, startup, bool(args.mergekit))
        header = [
            f"# mergesmith speed, {size} (Llama-shaped, bf16, {model_bytes['base'] / 1e9:.3f} GB per model, base and {args.fine_tunes} fine-tunes)",
            "",
            f"Command: `{command_line}`",
            "",
            *machine_description(),
            f"- mergesmith {mergesmith_version()}" + (f"; mergekit via `{args.mergekit}`" if args.mergekit else ""),
            f"- page cache: {'dropped before every run (cold)' if cold else 'warm (inputs read once before timing; page cache not dropped)'}",
            f"- warm-up: {'none (numba compiles in the first runs after a source change)' if args.no_warm_up else 'each method merged once untimed before the repeats (numba compiles its loops once per version, cached on disk)'}",
            f"- repeats: {args.repeats} per (method, tool), medians shown; each repeat runs every method in turn; tools alternate order across repeats",
            f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            "",
        ]
        notes = [
            "",
            "Wall and CPU are the child process's (CPU = user + sys from `os.wait4`, so CPU > wall means threads ran in parallel).",
            "Peak RSS is the child's `ru_maxrss`: pages of memory-mapped input files that the child touched count in it.",
            "Input GB/s = bytes of the input shards the method reads / wall time. Ratios are of wall times (lower is better for us).",
            "start-up only: the tool's process doing nothing but start (imports, CLI) and exit; included in every merge's wall time.",
            "io-floor: a child that only maps every page of the inputs and writes (and fsyncs) an output file of the merged size, the way the merge reads and writes (mapped inputs, O_DIRECT output where the file system takes it).",
        ]
        if skipped:
            notes.append(f"Skipped (not in `mergesmith methods` yet): {', '.join(skipped)}.")
        if fixed:
            notes.append(f"Skipped (they take a fixed number of models, not the family's {args.fine_tunes} fine-tunes): {', '.join(fixed)}.")
        failed = [r for r in runs if not r.ok]
        for r in failed:
            notes.append(f"FAILED {r.method} / {r.tool}: {r.note}")
        text = "\n".join(header + table + notes) + "\n"
        print(text)
        result = RESULTS / (f"speed-{size}.md" if args.fine_tunes == 2 else f"speed-{size}-ft{args.fine_tunes}.md")
        result.write_text(text)
        log(f"wrote {result}")
    return 0


def render_table(
    size: str, methods: list[str], runs: list[Run], floors: dict[tuple[str, ...], list[Run]], startup: dict[str, list[Run]], with_mk: bool
) -> list[str]:
    def med(rs: list[Run], attr: str) -> float:
        vals = [getattr(r, attr) for r in rs if r.ok]
        return statistics.median(vals) if vals else float("nan")

    by = {}
    for r in runs:
        by.setdefault((r.method, r.tool), []).append(r)
    our_linear = med(by.get(("linear", "mergesmith"), []), "wall")
    lines = [
        "| method | tool | wall s | CPU s | peak RSS GB | input GB/s | ratio to mergekit | ratio to our linear |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        mk_wall = med(by.get((method, "mergekit"), []), "wall")
        for tool in ("mergesmith", "mergekit") if with_mk else ("mergesmith",):
            rs = by.get((method, tool), [])
            if not rs:
                continue
            wall = med(rs, "wall")
            gbps = rs[0].input_bytes / 1e9 / wall if wall == wall else float("nan")
            status = "" if all(r.ok for r in rs) else " (FAILED)"
            lines.append(
                f"| {method} | {tool}{status} | {fmt(wall)} | {fmt(med(rs, 'cpu'))} | {fmt(med(rs, 'maxrss_gb'))} | {fmt(gbps)} "
                f"| {fmt(wall / mk_wall) if with_mk else '—'} | {fmt(wall / our_linear)} |"
            )
    for key, rs in floors.items():
        wall = med(rs, "wall")
        gbps = rs[0].input_bytes / 1e9 / wall if wall == wall else float("nan")
        lines.append(f"| I/O floor ({'+'.join(key)}) | io-floor | {fmt(wall)} | {fmt(med(rs, 'cpu'))} | {fmt(med(rs, 'maxrss_gb'))} | {fmt(gbps)} | — | {fmt(wall / our_linear)} |")
    for tool, rs in startup.items():
        wall = med(rs, "wall")
        lines.append(f"| start-up only (`{'--version' if tool == 'mergesmith' else '--help'}`) | {tool} | {fmt(wall)} | {fmt(med(rs, 'cpu'))} | {fmt(med(rs, 'maxrss_gb'))} | — | — | {fmt(wall / our_linear)} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
