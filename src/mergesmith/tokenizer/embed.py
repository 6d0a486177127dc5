"""Rebuild a vocabulary-indexed tensor (embeddings, lm_head, a vocab-sized bias) for the output vocabulary.

Vectorised: rows are grouped by which inputs have them (usually a handful of patterns), and each group is
gathered with `index_select` and merged in one call, instead of a Python loop per token.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# combine(member positions, their gathered rows, the base's gathered rows or None) -> merged rows
Combine = Callable[[list[int], list[torch.Tensor], "torch.Tensor | None"], torch.Tensor]


def merge_vocab_rows(
    members: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    member_maps: Sequence[torch.Tensor],
    base_map: torch.Tensor | None,
    explicit: Sequence[tuple[int, int | None, int]],
    combine: Combine,
) -> torch.Tensor:
    """`explicit` holds (output row, input position or None for zeros, input row); position len(members) is the base.

    A row that one input has is that input's row; several inputs: `combine` of theirs; none: the mean of
    all other rows (padding rows included).
    """
    tensors = list(members) + ([base] if base is not None else [])
    maps = list(member_maps) + ([base_map] if base is not None else [])
    num_rows = maps[0].shape[0]
    template = tensors[0]
    out = template.new_empty((num_rows, *template.shape[1:]))
    filled = torch.zeros(num_rows, dtype=torch.bool)
    present = torch.stack([m >= 0 for m in maps], dim=1)
    codes = (present.long() << torch.arange(len(maps))).sum(dim=1)
    for code in torch.unique(codes).tolist():
        who = [j for j in range(len(maps)) if code >> j & 1]
        if not who:
            continue
        rows = torch.nonzero(codes == code).squeeze(1)
        gathered = {j: tensors[j].index_select(0, maps[j].index_select(0, rows).to(tensors[j].device)) for j in who}
        if len(who) == 1:
            out[rows] = gathered[who[0]]
        else:
            positions = [j for j in who if j < len(members)]
            has_base = base is not None and len(members) in who
            out[rows] = combine(positions, [gathered[j] for j in positions], gathered[len(members)] if has_base else None)
        filled[rows] = True
    mean_of = filled.clone()  # rows taken from the inputs; explicit rows do not count towards the mean
    for row, position, source_row in explicit:
        out[row] = 0 if position is None else tensors[position][source_row]
        filled[row] = True
    if not bool(filled.all()):
        out[~filled] = out[mean_of].mean(dim=0) if bool(mean_of.any()) else 0
    return out
