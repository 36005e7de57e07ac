"""The model side of decoding: eval mode for the block, the prefill and its KV cache.

generation's loop calls the model's own forward; what differs between transformers
versions and model classes (the cache's keyword, whether logits can be kept for the last
position only) is decided here, from the forward's signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from prefalign.data.collate import collate_prompts
from prefalign.logprobs import position_ids_from_mask


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the block (no dropout), then each module's own mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def prefill(model: nn.Module, prompt_ids: list[list[int]], pad: int, n: int):
    """One forward over the P left-padded prompts, its cache repeated for n candidates each.

    Returns cache (A = P * n rows), the forward's keyword for it (see cache_keyword),
    logits (A, V) at the last prompt token, attention mask (A, T) and next position ids (A, 1).
    """
    device = next(model.parameters()).device
    batch = collate_prompts(prompt_ids, pad)
    mask = batch["attention_mask"].to(device)  # (P, T)
    positions = position_ids_from_mask(mask)
    extra = {"logits_to_keep": 1} if keeps_logits(model) else {}
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                position_ids=positions, use_cache=True, **extra)
    keyword = cache_keyword(model, out)
    cache, logits, next_pos = out[keyword], out.logits[:, -1], positions[:, -1:] + 1
    if n > 1:  # candidates share the prompt's prefill: repeat the cache, not the prompt
        cache.batch_repeat_interleave(n)
        logits, mask, next_pos = (x.repeat_interleave(n, dim=0) for x in (logits, mask, next_pos))
    return cache, keyword, logits, mask, next_pos


def cache_keyword(model: nn.Module, out: Any) -> str:
    """The name of the KV cache in the model's forward and output: `cache` in transformers 5
    (whose old name, `past_key_values`, warns on every call and is removed in 5.40),
    `past_key_values` before it and in remote code written for it.

    The forward's signature decides; a forward that takes **kwargs only is asked through
    its output, which names the cache the way the model does.
    """
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return "cache" if "cache" in out else "past_key_values"


def keeps_logits(model: nn.Module) -> bool:
    # The prefill needs the last position only; a (B, T, V) logits tensor is the biggest
    # allocation of generation when the model can skip it.
    return "logits_to_keep" in inspect.signature(model.forward).parameters
