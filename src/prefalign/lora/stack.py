"""Stacked LoRA stages as one adapter: LoRA updates add, so their ranks concatenate.

    sum_i s_i B_i A_i = B' A'   with   A' = [A_1; A_2; ...] (rows),
                                       B' = [s_1 B_1, s_2 B_2, ...] (columns),
                                       r' = sum_i r_i, scaling 1 (lora_alpha = r').

A module one stage did not adapt gets zero blocks in that stage's rows and columns. Pure
tensor arithmetic: peft_format.save_adapter writes the result in PEFT's format, so a chain of
stages (SFT, then DPO, then PPO) loads in PEFT as one adapter over the true base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MergedAdapters:
    """LoRA updates that a model's weights already hold (models.load_causal_lm merged them).

    base: the model the updates apply to, itself not an adapter (a directory or hub id).
    stages: one {module name: (A (r, in), B * scaling (out, r))} per merged adapter, oldest
    first, float32 on the CPU. Kept on the model as `model.merged_adapters` so that
    `save_adapter` writes the next stage as one adapter over `base` that PEFT loads alone.
    """

    base: str
    stages: tuple[Factors, ...]


def stack_factors(stages: Sequence[Factors]) -> tuple[int, Factors]:
    """One rank-r' adapter with scaling 1 equal to the sum of `stages` (see module docstring).

    Returns (r', {module name: (A' (r', in), B' (out, r'))}) over the union of the stages'
    modules; every stage's rank block is zero where that stage did not adapt the module.
    """
    ranks = [next(iter(stage.values()))[0].shape[0] for stage in stages]
    shapes = {name: (a.shape[1], b.shape[0]) for stage in stages for name, (a, b) in stage.items()}
    stacked = {}
    for name, (in_f, out_f) in shapes.items():
        blocks_a, blocks_b = [], []
        for r, stage in zip(ranks, stages):
            a, b = stage.get(name, (torch.zeros(r, in_f), torch.zeros(out_f, r)))
            blocks_a.append(a)
            blocks_b.append(b)
        stacked[name] = (torch.cat(blocks_a, 0).contiguous(), torch.cat(blocks_b, 1).contiguous())
    return sum(ranks), stacked
