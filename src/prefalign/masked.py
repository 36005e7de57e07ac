"""Statistics over the True entries of a mask: the only masked mean, variance and whitening.

`mask` is always True = include, the same shape as `x`. Entries outside the mask never
reach a result. An empty mask gives 0 (the count is clamped to 1), never nan.

Across processes: pass `reduce`, a function that sums a 1-D tensor over every process
(e.g. `lambda t: accelerator.reduce(t, reduction="sum")`), and the statistics are those of
every process's entries together, as one process holding all of them would compute; each
process still returns its own entries. reduce=None means this process alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Sums a 1-D tensor over every process (every process must call it equally often).
Reduce = Callable[[Tensor], Tensor]


def _sum_and_count(x: Tensor, mask: Tensor, reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    m = mask.to(x.dtype)
    # where(), not x * m: a nan or inf outside the mask must not leak into the sum.
    total = torch.where(mask.bool(), x, torch.zeros_like(x)).sum()
    count = m.sum()
    if reduce is not None:
        total, count = reduce(torch.stack([total, count])).unbind()
    return total, count


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None,
                reduce: Reduce | None = None) -> Tensor:
    """sum(x * mask) / max(sum(mask), 1): a scalar, or per slice along `dim` (local only)."""
    if dim is not None:
        if reduce is not None:
            raise ValueError("masked_mean: dim and reduce cannot be combined")
        m = mask.to(x.dtype)
        kept = torch.where(mask.bool(), x, torch.zeros_like(x))
        return kept.sum(dim) / m.sum(dim).clamp(min=1)
    total, count = _sum_and_count(x, mask, reduce)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True,
               reduce: Reduce | None = None) -> Tensor:
    """Variance over the masked entries: mean((x - mean)^2), times n / (n - 1) when
    unbiased (Bessel's correction, as TRL's PPO)."""
    mean = masked_mean(x, mask, reduce=reduce)
    squares, count = _sum_and_count((x - mean) ** 2, mask, reduce)
    var = squares / count.clamp(min=1)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Reduce | None = None) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; shift_mean=False adds the mean
    back (scaled, not centred). Entries outside the mask are returned as 0 so they cannot
    leak into later sums."""
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_var(x, mask, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) long: the last True position of each row of a (B, T) mask; 0 for an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.bool()).argmax(-1)
