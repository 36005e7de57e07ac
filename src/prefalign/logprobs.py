"""Per-token log-probabilities of completion tokens: the one routine behind every algorithm.

SFT, reward, DPO, KTO, PPO and evaluation all need log p(token | prefix) on completion
tokens only. A naive `log_softmax(logits).gather(...)` keeps a second full (B, T, V) fp32
tensor alive; here the LM head is applied to the hidden states of the scored positions
only, and each chunk of logits is reduced at once to "target logit minus logsumexp".

With `chunk_size` set, each chunk is wrapped in activation checkpointing, so the backward
pass also holds one chunk of logits at a time: peak memory no longer grows with
batch x length x vocabulary. Without it, the selected logits of the whole batch are
kept for backward (fastest: no recomputation), reduced a few rows at a time.

Per-token statistics (mean logit, entropy, whether the target is the argmax) are read off
the same fp32 chunk of logits, without gradients, so metrics cost no second LM-head pass.

Models whose logits are not a plain linear map of the last hidden state (logit
soft-capping, logit scaling) take the exact fallback: the model's own logits, reduced in
chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prefalign.packing import PackedInputs, attention_bias

# Config attributes that mean the LM head is not the whole story between hidden state
# and logits; such models go through their own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
# Without chunk_size, the logits of all scored tokens are kept for backward anyway, but
# they are reduced this many elements (rows x vocabulary) at a time, so the fp32
# temporaries of logsumexp and the statistics stay small next to what is kept.
_REDUCE_ELEMENTS = 1 << 25


def _default_rows(vocab: int) -> int:
    return max(1, _REDUCE_ELEMENTS // max(vocab, 1))


@dataclass
class CompletionLogps:
    """Log-probs of the completion tokens of a batch.

    token_logps (B, T) fp32: log p(input_ids[:, t] | input_ids[:, :t]) where `mask`, else 0.
    mask (B, T) bool: the scored tokens (completion tokens that are not position 0).
    logps (B,): sum of token_logps per sequence.  lengths (B,): number of scored tokens.
    mean_logits (B, T) / entropy (B, T): detached per-token statistics when asked for.
    hidden_states (B, T, H): the backbone's last hidden state when asked for (value heads).
    top1 (B, T) bool: where `mask`, the token is the argmax of the logits, when asked for.
    """

    token_logps: Tensor
    mask: Tensor
    logps: Tensor
    lengths: Tensor
    mean_logits: Tensor | None = None
    entropy: Tensor | None = None
    hidden_states: Tensor | None = None
    top1: Tensor | None = None


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counting real tokens only, so left and right padding agree."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _TargetLogProb(torch.autograd.Function):
    """(n, V) fp32 logits, (n,) targets -> (n,) log softmax(logits)[target], (n,) logsumexp.

    The same numbers as gather minus logsumexp, with a backward that holds one (n, V)
    temporary: d/dlogits = grad * (onehot(target) - softmax(logits)), built in place.
    Autograd's own backward of gather and logsumexp holds several at once, which set
    the peak memory of the whole step.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(lse)
        return picked - lse, lse

    @staticmethod
    def backward(ctx, grad: Tensor, _unused: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = (logits - lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits, None


def _reduce_chunk(logits: Tensor, targets: Tensor, stats: bool = False, top1: bool = False
                  ) -> tuple[Tensor, Tensor]:
    """(n, V) logits, (n,) targets -> (n,) fp32 log-probs and (n, k) detached columns:
    [mean logit, entropy] with stats, then [1.0 where the target is the argmax] with top1.

    The columns are read off the same fp32 chunk as the log-probs, so metrics need no
    second LM-head product.
    """
    logits = logits.float()
    logps, lse = _TargetLogProb.apply(logits, targets)
    columns = []
    with torch.no_grad():
        if stats:
            detached = logits.detach()
            # entropy = lse - sum(p * logits), p = exp(logits - lse): one temporary of the
            # chunk's size, built in place, and the lse the log-probs already computed.
            weighted = (detached - lse.unsqueeze(-1)).exp_().mul_(detached)
            columns += [detached.mean(-1), lse - weighted.sum(-1)]
        if top1:
            columns.append((logits.detach().argmax(-1) == targets).float())
    extra = torch.stack(columns, -1) if columns else logps.detach().new_zeros(len(logps), 0)
    return logps, extra


class _OnceStats:
    """One checkpointed chunk: statistics on the forward call only.

    Backward's recompute needs the log-probs alone; the statistics carry no gradient and
    were already returned, so recomputing them would only cost time.
    """

    def __init__(self, head, stats: bool, top1: bool) -> None:
        self.head, self.flags = head, (stats, top1)

    def __call__(self, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        flags, self.flags = self.flags, (False, False)
        return _reduce_chunk(self.head(h), t, *flags)


def _head_logps(
    hidden: Tensor,
    head,
    targets: Tensor,
    chunk_size: int | None,
    stats: bool,
    top1: bool,
    recompute: bool,
    vocab: int,
) -> tuple[Tensor, Tensor]:
    """(N, H) hidden states of scored positions -> (N,) log-probs, (N, k) statistics
    (see _reduce_chunk).

    recompute: checkpoint each chunk so backward rebuilds its logits instead of keeping them;
    the statistics are outputs of the same checkpointed chunk (without gradients).
    """
    n = hidden.shape[0]
    size = max(chunk_size or _default_rows(vocab), 1)
    pieces, columns = [], []
    for start in range(0, max(n, 1), size):
        h, t = hidden[start : start + size], targets[start : start + size]
        if recompute and h.requires_grad:
            logps, extra = checkpoint(_OnceStats(head, stats, top1), h, t, use_reentrant=False)
        else:
            logps, extra = _reduce_chunk(head(h), t, stats, top1)
        pieces.append(logps)
        columns.append(extra)
    return torch.cat(pieces), torch.cat(columns)


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


def _scored_mask(attention_mask: Tensor, completion_mask: Tensor,
                 packed: PackedInputs | None) -> Tensor:
    """(B, T) bool: completion tokens that have a prefix to be predicted from."""
    mask = completion_mask.bool() & attention_mask.bool()
    mask[:, 0] = False  # the first token has no prefix to be predicted from
    if packed is not None and packed.source is None:
        mask &= packed.position_ids != 0  # a packed sequence's first token, likewise
    return mask


def _model_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  packed: PackedInputs | None) -> dict[str, Tensor]:
    """The forward's keyword arguments: the padded batch, or the packed layout."""
    if packed is None:
        return dict(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask))
    return dict(input_ids=packed.input_ids, position_ids=packed.position_ids,
                attention_mask=attention_bias(model, packed.attention_mask))


def _tempered_head(lm_head: nn.Module, temperature: float):
    """The LM head with its logits divided by `temperature`."""
    if temperature == 1.0:
        return lm_head
    # Without a bias, dividing the (n, H) hidden states gives the same logits as
    # dividing the (n, V) logits, at a fraction of the cost.
    if getattr(lm_head, "bias", None) is None:
        return lambda h: lm_head(h / temperature)
    return lambda h: lm_head(h) / temperature


def _result(flat: Tensor, extra: Tensor, mask: Tensor, hidden: Tensor | None, stats: bool,
            top1: bool) -> CompletionLogps:
    """(N,) log-probs and (N, k) statistics of the scored tokens back in the (B, T) layout."""
    select = mask[:, 1:]
    shape = select.shape
    token_logps = _scatter(flat, select, shape)
    return CompletionLogps(
        token_logps=token_logps,
        mask=mask,
        logps=token_logps.sum(-1),
        lengths=mask.sum(-1).to(token_logps.dtype),
        mean_logits=_scatter(extra[:, 0], select, shape) if stats else None,
        entropy=_scatter(extra[:, 1], select, shape) if stats else None,
        hidden_states=hidden,
        top1=_scatter(extra[:, -1], select, shape).bool() if top1 else None,
    )


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int | None = None,
    stats: bool = False,
    top1: bool = False,
    return_hidden: bool = False,
    temperature: float = 1.0,
    packed: PackedInputs | None = None,
) -> CompletionLogps:
    """Log-probs of the completion tokens of (B, T) `input_ids` under `model`.

    completion_mask (B, T) bool marks the tokens to score (aligned with input_ids);
    position ids are derived from attention_mask so left padding gives the same result.
    temperature divides the logits (PPO scores samples drawn at that temperature).
    top1: also tell, per scored token, whether it is the argmax of the logits.
    packed: the model reads this layout instead (packing, prefix sharing; see
    prefalign.packing); the result is still in the layout of input_ids. hidden_states are
    then the model's own (R, S, H) layout.
    """
    mask = _scored_mask(attention_mask, completion_mask, packed)
    select = mask[:, 1:]
    targets = input_ids[:, 1:][select]
    inputs = _model_inputs(model, input_ids, attention_mask, packed)

    def scored(states: Tensor) -> Tensor:
        """(R, S, ...) model outputs -> (N, ...) at the positions predicting each target."""
        if packed is None or packed.source is None:
            return states[:, :-1][select]
        return states.flatten(0, 1)[packed.source[:, 1:][select]]

    if _uses_plain_head(model):
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        lm_head = model.get_output_embeddings()
        flat, extra = _head_logps(scored(hidden), _tempered_head(lm_head, temperature), targets,
                                  chunk_size, stats, top1, recompute=chunk_size is not None,
                                  vocab=lm_head.weight.shape[0])
    else:
        out = model(**inputs, use_cache=False, output_hidden_states=return_hidden)
        hidden = out.hidden_states[-1] if return_hidden else None
        flat, extra = _head_logps(scored(out.logits) / temperature, nn.Identity(), targets,
                                  chunk_size, stats, top1, recompute=False,
                                  vocab=out.logits.shape[-1])
    return _result(flat, extra, mask, hidden if return_hidden else None, stats, top1)


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
