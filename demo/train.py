"""Regenerate the demo model family shipped in src/mergesmith/demo/family/.

    python demo/train.py            # everything: tokenizer, base, specialists, LoRA, probes, held-out text
    python demo/train.py --seed 0 --out /tmp/family   # elsewhere

Deterministic from --seed on CPU for a given --threads (default 1; two OpenMP threads on a busy 2-core
machine ran up to 5x slower). About 15 minutes on one core of a heavily shared machine, less when idle.

The family:
  base        a tiny LlamaForCausalLM pre-trained on a mixed corpus: sentences of a small generated world and
              every skill's Q/A format, mostly at the easy level (1-digit sums, 2-3 letter strings)
  add, reverse, sort
              full fine-tunes of base on the hard level of one skill each (few hundred steps, small LR, loss on
              the answers only), so they stay in the base's basin and their task vectors are small
  lora_upper  a PEFT-format LoRA adapter (r=8 on q/k/v/o/gate/up/down) trained from base on upper-casing
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import string
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mergesmith.demo.skills import (  # noqa: E402
    DEFAULT_PROBE_SEED,
    LORA_SKILL,
    SKILLS,
    SPECIALIST_SKILLS,
    evaluate_skills,
    heldout_perplexity,
)

DEMO_PKG = ROOT / "src" / "mergesmith" / "demo"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + " \n.,:?+=-'")

MODEL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
SEQ_LEN = 64
BATCH = 16

PRETRAIN = dict(steps=1200, lr=2e-3, warmup=50, text_share=0.25, hard_share=0.03)
FINETUNE = dict(steps=300, lr=2e-4, warmup=20, easy_share=0.1, replay_share=0.5)
FINETUNE_PER_SKILL = {"add": dict(steps=400, lr=6e-4)}  # addition needs more than the string skills
LORA = dict(steps=300, lr=2e-3, warmup=20, r=8, alpha=16,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
PROBE = None  # (every, ) for learning curves while tuning
N_PROBES = 200  # per skill, shipped in probes/<skill>.jsonl


# ----------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, <s> prepended, decoding concatenates."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=SEQ_LEN * 2, clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------------------------- corpus

NAMES = ["ada", "bo", "cyd", "dov", "eli", "fay", "gus", "hal", "ivy", "jo", "kai", "lu", "max", "nia", "oz", "pia"]
THINGS = ["apple", "boat", "cup", "drum", "egg", "fig", "gem", "hat", "ink", "jar", "kite", "lamp", "map", "net"]
COLORS = ["red", "blue", "green", "gold", "gray", "pink", "teal", "white"]
PLACES = ["the hill", "the lake", "the town", "the wood", "the farm", "the mill", "the port", "the cave"]
VERBS = ["has", "sees", "finds", "sells", "wants", "holds", "paints", "loses"]


def world_sentence(rng: random.Random) -> str:
    """A sentence of a small generated world, for the text part of the corpus and the perplexity file."""
    n, t, c, p, v = (rng.choice(x) for x in (NAMES, THINGS, COLORS, PLACES, VERBS))
    form = rng.randrange(4)
    if form == 0:
        s = f"{n} {v} a {c} {t} at {p}."
    elif form == 1:
        s = f"at {p}, {n} {v} {rng.randint(2, 9)} {t}s."
    elif form == 2:
        s = f"{n} and {rng.choice(NAMES)} live near {p}."
    else:
        s = f"the {t} of {n} is {c}."
    return s[0].upper() + s[1:] + "\n"


class Corpus:
    """Draws training texts; probe prompts are never emitted (held out)."""

    def __init__(self, seed: int, probes: dict[str, set[str]]):
        self.rng = random.Random(seed)
        self.probes = probes

    def skill_example(self, name: str, level: str) -> tuple[str, str]:
        while True:
            prompt, answer = SKILLS[name].example(self.rng, level)
            if prompt not in self.probes[name]:
                return prompt, answer + "\n"

    def pretrain_piece(self) -> tuple[str, str]:
        r = self.rng.random()
        if r < PRETRAIN["text_share"]:
            return "", world_sentence(self.rng)
        level = "hard" if self.rng.random() < PRETRAIN["hard_share"] else "easy"
        return self.skill_example(self.rng.choice(list(SKILLS)), level)

    def finetune_piece(self, name: str) -> tuple[str, str]:
        if self.rng.random() < FINETUNE["replay_share"]:
            return self.pretrain_piece()
        level = "easy" if self.rng.random() < FINETUNE["easy_share"] else "hard"
        return self.skill_example(name, level)


def make_batch(tokenizer, draw) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH rows of SEQ_LEN tokens, each <s> followed by packed (prompt, answer) pieces; loss on answers only.

    World sentences come as ("", sentence), so the whole sentence is trained on."""
    vocab = tokenizer.get_vocab()
    bos = tokenizer.bos_token_id
    xs, ys = [], []
    for _ in range(BATCH):
        ids, lab = [bos], [-100]
        while len(ids) < SEQ_LEN:
            prompt, answer = draw()
            p = [vocab[c] for c in prompt]
            a = [vocab[c] for c in answer]
            ids += p + a
            lab += [-100] * len(p) + a
        xs.append(ids[:SEQ_LEN])
        ys.append(lab[:SEQ_LEN])
    return torch.tensor(xs), torch.tensor(ys)


