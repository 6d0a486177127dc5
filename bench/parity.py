"""Whole-tool parity with mergekit: the same configs on the same generated models, tensor by tensor.

A tool, not a test (CI has no mergekit). Install mergekit in its own environment with the CPU torch pin:

    python -m venv mkenv && mkenv/bin/pip install torch==2.13.0 && mkenv/bin/pip install mergekit

then run, from the repository root:

    python bench/parity.py --mergekit mkenv/bin/mergekit-yaml [--dtype float32|bfloat16] [--methods a,b]
                           [--compute-dtype bfloat16] [--tie-order mergekit]

For every method both tools merge a tiny Llama family (a base and three fine-tunes = base + low-rank and
sparse deltas; `--fine-tunes 2` merges two, which takes the two-model loops) and the script prints, per method, the largest absolute difference over all tensors and
that difference in bf16 ulps at the tensor's largest magnitude (≤ 1 means "equal to bf16 rounding").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "parity"

SAMPLE = {"weight": 0.6, "density": 0.5, "t": 0.3, "gamma": 0.01, "epsilon": 0.05, "select_topk": 0.5, "lambda": 1.0}
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}


def make_family(folder: Path, seed: int = 0, layers: int = 4, hidden: int = 64, dtype: str = "float32") -> dict[str, Path]:
    """A base and three fine-tunes of it, as HF folders whose safetensors are stored in `dtype`.

    Storing in the merge dtype matters: mergekit rounds its inputs to `dtype` before merging, which changes
    results (e.g. RAM's "did this entry change" masks) when the files hold more precision than that.
    """
    import transformers

    if (folder / "done").exists():
        return {name: folder / name for name in ("base", "ft1", "ft2", "ft3")}
    shutil.rmtree(folder, ignore_errors=True)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    base.save_pretrained(folder / "base")
    state = {k: v.detach().float().clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(1, 4):
        tuned = {}
        for name, tensor in state.items():
            if tensor.dim() == 2:
                rank = 4
                low_rank = torch.randn(tensor.shape[0], rank, generator=gen) @ torch.randn(rank, tensor.shape[1], generator=gen)
                sparse = torch.randn(tensor.shape, generator=gen) * (torch.rand(tensor.shape, generator=gen) < 0.05)
                delta = 0.002 * low_rank + 0.01 * sparse
            else:
                delta = 0.01 * torch.randn(tensor.shape, generator=gen)
            tuned[name] = (tensor + delta).to(getattr(torch, dtype)).contiguous()
        out = folder / f"ft{i}"
        out.mkdir(parents=True)
        save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(folder / "base" / "config.json", out / "config.json")
    (folder / "done").write_text("ok")
    return {name: folder / name for name in ("base", "ft1", "ft2", "ft3")}


def config_for(method: str, family: dict[str, Path], dtype: str, fine_tunes: int = 3) -> dict:
    """A config exercising the method's main parameters, identical for both tools, on up to `fine_tunes`
    fine-tunes (two take the compiled two-model passes)."""
    from mergesmith.methods.registry import get_method

    spec = get_method(method)
    per_model = {p.name: SAMPLE.get(p.name, 0.5) for p in spec.model_params if p.required or p.name in ("weight", "density")}
    global_params = {p.name: SAMPLE[p.name] for p in spec.global_params if p.required and p.name in SAMPLE}
    count = min(spec.max_models or fine_tunes, fine_tunes)
    models = [family[f"ft{i}"] for i in range(1, count + 1)]
    config: dict = {"merge_method": method, "dtype": dtype}
    if spec.base in ("required", "optional") and method not in ("karcher",):
        config["base_model"] = str(family["base"])
    if method == "slerp":
        config["slices"] = [{"sources": [{"model": str(family["base"]), "layer_range": [0, 4]},
                                         {"model": str(models[0]), "layer_range": [0, 4]}]}]  # fmt: skip
        config["parameters"] = {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}
        return config
    if method == "passthrough":
        config["slices"] = [{"sources": [{"model": str(models[0]), "layer_range": [0, 3]}]},
                            {"sources": [{"model": str(family["ft2"]), "layer_range": [1, 4]}]}]  # fmt: skip
        return config
    config["models"] = [{"model": str(m), **({"parameters": dict(per_model)} if per_model else {})} for m in models]
    if global_params:
        config["parameters"] = global_params
    return config


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, float, str]:
    """Max abs difference, the same in bf16 spacings at each tensor's scale, and a note: any name mismatch, or
    the share of entries off by more than one such spacing (entries a selecting method picked differently)."""
    if set(ours) != set(theirs):
        only = sorted(set(ours) ^ set(theirs))[:3]
        return float("nan"), float("nan"), f"tensor names differ: {only}"
    worst_abs, worst_ulps, off, total = 0.0, 0.0, 0, 0
    for name in ours:
        a, b = ours[name].float(), theirs[name].float()
        if a.shape != b.shape:
            return float("nan"), float("nan"), f"{name}: shapes {list(a.shape)} vs {list(b.shape)}"
        diff = (a - b).abs()
        scale = b.abs().max().clamp_min(1e-12)
        bf16_spacing = 2.0 ** (torch.floor(torch.log2(scale)) - 7)  # one bf16 ulp at the tensor's largest magnitude
        worst_abs = max(worst_abs, float(diff.max()))
        worst_ulps = max(worst_ulps, float(diff.max() / bf16_spacing))
        off += int((diff > bf16_spacing).sum())
        total += diff.numel()
    return worst_abs, worst_ulps, f"{off} of {total} entries ({100 * off / total:.3f}%) off by more than 1 ulp" if off else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit", required=True, help="path to mergekit-yaml in its own environment")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default="", help="comma-separated; default: every method both tools have")
    parser.add_argument("--compute-dtype", default="float32", help="mergesmith's --compute-dtype (bfloat16 mimics mergekit on bf16 models)")
    parser.add_argument("--tie-order", default="position", help="mergesmith's --tie-order (mergekit: its sort order for tied magnitudes)")
    parser.add_argument("--fine-tunes", type=int, default=3, choices=(2, 3), help="fine-tunes per merge (2: the two-model loops)")
    args = parser.parse_args()

    from mergesmith.methods.registry import method_names

    listed = subprocess.run(
        [str(Path(args.mergekit).parent / "python"), "-c", "from mergekit.merge_methods import registry; print(' '.join(sorted(registry._METHODS)))"],
        capture_output=True, text=True,
    )  # fmt: skip
    theirs_methods = set(listed.stdout.split()) if listed.returncode == 0 else set(method_names())
    methods = [m for m in (args.methods.split(",") if args.methods else method_names()) if m in theirs_methods]
    family = make_family(CACHE / f"family-{args.dtype}", dtype=args.dtype)
    work = CACHE / "runs"
    rows = []
    for method in methods:
        config = config_for(method, family, args.dtype, args.fine_tunes)
        cfg_path = work / f"{method}.yml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        ours_dir, theirs_dir = work / f"{method}-mergesmith", work / f"{method}-mergekit"
        for d in (ours_dir, theirs_dir):
            shutil.rmtree(d, ignore_errors=True)
        try:
            t_ours = run([sys.executable, "-m", "mergesmith.cli", "merge", str(cfg_path), str(ours_dir), "--quiet", "--compute-dtype", args.compute_dtype,
                          "--tie-order", args.tie_order])
            t_theirs = run([args.mergekit, str(cfg_path), str(theirs_dir), "--quiet", "--no-copy-tokenizer"])
        except RuntimeError as exc:
            rows.append((method, "error", "", "", str(exc).splitlines()[-1][:120]))
            continue
        worst_abs, worst_ulps, note = compare(read_all(ours_dir), read_all(theirs_dir))
        if method in RANDOM_METHODS:
            note = note or "random: different RNG streams, not comparable element-wise (statistics are tested)"
        rows.append((method, f"{worst_abs:.2e}", f"{worst_ulps:.2f}", f"{t_ours:.1f} / {t_theirs:.1f}", note))
    print("| method | max abs diff | in bf16 ulps | seconds (mergesmith / mergekit) | note |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / f"parity-{args.dtype}-compute-{args.compute_dtype}-ties-{args.tie_order}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
