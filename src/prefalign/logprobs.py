"""Per-token log-probabilities of completion tokens: the one routine behind every algorithm.

SFT, reward, DPO, KTO, PPO and evaluation all need log p(token | prefix) on completion
tokens only. A naive `log_softmax(logits).gather(...)` keeps a second full (B, T, V) fp32
tensor alive; here the LM head is applied to the hidden states of the scored positions
only, and each chunk of logits is reduced at once to "target logit minus logsumexp".

With `chunk_size` set, each chunk is wrapped in activation checkpointing, so the backward
pass also holds one chunk of logits at a time: peak memory no longer grows with
batch x length x vocabulary. Without it, the selected logits of the whole batch are
kept for backward (fastest when the vocabulary is small).

Models whose logits are not a plain linear map of the last hidden state (logit
soft-capping, logit scaling) take the exact fallback: the model's own logits, reduced in
chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Config attributes that mean the LM head is not the whole story between hidden state
# and logits; such models go through their own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
_FALLBACK_CHUNK = 4096


@dataclass
class CompletionLogps:
    """Log-probs of the completion tokens of a batch.

    token_logps (B, T) fp32: log p(input_ids[:, t] | input_ids[:, :t]) where `mask`, else 0.
    mask (B, T) bool: the scored tokens (completion tokens that are not position 0).
    logps (B,): sum of token_logps per sequence.  lengths (B,): number of scored tokens.
    mean_logits (B, T) / entropy (B, T): detached per-token statistics when asked for.
    hidden_states (B, T, H): the backbone's last hidden state when asked for (value heads).
    """

    token_logps: Tensor
    mask: Tensor
    logps: Tensor
    lengths: Tensor
    mean_logits: Tensor | None = None
    entropy: Tensor | None = None
    hidden_states: Tensor | None = None


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counting real tokens only, so left and right padding agree."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _reduce_chunk(logits: Tensor, targets: Tensor) -> Tensor:
    """(n, V) logits, (n,) targets -> (n,) fp32 log-probs; one fp32 chunk at a time."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def _chunk_stats(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Mean logit and entropy per row of (n, V) logits, for metrics only."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return logits.mean(-1), -(logp.exp() * logp).sum(-1)


def _head_logps(
    hidden: Tensor,
    head,
    targets: Tensor,
    chunk_size: int | None,
    stats: bool,
    recompute: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(N, H) hidden states of scored positions -> (N,) log-probs (+ optional stats).

    recompute: checkpoint each chunk so backward rebuilds its logits instead of keeping them.
    """

    def reduce(h: Tensor, t: Tensor) -> Tensor:
        return _reduce_chunk(head(h), t)

    n = hidden.shape[0]
    size = max(chunk_size or n, 1)
    pieces, means, ents = [], [], []
    for start in range(0, max(n, 1), size):
        h, t = hidden[start : start + size], targets[start : start + size]
        if recompute and h.requires_grad:
            pieces.append(checkpoint(reduce, h, t, use_reentrant=False))
            logits = head(h.detach()) if stats else None
        else:
            logits = head(h)
            pieces.append(_reduce_chunk(logits, t))
        if stats:
            m, e = _chunk_stats(logits.detach())
            means.append(m)
            ents.append(e)
    cat = torch.cat
    return cat(pieces), (cat(means) if stats else None), (cat(ents) if stats else None)


def _uses_plain_head(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        return False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    base = getattr(model, "base_model", None)
    return base is not None and base is not model and model.get_output_embeddings() is not None


def _scatter(values: Tensor, select: Tensor, shape: torch.Size) -> Tensor:
    """Place (N,) values at the True positions of (B, T-1) `select`; pad column 0 -> (B, T)."""
    out = values.new_zeros(shape).masked_scatter(select, values)
    return torch.nn.functional.pad(out, (1, 0))


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int | None = None,
    stats: bool = False,
    return_hidden: bool = False,
    temperature: float = 1.0,
) -> CompletionLogps:
    """Log-probs of the completion tokens of (B, T) `input_ids` under `model`.

    completion_mask (B, T) bool marks the tokens to score (aligned with input_ids);
    position ids are derived from attention_mask so left padding gives the same result.
    temperature divides the logits (PPO scores samples drawn at that temperature).
    """
    mask = completion_mask.bool() & attention_mask.bool()
    mask[:, 0] = False  # the first token has no prefix to be predicted from
    select = mask[:, 1:]
    targets = input_ids[:, 1:][select]
    position_ids = position_ids_from_mask(attention_mask)
    plain = _uses_plain_head(model)
    if plain:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state
        lm_head = model.get_output_embeddings()
        head = lm_head if temperature == 1.0 else (lambda h: lm_head(h) / temperature)
        flat, means, ents = _head_logps(hidden[:, :-1][select], head, targets, chunk_size,
                                        stats, recompute=chunk_size is not None)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, output_hidden_states=return_hidden)
        hidden = out.hidden_states[-1] if return_hidden else None
        logits = out.logits[:, :-1][select] / temperature
        flat, means, ents = _head_logps(logits, nn.Identity(), targets,
                                        chunk_size or _FALLBACK_CHUNK, stats, recompute=False)
    shape = select.shape
    token_logps = _scatter(flat, select, shape)
    return CompletionLogps(
        token_logps=token_logps,
        mask=mask,
        logps=token_logps.sum(-1),
        lengths=mask.sum(-1).to(token_logps.dtype),
        mean_logits=_scatter(means, select, shape) if stats else None,
        entropy=_scatter(ents, select, shape) if stats else None,
        hidden_states=hidden if return_hidden else None,
    )


class LogpsModel(nn.Module):
    """A causal LM whose forward returns `CompletionLogps`.

    Trainers prepare this wrapper (DDP, FSDP) instead of the bare model, so the backbone
    + chunked LM head path runs inside the wrapped module's forward, where data-parallel
    engines expect every forward to happen.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                **kwargs) -> CompletionLogps:
        kwargs.setdefault("chunk_size", self.chunk_size)
        return completion_logps(self.model, input_ids, attention_mask, completion_mask, **kwargs)