# ----------------------------------------------------------------------------------------------- training

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model, params, tokenizer, draw, steps, lr, warmup, label, weight_decay=0.0, probe=None):
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        x, y = make_batch(tokenizer, draw)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  [{label}] step {step:4d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if probe and step % probe[0] == probe[0] - 1:
            model.eval()
            acc = evaluate_skills(model, tokenizer, n_probes=50, seed=DEFAULT_PROBE_SEED)
            print("    " + " ".join(f"{k}={v:.2f}" for k, v in acc.items()), flush=True)
            model.train()
    model.eval()


def save_model(model, tokenizer, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------- LoRA

class LoRALinear(torch.nn.Module):
    """y = W x + (alpha/r) B A x, initialised as PEFT does (A kaiming-uniform, B zero)."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: int):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def attach_lora(model, r: int, alpha: int, targets) -> dict[str, LoRALinear]:
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                lora = LoRALinear(child, r, alpha)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}"] = lora
    return wrapped


def save_lora(wrapped: dict[str, LoRALinear], folder: Path, r: int, alpha: int, targets) -> None:
    """PEFT format: adapter_config.json + adapter_model.safetensors with base_model.model.<module>.lora_X.weight."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tensors = {}
    for name, lora in wrapped.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora.lora_A.detach().clone().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora.lora_B.detach().clone().contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "../base", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": 0.0, "modules_to_save": None,
        "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None, "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def apply_lora_to_state(state: dict, adapter_folder: Path) -> dict:
    """W + (alpha/r) B @ A for every adapted module (what PEFT's merge_and_unload does)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    ad = load_file(adapter_folder / "adapter_model.safetensors")
    out = dict(state)
    for key, a in ad.items():
        if ".lora_A.weight" not in key:
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        b = ad[key.replace("lora_A", "lora_B")]
        out[f"{module}.weight"] = state[f"{module}.weight"] + scale * (b.float() @ a.float()).to(state[f"{module}.weight"].dtype)
    return out


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEMO_PKG / "family")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-probes", type=int, default=200)
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the family in OUT, rewrite results.json")
    ap.add_argument("--reuse-base", action="store_true", help="load OUT/base instead of pre-training (for tuning)")
    ap.add_argument("--override", default="{}", help='JSON, e.g. {"PRETRAIN": {"steps": 100}} (for tuning)')
    args = ap.parse_args(argv)

    for group, values in json.loads(args.override).items():
        if isinstance(globals()[group], dict):
            globals()[group].update(values)
        else:
            globals()[group] = values
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # Held-out probes and perplexity text ship with the package.
    probes = {name: SKILLS[name].probes(N_PROBES, DEFAULT_PROBE_SEED) for name in SKILLS}
    if True:  # independent of the training settings
        (DEMO_PKG / "probes").mkdir(exist_ok=True)
        for name, pairs in probes.items():
            lines = [json.dumps({"prompt": p, "answer": a}) for p, a in pairs]
            (DEMO_PKG / "probes" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        # Perplexity text: world sentences only (pre-training has loss on whole sentences but only on the
        # answers of the Q/A lines, so the random letters of prompts would only add noise).
        hrng = random.Random(f"heldout:{args.seed}")
        pieces = [world_sentence(hrng) for _ in range(600)]
        (DEMO_PKG / "heldout.txt").write_text("".join(pieces))
    probe_prompts = {name: {p for p, _ in pairs} for name, pairs in probes.items()}

    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=SEQ_LEN * 2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=False, max_new_tokens=16,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}", flush=True)

    results: dict[str, dict] = {}

    def report(label, m):
        acc = evaluate_skills(m, tokenizer, n_probes=args.eval_probes, seed=DEFAULT_PROBE_SEED)
        ppl = heldout_perplexity(m, tokenizer)
        results[label] = {**acc, "ppl": ppl}
        print(f"  {label}: " + " ".join(f"{k}={v:.2f}" for k, v in results[label].items()), flush=True)

    # 1. base
    if args.reuse_base or args.eval_only:
        model = transformers.LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    else:
        corpus = Corpus(args.seed * 7919 + 1, probe_prompts)
        train(model, list(model.parameters()), tokenizer, corpus.pretrain_piece, PRETRAIN["steps"], PRETRAIN["lr"],
              PRETRAIN["warmup"], label="base", weight_decay=0.01, probe=PROBE)
        save_model(model, tokenizer, out / "base")
    report("base", model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    # 2. specialists
    for i, name in enumerate(SPECIALIST_SKILLS):
        if args.eval_only:
            report(name, transformers.LlamaForCausalLM.from_pretrained(out / name, dtype=torch.float32))
            continue
        torch.manual_seed(args.seed * 1000 + 10 + i)
        model.load_state_dict(base_state)
        corpus = Corpus(args.seed * 7919 + 100 + i, probe_prompts)
        ft = {**FINETUNE, **FINETUNE_PER_SKILL.get(name, {})}
        train(model, list(model.parameters()), tokenizer, lambda: corpus.finetune_piece(name), ft["steps"],
              ft["lr"], ft["warmup"], label=name, probe=PROBE)
        save_model(model, tokenizer, out / name)
        report(name, model)

    # 3. LoRA adapter
    if not args.eval_only:
        torch.manual_seed(args.seed * 1000 + 99)
        model.load_state_dict(base_state)
        wrapped = attach_lora(model, LORA["r"], LORA["alpha"], LORA["targets"])
        lora_params = [p for lw in wrapped.values() for p in (lw.lora_A, lw.lora_B)]
        corpus = Corpus(args.seed * 7919 + 200, probe_prompts)
        train(model, lora_params, tokenizer, lambda: corpus.finetune_piece(LORA_SKILL), LORA["steps"], LORA["lr"],
              LORA["warmup"], label=f"lora_{LORA_SKILL}", probe=PROBE)
        save_lora(wrapped, out / f"lora_{LORA_SKILL}", LORA["r"], LORA["alpha"], LORA["targets"])
    # verify the files: apply W + (alpha/r) B A to a fresh base and evaluate
    fresh = transformers.LlamaForCausalLM(config)
    fresh.load_state_dict(apply_lora_to_state(base_state, out / f"lora_{LORA_SKILL}"))
    report(f"lora_{LORA_SKILL}", fresh)

    # 4. task arithmetic: base + sum w * (specialist - base), plus the LoRA delta
    from safetensors.torch import load_file

    specs = {name: load_file(out / name / "model.safetensors") for name in SPECIALIST_SKILLS}
    for w in (0.5, 0.75, 1.0):
        merged = {k: base_state[k] + w * sum(specs[n][k] - base_state[k] for n in specs) for k in base_state}
        fresh.load_state_dict(merged)
        report(f"task_arithmetic_w{w}", fresh)
        fresh.load_state_dict(apply_lora_to_state(merged, out / f"lora_{LORA_SKILL}"))
        report(f"task_arithmetic_w{w}+lora", fresh)

    elapsed = time.time() - t_start
    print(f"total {elapsed / 60:.1f} min", flush=True)
    minutes = round(elapsed / 60, 1)
    if args.eval_only and (out / "results.json").exists():
        minutes = json.loads((out / "results.json").read_text())["minutes"]
    summary = {"seed": args.seed, "params": n_params, "minutes": minutes, "threads": args.threads,
               "eval_probes": args.eval_probes, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict[str, dict]) -> str:
    cols = list(SKILLS) + ["ppl"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, row in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.2f}" if c == "ppl" else f"{100 * row[c]:.0f}%" for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
