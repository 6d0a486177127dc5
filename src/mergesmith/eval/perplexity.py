"""Perplexity on held-out text with a sliding window, so texts longer than the context can be scored.

Every token but the first is scored exactly once, each with at least `window - stride` tokens of context
(except near the start): window k ends `stride` tokens after window k-1 and scores only the tokens window k-1
did not. The result is the token-weighted mean over all windows, exp(sum of NLL / number of scored tokens),
which is what a single forward pass gives when the text fits in one window.

Memory stays bounded: windows go through the model at most `batch_size` at a time and never more than
`max_logits` logits per forward pass (a 150k vocabulary makes logits the largest tensor by far), and where the
model supports `logits_to_keep` only the logits of the scored positions are materialised (vocab x stride, not
vocab x window).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Window:
    """Input tokens `[begin, end)`; the tokens `[score_from, end)` are scored in it."""

    begin: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end - self.score_from


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float
    tokens: int

    @property
    def perplexity(self) -> float:
        if self.tokens == 0:
            return float("nan")
        try:
            return math.exp(self.nll_sum / self.tokens)
        except OverflowError:
            return float("inf")


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows over a text of `n_tokens`; tokens 1..n-1 are each scored in exactly one window.

    `stride` is clamped to `window - 1` so that the first scored token of a window always has a
    predecessor inside the same window.
    """
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    stride = max(1, min(stride, window - 1))
    windows: list[Window] = []
    if n_tokens < 2:
        return windows
    end = min(window, n_tokens)
    windows.append(Window(0, end, 1))
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        windows.append(Window(max(0, new_end - window), new_end, end))
        end = new_end
    return windows


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def sequence_nll(
    model: torch.nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    window: int = 1024,
    stride: int | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    max_logits: int = 2**28,
) -> PerplexityResult:
    """Summed negative log-likelihood of `input_ids` (one text) under a causal LM, scored by sliding windows.

    Windows of equal length are batched; the last (shorter) window is padded on the right with its padding
    masked out of both attention and loss, which leaves the real positions' logits unchanged. A batch holds
    at most `batch_size` windows and `max_logits` logits (default 2^28: 1 GiB in float32), and at least one window.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    stride = stride if stride is not None else max(1, window // 2)
    windows = plan_windows(len(ids), window, stride)
    if device is None:
        device = next(model.parameters()).device
    keep_logits = _supports_logits_to_keep(model)
    model.eval()
    nll = 0.0
    tokens = 0
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    for batch in _batches(windows, max(1, batch_size), max_logits // vocab if vocab else None, keep_logits):
        length = max(w.end - w.begin for w in batch)
        x = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        # targets[b, j] is the token predicted at position j of row b, or -100 where nothing is scored.
        targets = torch.full((len(batch), length), -100, dtype=torch.long)
        keep = 0
        for b, w in enumerate(batch):
            n = w.end - w.begin
            x[b, :n] = ids[w.begin : w.end]
            mask[b, :n] = 1
            first = w.score_from - w.begin  # position (in the row) of the first scored token
            targets[b, first - 1 : n - 1] = ids[w.score_from : w.end]
            keep = max(keep, length - (first - 1))
        kwargs = {"logits_to_keep": keep} if keep_logits else {}
        out = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs)
        logits = out.logits[:, -keep:]
        tgt = targets[:, -keep:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"
        )
        nll += float(losses)
        tokens += int((tgt != -100).sum())
    return PerplexityResult(nll, tokens)


def _kept_positions(batch: list[Window], keep_logits: bool) -> int:
    """Logit rows per window a batch materialises: from the earliest first-scored position to the end."""
    length = max(w.end - w.begin for w in batch)
    if not keep_logits:
        return length
    return max(length - (w.score_from - w.begin - 1) for w in batch)


def _batches(windows: list[Window], batch_size: int, max_positions: int | None, keep_logits: bool):
    """Consecutive windows, at most `batch_size` per batch and `max_positions` logit rows in all (one at least)."""
    i = 0
    while i < len(windows):
        n = 1
        while n < batch_size and i + n < len(windows):
            candidate = windows[i : i + n + 1]
            if max_positions is not None and (n + 1) * _kept_positions(candidate, keep_logits) > max_positions:
                break
            n += 1
        yield windows[i : i + n]
        i += n


def perplexity(model: torch.nn.Module, input_ids: Sequence[int] | torch.Tensor, **kwargs) -> float:
    """exp(mean NLL per scored token); see `sequence_nll` for the options."""
    return sequence_nll(model, input_ids, **kwargs).perplexity


def text_perplexity(model: torch.nn.Module, tokenizer, text: str, *, window: int | None = None, **kwargs) -> PerplexityResult:
    """Tokenize `text` as the tokenizer does by default (with its BOS, if any) and score it.

    The window defaults to the model's context length, capped at 1024 tokens to keep CPU runs quick.
    """
    # The whole text is tokenized at once on purpose (windows come later), so the tokenizer's
    # "longer than the maximum sequence length" warning does not apply.
    saved = getattr(tokenizer, "model_max_length", None)
    if saved is not None:
        tokenizer.model_max_length = int(1e30)
    try:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    if window is None:
        window = min(1024, int(getattr(model.config, "max_position_embeddings", 1024) or 1024))
    return sequence_nll(model, ids, window=window, **kwargs)
