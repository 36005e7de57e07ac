"""Learning-rate schedules: linear warmup from 0, then constant, linear or cosine decay.

The same multipliers as transformers' `get_scheduler` ("constant_with_warmup", "linear",
"cosine" with half a cycle), written here because importing transformers' optimization
module pulls in its trainer utilities and peft: a fixed cost at every start of every run.

    warmup   (step < W):  step / W
    constant (step >= W): 1
    linear   (step >= W): max(0, (T - step) / (T - W))
    cosine   (step >= W): max(0, (1 + cos(pi * (step - W) / (T - W))) / 2)

with W warmup steps and T training steps (a zero denominator counts as 1).
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _multiplier(step: int, kind: str, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_schedule(optimizer: Optimizer, kind: str, warmup: int, total: int) -> LambdaLR:
    """A LambdaLR for `kind` in constant | linear | cosine (see the module docstring)."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}")
    return LambdaLR(optimizer, partial(_multiplier, kind=kind, warmup=warmup, total=total))
