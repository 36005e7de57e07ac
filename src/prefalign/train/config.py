"""TrainConfig: the sections every offline trainer shares (sft, dpo, kto; iterate's DPO).

The sections themselves are in train.sections; a trainer's config adds its own section
(and the reference section where it has a reference model). PPO and reward compose the
shared sections they use instead (no eval set for PPO, no `merge` for reward).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.train.sections import (
    DataOptions,
    EvalOptions,
    MergeOption,
    ModelOptions,
    OptimOptions,
    RunOptions,
)


@dataclass(frozen=True)
class TrainConfig(ModelOptions, DataOptions, EvalOptions, OptimOptions, MergeOption,
                  RunOptions):
    """model, data, eval, optim and run options, each checked by its section's validate()."""
