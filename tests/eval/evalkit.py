"""Helpers for the eval tests: tiny character-level Llama models with their tokenizer (no downloads)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.ascii_lowercase + string.digits + " \n.:+")


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character, <s> prepended, decoding concatenates."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def make_char_model(folder: Path, seed: int = 0, *, base: Path | None = None, delta: float = 0.02, scale: float = 1.0,
                    max_positions: int = 256) -> Path:
    """A tiny random Llama over the character vocabulary, saved with its tokenizer.

    With `base`, the weights are the base's plus `delta` noise (a fine-tune); `scale` multiplies every weight
    (x10 makes a broken model).
    """
    tokenizer = make_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        if base is not None:
            state = transformers.LlamaForCausalLM.from_pretrained(base).state_dict()
            for name, p in model.named_parameters():
                p.copy_(state[name] + delta * torch.randn_like(p))
        if scale != 1.0:
            for p in model.parameters():
                p.mul_(scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def greedy_one_by_one(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """Reference greedy decoding, unbatched, token by token, stopped at newline or eos."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            text = tokenizer.decode([nxt])
            if text == "\n":
                break
            out.append(text)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return "".join(out)
