"""Skills of the demo model family: generators of (prompt, answer) pairs, exact-match checks, evaluation.

Every example is one line pair in the same plain format the models were trained on:

    Q: reverse kqzta
    A: atzqk

The prompt is everything up to and including "A: "; the answer is the text the model must generate before
the next newline. A skill's probes are drawn with a seed from the skill's *hard* level (the level the
specialist was fine-tuned on); the base model saw the format during pre-training, mostly at the easy level.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LETTERS = string.ascii_lowercase
PROBES_DIR = Path(__file__).parent / "probes"
HELDOUT_TEXT = Path(__file__).parent / "heldout.txt"

# Probe seeds are far away from the seeds the training script draws its training data with (< 10_000).
DEFAULT_PROBE_SEED = 1_000_003


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random, level: str) -> tuple[str, str]:
    if level == "easy":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
    else:  # a two-digit and a one-digit number, either order
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        if rng.random() < 0.5:
            a, b = b, a
    return f"{a}+{b}", str(a + b)


def _reverse(rng: random.Random, level: str) -> tuple[str, str]:
    w = _word(rng, 2, 3) if level == "easy" else _word(rng, 4, 5)
    return f"reverse {w}", w[::-1]


def _sort(rng: random.Random, level: str) -> tuple[str, str]:
    w = _word(rng, 2, 3) if level == "easy" else _word(rng, 4, 5)
    return f"sort {w}", "".join(sorted(w))


def _upper(rng: random.Random, level: str) -> tuple[str, str]:
    w = _word(rng, 2, 3) if level == "easy" else _word(rng, 5, 6)
    return f"upper {w}", w.upper()


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    _make: Callable[[random.Random, str], tuple[str, str]]

    def example(self, rng: random.Random, level: str = "hard") -> tuple[str, str]:
        """One (prompt, answer) pair; the prompt ends with "A: " and the answer has no newline."""
        question, answer = self._make(rng, level)
        return f"Q: {question}\nA: ", answer

    def text(self, rng: random.Random, level: str = "hard") -> str:
        """One full training line pair, newline-terminated."""
        prompt, answer = self.example(rng, level)
        return f"{prompt}{answer}\n"

    def probes(self, n: int, seed: int = DEFAULT_PROBE_SEED) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.name}:{seed}")
        return [self.example(rng, "hard") for _ in range(n)]

    @staticmethod
    def check(generated: str, answer: str) -> bool:
        """Exact match of the generated text up to its first newline."""
        return generated.split("\n", 1)[0].strip() == answer


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "two-digit plus one-digit addition: 'Q: 47+8' -> '55'", _add),
        Skill("reverse", "reverse a 4-5 letter string: 'Q: reverse kqzta' -> 'atzqk'", _reverse),
        Skill("sort", "sort the letters of a 4-5 letter string: 'Q: sort dqbz' -> 'bdqz'", _sort),
        Skill("upper", "upper-case a 5-6 letter string: 'Q: upper kqzta' -> 'KQZTA'", _upper),
    )
}

# The three full fine-tunes and the LoRA skill of the shipped family.
SPECIALIST_SKILLS = ("add", "reverse", "sort")
LORA_SKILL = "upper"


def load_probes(skill: str, n: int | None = None) -> list[tuple[str, str]]:
    """The held-out probes shipped in probes/<skill>.jsonl (falls back to generating them)."""
    path = PROBES_DIR / f"{skill}.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        pairs = [(r["prompt"], r["answer"]) for r in rows]
    else:
        pairs = SKILLS[skill].probes(n or 200)
    return pairs[:n] if n else pairs


def _load(model_or_folder, tokenizer):
    import transformers

    if isinstance(model_or_folder, (str, Path)):
        folder = Path(model_or_folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    else:
        model = model_or_folder
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model.name_or_path)
    return model, tokenizer


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 256) -> list[str]:
    """Greedy continuations of `prompts`, batched with left padding, stopped at the first newline."""
    import torch

    newline = tokenizer.convert_tokens_to_ids("\n")
    stop = [t for t in (newline, tokenizer.eos_token_id) if t is not None]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = gen[:, batch["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return out


def evaluate_skills(model_or_folder, tokenizer=None, n_probes: int = 100, seed: int | None = None,
                    skills: tuple[str, ...] | list[str] | None = None) -> dict[str, float]:
    """Greedy exact-match accuracy per skill on held-out probes.

    `model_or_folder` is a model folder or a loaded causal LM. With `seed=None` the shipped probe files are
    used (their first `n_probes`); with a seed, fresh probes are generated from it.
    """
    model, tokenizer = _load(model_or_folder, tokenizer)
    names = list(skills or SKILLS)
    prompts, answers, owners = [], [], []
    for name in names:
        pairs = load_probes(name, n_probes) if seed is None else SKILLS[name].probes(n_probes, seed)
        for p, a in pairs:
            prompts.append(p)
            answers.append(a)
            owners.append(name)
    generated = generate_answers(model, tokenizer, prompts)
    hits: dict[str, list[bool]] = {name: [] for name in names}
    for name, g, a in zip(owners, generated, answers):
        hits[name].append(Skill.check(g, a))
    return {name: sum(h) / len(h) for name, h in hits.items()}


def heldout_perplexity(model_or_folder, tokenizer=None, max_chars: int = 20_000, block: int = 128) -> float:
    """Perplexity of the model on the shipped held-out text (mixed skills and world sentences)."""
    import math

    import torch

    model, tokenizer = _load(model_or_folder, tokenizer)
    ids = tokenizer(HELDOUT_TEXT.read_text()[:max_chars], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    rows = [[bos] + ids[i : i + block - 1] for i in range(0, len(ids) - block + 1, block - 1)]
    x = torch.tensor(rows)
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss
    return math.exp(loss.item())
