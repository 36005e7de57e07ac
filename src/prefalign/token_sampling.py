"""The token choice of generation: per-row noise, top-k/top-p filtering, inverse-CDF draws.

Randomness. Row (prompt i, candidate j) draws all of its uniforms up front from its own CPU
`torch.Generator`, seeded by mixing (seed, i, j); step t samples by inverse CDF with the
t-th uniform. A row's noise therefore depends on nothing but (seed, i, j): not on batch
size, the order of prompts, the other rows, the device, or the global RNG (never touched).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def row_seed(seed: int, prompt_index: int, candidate: int) -> int:
    """A 63-bit seed for row (prompt_index, candidate); splitmix64 so nearby keys decorrelate."""
    x = 0
    for part in (seed, prompt_index, candidate):
        x = ((x ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def row_uniforms(seed: int, keys: Sequence[tuple[int, int]], steps: int) -> Tensor:
    """(R, steps) float64 uniforms in [0, 1); row r comes from its key (prompt, candidate) only."""
    rows = []
    for prompt_index, candidate in keys:
        g = torch.Generator().manual_seed(row_seed(seed, prompt_index, candidate))
        rows.append(torch.rand(steps, generator=g, dtype=torch.float64))
    return torch.stack(rows)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float = 1.0) -> Tensor:
    """(B, V) logits -> (B, V) with filtered tokens at -inf (HF's top-k then top-p warpers).

    top_k keeps tokens whose logit is at least the k-th largest (ties may keep more).
    top_p keeps the most probable tokens until their mass reaches top_p: a token goes
    when the tokens strictly ahead of it in (stable) sorted order already hold >= top_p.
    The most probable token always stays.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        ahead = probs.cumsum(dim=-1) - probs
        drop_sorted = ahead >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF sampling: (B, V) logits, (B,) uniforms in [0, 1) -> (B,) token ids.

    Token v is picked when cdf[v-1] <= u * total < cdf[v] (cdf in vocabulary order, float64),
    so a token of probability zero is never picked and the same u gives the same token
    whatever else is in the batch.
    """
    probs = logits.double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u * total can round up to total; stay on the last token that has probability.
    vocab = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, vocab, -1).amax(dim=-1)
    return torch.minimum(picked, last)
