"""Perplexity: the sliding window scores every token once, and the numbers equal transformers' own loss."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from mergesmith.eval.perplexity import plan_windows, sequence_nll, text_perplexity

TEXT = "the cat sat on the mat. 12+34 is 46."


@pytest.fixture(scope="module")
def model_and_tokenizer(char_family):
    folder = char_family["a"]
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17, 64])
@pytest.mark.parametrize("window,stride", [(4, 2), (8, 3), (8, 7), (8, 8), (8, 100), (16, 1)])
def test_windows_score_every_token_but_the_first_exactly_once(n, window, stride):
    scored = []
    for w in plan_windows(n, window, stride):
        assert 0 <= w.begin < w.score_from <= w.end <= n
        assert w.end - w.begin <= window
        scored += range(w.score_from, w.end)
    assert scored == list(range(1, n))


def test_windows_of_a_worked_example():
    assert [(w.begin, w.end, w.score_from) for w in plan_windows(10, 4, 2)] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


def test_one_window_equals_transformers_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    with torch.no_grad():
        x = torch.tensor([ids])
        expected = math.exp(model(input_ids=x, labels=x).loss.item())
    result = sequence_nll(model, ids, window=len(ids) + 5)
    assert result.tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert text_perplexity(model, tokenizer, TEXT).perplexity == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_strided_windows_equal_a_hand_computation(model_and_tokenizer, batch_size):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(TEXT)["input_ids"][:18]
    # window 8, stride 3 over 18 tokens, written out by hand: (begin, end, first scored token)
    hand = [(0, 8, 1), (3, 11, 8), (6, 14, 11), (9, 17, 14), (10, 18, 17)]
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in hand:
            x = torch.tensor([ids[begin:end]])
            labels = x.clone()
            labels[0, : first - begin] = -100  # transformers shifts labels: position j is predicted from j-1
            n = end - first
            total += model(input_ids=x, labels=labels).loss.item() * n
            count += n
    result = sequence_nll(model, ids, window=8, stride=3, batch_size=batch_size)
    assert result.tokens == count == len(ids) - 1
    assert result.nll_sum == pytest.approx(total, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_differs_from_one_window_only_by_lost_context(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(TEXT)["input_ids"]
    full = sequence_nll(model, ids, window=len(ids))
    strided = sequence_nll(model, ids, window=8, stride=4)
    assert strided.tokens == full.tokens
    assert strided.nll_sum != pytest.approx(full.nll_sum, rel=1e-7)  # less context, different numbers


def test_model_without_logits_to_keep_gives_the_same(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    ids = tokenizer(TEXT)["input_ids"]
    a = sequence_nll(model, ids, window=10, stride=4, batch_size=3)
    b = sequence_nll(Plain(model), ids, window=10, stride=4, batch_size=3)
    assert a.tokens == b.tokens
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-5)


def test_logits_budget_splits_batches_without_changing_the_result(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    calls = []

    def count(module, args, kwargs):
        calls.append(kwargs["input_ids"].shape)

    ids = tokenizer(TEXT)["input_ids"]
    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        wide = sequence_nll(model, ids, window=8, stride=4, batch_size=16)
        n_wide = len(calls)
        vocab = model.config.vocab_size
        narrow = sequence_nll(model, ids, window=8, stride=4, batch_size=16, max_logits=vocab * 10)
    finally:
        handle.remove()
    n_windows = len(plan_windows(len(ids), 8, 4))
    assert n_wide == 1 and calls[0][0] == n_windows
    # 10 logit rows allowed: two windows of 5 kept rows (stride 4 + 1) per pass; the first window (8 rows) alone
    assert [shape[0] for shape in calls[1:]] == [1] + [2] * ((n_windows - 1) // 2) + [1] * ((n_windows - 1) % 2)
    assert narrow.tokens == wide.tokens
    assert narrow.nll_sum == pytest.approx(wide.nll_sum, rel=1e-5)
