"""Length-grouped example order: micro-batches of similar lengths, so less padding.

A padded micro-batch costs as much as its longest sequence times its size. Sorting the
whole epoch by length would make batches uniform but the order predictable (and the
loss curve follow the lengths); the usual compromise (Hugging Face's LengthGroupedSampler)
shuffles, cuts the shuffled order into mega-batches of many micro-batches, and sorts only
within each mega-batch. Here the micro-batches of a mega-batch are then shuffled among
themselves, so long and short groups alternate within an epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def feature_length(feature: dict) -> int:
    """Tokens of the longest sequence a feature becomes: prompt + its longest completion
    (chosen or rejected for pairs, the completion for SFT and KTO rows)."""
    prompt = len(feature.get("prompt_input_ids", ()))
    completions = [len(v) for k, v in feature.items()
                   if k.endswith("input_ids") and k != "prompt_input_ids"]
    return prompt + max(completions, default=0)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # The same seeding as the loop's plain shuffle, so both are pure functions of (seed, epoch).
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def length_grouped_order(
    lengths: Sequence[int], seed: int, epoch: int, group_size: int, megabatch_groups: int = 50
) -> list[int]:
    """A permutation of range(len(lengths)) for one epoch, deterministic from (seed, epoch).

    Consecutive runs of `group_size` indices (one micro-batch across processes) have
    similar lengths: the shuffled order is cut into mega-batches of `megabatch_groups`
    groups, each sorted by length (longest first), cut into groups, and the groups of a
    mega-batch shuffled. Every index appears exactly once.
    """
    if group_size < 1 or megabatch_groups < 1:
        raise ValueError("group_size and megabatch_groups must be >= 1")
    n = len(lengths)
    generator = epoch_generator(seed, epoch)
    shuffled = torch.randperm(n, generator=generator).tolist()
    mega = group_size * megabatch_groups
    order: list[int] = []
    for start in range(0, n, mega):
        block = sorted(shuffled[start : start + mega], key=lambda i: -lengths[i])
        groups = [block[g : g + group_size] for g in range(0, len(block), group_size)]
        # The last, possibly short, group stays last so full groups stay aligned with the
        # micro-batch boundaries of the steps that follow.
        full, tail = (groups[:-1], groups[-1:]) if len(groups[-1]) < group_size else (groups, [])
        for g in torch.randperm(len(full), generator=generator).tolist():
            order.extend(full[g])
        for group in tail:
            order.extend(group)
    return order
