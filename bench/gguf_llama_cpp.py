"""Does llama.cpp read our GGUF export the way transformers reads the folder it came from? (a tool, not a test)

llama-cpp-python is not a dependency; it builds from source (about 10 minutes on 2 cores):

    python -m venv --system-site-packages llenv && llenv/bin/pip install llama-cpp-python
    mergesmith export-gguf MODEL_FOLDER out.gguf --type f32
    llenv/bin/python bench/gguf_llama_cpp.py MODEL_FOLDER out.gguf

For each prompt it compares the two tokenizations and the first 16 greedy tokens, and prints how many
tokens agree before the first difference.
"""

from __future__ import annotations

import sys

import torch
import transformers

PROMPTS = ["The capital of France is", "Once upon a time", "To be, or not to be,", "def fibonacci(n):", "Of Man's first disobedience"]
NEW_TOKENS = 16


def main(folder: str, gguf: str) -> int:
    from llama_cpp import Llama

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    llm = Llama(model_path=gguf, n_ctx=256, verbose=False, n_threads=2)
    agree = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0][len(ids):].tolist()
        llama_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(llama_ids)
        got = []
        for _ in range(NEW_TOKENS):
            token = llm.sample(temp=0.0, top_k=1)
            got.append(token)
            llm.eval([token])
        same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), NEW_TOKENS)
        agree += same
        print(f"{prompt!r}: same tokenization: {llama_ids == ids}; greedy tokens equal: {same}/{NEW_TOKENS}; llama.cpp: {tokenizer.decode(got)!r}")
    print(f"greedy agreement: {agree}/{NEW_TOKENS * len(PROMPTS)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
