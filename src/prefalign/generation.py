"""Batched sampling with a KV cache: on-policy rollouts (through generation_engine, whose
"hf" engine this is), best-of-N candidates, evaluation.

A hand-written decoding loop over the model's own forward (prefill once, then one token per
step with the KV cache the prefill returned) rather than `model.generate`, because it needs three things
generate does not give together: per-token log-probs of the sampled tokens, stop strings cut
at a documented point, and results that do not depend on how prompts are grouped.

Randomness (token_sampling): row (prompt i, candidate j) draws its noise from its own
generator seeded by (seed, i, j) only, never from the global RNG.

Left padding. Prompts are left-padded (data.collate.collate_prompts); position ids count
real tokens only (`position_ids_from_mask`), so a padded prompt sees the positions it would
see alone, and pad columns are masked out of attention. Rows that finish are dropped from
the batch (and the cache). Grouping and dropping change batch shapes, hence float rounding
(~1e-6 in log-probs), never which noise a row uses: tokens agree unless a uniform falls
within rounding of a CDF step.

Where a response ends (TRL's PPO truncates after the stop token; the same rule here):
  EOS          response_ids end with the EOS token; text leaves it out (special tokens
               are skipped). finish_reason "eos".
  stop string  response_ids end with the token that completes the first occurrence of a
               stop string (that token may carry characters past it); text is cut just
               before the stop string. finish_reason "stop". Stop strings match the text
               decoded without special tokens; a stop string that is itself a special token
               ("<|im_end|>") acts as a stop token id.
  neither      max_new_tokens reached: finish_reason "length", finished False (PPO
               penalises responses without EOS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefalign.config import Section, option, require
from prefalign.data.chat import prompt_messages, require_chat_template, text_as_chat
from prefalign.data.tokenize import apply_template, tokenizer_adds_bos
from prefalign.decoding import eval_mode, prefill
from prefalign.errors import DataError
from prefalign.token_sampling import filter_logits, row_uniforms, sample_tokens

Prompt = str | Sequence[dict] | Sequence[int]


@dataclass(frozen=True)
class SamplingOptions(Section):
    """The sampling section of a command's config: the one declaration of each sampling
    option (flag, YAML key, default, help and valid range). A command's config composes it
    by inheritance (config.option_like redeclares a default: PPO samples shorter);
    `SamplingConfig.of(config, seed=..., n=..., batch_size=...)` makes what `generate`
    takes. seed, n and batch_size are not options here: a command's config has fields of
    those names with meanings of its own (a trainer's batch_size counts rows).
    """

    SECTION = "sampling"

    max_new_tokens: int = option(128, "tokens per response at most")
    temperature: float = option(1.0, "sampling temperature; 0 = greedy (top_p and top_k "
                                "are then ignored)")
    top_p: float = option(1.0, "nucleus sampling: keep the most probable tokens up to this "
                          "probability mass")
    top_k: int | None = option(None, "sample among the k most probable tokens only; none = all")
    stop_strings: list[str] = option([], "end a response at the first of these strings")

    def validate(self) -> None:
        check_sampling(self)
        super().validate()


# option -> (is the value valid, the rule a bad value breaks)
_RULES: dict[str, tuple[Any, str]] = {
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v is None or v >= 1, "must be none or >= 1"),
    "stop_strings": (lambda v: all(isinstance(s, str) and s for s in v),
                     "must be a list of non-empty strings"),
}


def check_sampling(config: Any) -> None:
    """ConfigError naming the first sampling option of `config` out of its range (a config
    that declares some of them through option_like is checked on those)."""
    for name, (ok, rule) in _RULES.items():
        if hasattr(config, name):
            value = getattr(config, name)
            require(ok(value), name, f"{rule}, got {value!r}")


@dataclass(frozen=True)
class SamplingConfig(SamplingOptions):
    """How `generate` samples: the sampling options, plus n candidates per prompt, the seed
    of their noise, and batch_size prompts per forward batch (batch_size * n rows).
    eos_token_ids: None means the tokenizer's EOS plus the model's generation_config EOS ids.
    """

    seed: int = 0
    n: int = 1
    batch_size: int = 8
    eos_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        super().validate()
        require(self.n >= 1, "n", f"must be >= 1, got {self.n!r}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size!r}")

    @classmethod
    def of(cls, section: Any, **runtime: Any) -> SamplingConfig:
        """The sampling options `section` has (a config composing SamplingOptions, or one
        redeclaring a few with option_like: the others keep their defaults), with seed, n
        and batch_size."""
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(SamplingOptions)
                  if hasattr(section, f.name)}
        return cls(**values, **runtime)

    @property
    def num_return_sequences(self) -> int:
        """HF's name for `n`."""
        return self.n


@dataclass
class Generation:
    """One sampled response. logprobs[k] = log p(response_ids[k] | prefix) under
    softmax(logits / temperature) over the full vocabulary (temperature 1 when greedy):
    what `completion_logps(..., temperature=T)` recomputes. top-k/top-p are not applied
    to it, as in TRL's PPO."""

    prompt_index: int
    candidate: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    finished: bool  # ended with EOS or a stop string, not by max_new_tokens


def next_tokens(logits: Tensor, uniforms: Tensor, cfg: SamplingConfig) -> tuple[Tensor, Tensor]:
    """(B, V) last-position logits -> (B,) tokens and their (B,) fp32 log-probs (see Generation)."""
    logits = logits.float()
    if cfg.temperature == 0:
        scaled = logits
        tokens = logits.argmax(dim=-1)
    else:
        scaled = logits / cfg.temperature
        tokens = sample_tokens(filter_logits(scaled, cfg.top_k, cfg.top_p), uniforms)
    logps = scaled.gather(-1, tokens[:, None]).squeeze(-1) - scaled.logsumexp(dim=-1)
    return tokens, logps


def render_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Prompt ids, rendered as data.tokenize renders prompts.

    str: tokenized without special tokens, with BOS in front if the tokenizer adds one; with
    --text-as-chat (data.chat) a user turn (or an HH transcript's turns) rendered as below.
    list of message dicts: chat template with the generation prompt (it writes its own BOS).
    list of ints: taken as already tokenized.
    """
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    texts: dict[int, str] = {}
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        kind = _prompt_kind(prompt)
        if kind is None:
            raise DataError(f"prompt {i}: expected a string, a list of chat messages or a list "
                            f"of token ids, got {type(prompt).__name__} {str(prompt)[:60]!r}")
        if kind == "text" and text_as_chat(tokenizer):
            prompt, kind = prompt_messages(prompt, f"prompt {i}"), "chat"
        if kind == "chat":
            require_chat_template(tokenizer, f"prompt {i}")
            # A template that raises (the model's own, too) is one line naming the prompt.
            texts[i] = apply_template(tokenizer, list(prompt), f"prompt {i}",
                                      add_generation_prompt=True)
        elif kind == "text":
            texts[i] = prompt
        out.append(list(prompt) if kind == "ids" else list(bos) if kind == "text" else [])
    if texts:  # one batched call: the fast tokenizer encodes the list in Rust
        encoded = tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]
        for i, ids in zip(texts, encoded):
            out[i].extend(ids)
    for i, ids in enumerate(out):
        if not ids:
            raise DataError(f"prompt {i} renders to no tokens; there is nothing to continue")
    return out


def _prompt_kind(prompt: Any) -> str | None:
    """"text", "chat", "ids", or None for anything else (an empty list included)."""
    if isinstance(prompt, str):
        return "text"
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return None
    if all(isinstance(m, dict) for m in prompt):
        return "chat"
    return "ids" if all(isinstance(t, int) for t in prompt) else None


def _stop_cut(tokenizer: Any, ids: list[int], stops: list[str], window: int) -> str | None:
    """The response text cut before its first stop string if the last token completed one."""
    if not any(s in tokenizer.decode(ids[-window:], skip_special_tokens=True) for s in stops):
        return None
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else None


def _eos_ids(model: nn.Module, tokenizer: Any, cfg: SamplingConfig) -> set[int]:
    if cfg.eos_token_ids is not None:
        return set(cfg.eos_token_ids)
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {i for i in ids if i is not None}


class _Responses:
    """The growing responses of R rows, and why each one ended."""

    def __init__(self, rows: int, tokenizer: Any, cfg: SamplingConfig, eos_ids: set[int],
                 stop_ids: set[int]) -> None:
        self.tokenizer, self.stops, self.eos_ids, self.stop_ids = (
            tokenizer, cfg.stop_strings, eos_ids, stop_ids)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.logps: list[list[float]] = [[] for _ in range(rows)]
        self.reasons = ["length"] * rows
        self.texts: list[str | None] = [None] * rows
        # A stop string of L bytes lies within the last L tokens (each decodes to >= 1 byte);
        # a few more cover tokens that decode to nothing.
        self.window = max((len(s.encode()) for s in self.stops), default=0) + 4

    def add(self, row: int, token: int, logp: float) -> bool:
        """Append one sampled token to `row`; True when that ends the response."""
        self.tokens[row].append(token)
        self.logps[row].append(logp)
        if token in self.eos_ids or token in self.stop_ids:
            self.reasons[row] = "eos" if token in self.eos_ids else "stop"
        elif self.stops:
            self.texts[row] = _stop_cut(self.tokenizer, self.tokens[row], self.stops, self.window)
            if self.texts[row] is not None:
                self.reasons[row] = "stop"
        return self.reasons[row] != "length"

    def text(self, row: int) -> str:
        cut = self.texts[row]
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True) if cut is None else cut


def _generate_batch(
    model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]], indices: list[int],
    cfg: SamplingConfig, eos_ids: set[int], stop_ids: set[int],
) -> list[Generation]:
    """Sample cfg.n responses for each of P prompts; returns P * n Generations, candidates
    of a prompt together. A <= P * n rows stay active: finished rows leave the batch."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cache, keyword, logits, mask, next_pos = prefill(model, prompt_ids, pad, cfg.n)
    keys = [(i, j) for i in indices for j in range(cfg.n)]
    uniforms = row_uniforms(cfg.seed, keys, cfg.max_new_tokens).to(mask.device)  # (A, steps)
    rows = _Responses(len(keys), tokenizer, cfg, eos_ids, stop_ids)
    active = list(range(len(keys)))  # the row of each active batch position
    for step in range(cfg.max_new_tokens):
        picked, picked_logps = next_tokens(logits, uniforms[:, step], cfg)
        keep = [a for a, (tok, lp) in enumerate(zip(picked.tolist(), picked_logps.tolist()))
                if not rows.add(active[a], tok, lp)]
        if not keep or step == cfg.max_new_tokens - 1:
            break
        if len(keep) < len(active):
            idx = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(idx)
            mask, next_pos, uniforms, picked = mask[idx], next_pos[idx], uniforms[idx], picked[idx]
            active = [active[a] for a in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        out = model(input_ids=picked[:, None], attention_mask=mask, position_ids=next_pos,
                    use_cache=True, **{keyword: cache})
        logits, next_pos = out.logits[:, -1], next_pos + 1
    return [
        Generation(prompt_index=i, candidate=j, prompt_ids=prompt_ids[r // cfg.n],
                   response_ids=rows.tokens[r], logprobs=rows.logps[r], text=rows.text(r),
                   finish_reason=rows.reasons[r], finished=rows.reasons[r] != "length")
        for r, (i, j) in enumerate(keys)
    ]


def _split_stops(tokenizer: Any, stops: list[str]) -> tuple[set[int], list[str]]:
    """(token ids, strings): a stop string that is a special token never shows in the text
    decoded without special tokens, so it is matched as a token id instead."""
    special = set(getattr(tokenizer, "all_special_tokens", []))
    ids = {tokenizer.convert_tokens_to_ids(s) for s in stops if s in special}
    return ids, [s for s in stops if s not in special]


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], sampling: SamplingConfig,
    progress: bool | None = None, seed_indices: Sequence[int] | None = None,
) -> list[Generation]:
    """Sample sampling.n responses per prompt; returns len(prompts) * n Generations in the
    order (prompt 0, candidate 0), (prompt 0, candidate 1), ..., (prompt 1, candidate 0), ...

    Runs in eval mode (restored afterwards), without grad, on the model's device; LoRA
    adapters apply unless the call sits inside `disable_adapters(model)`. Prompts are
    grouped longest first, sampling.batch_size at a time, to waste little on padding: the
    grouping never changes a result (see the module docstring). progress: a tqdm bar over
    prompts; None shows it when there is more than one batch. seed_indices: the index each
    prompt's noise is keyed by (default its position), so that a subset of a prompt set
    samples exactly what the whole set would; Generation.prompt_index reports it.
    """
    cfg = sampling
    prompt_ids = render_prompts(tokenizer, prompts)
    eos_ids = _eos_ids(model, tokenizer, cfg)
    stop_ids, stop_strings = _split_stops(tokenizer, cfg.stop_strings)
    cfg = replace(cfg, stop_strings=stop_strings)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    batches = [order[k : k + cfg.batch_size] for k in range(0, len(order), cfg.batch_size)]
    results: list[Generation | None] = [None] * (len(prompt_ids) * cfg.n)
    show = len(batches) > 1 if progress is None else progress
    keys = list(seed_indices) if seed_indices is not None else list(range(len(prompt_ids)))
    if len(keys) != len(prompt_ids) or len(set(keys)) != len(keys):
        raise ValueError("seed_indices must give one distinct index per prompt")
    position = {key: i for i, key in enumerate(keys)}
    with eval_mode(model), tqdm(total=len(prompt_ids), desc="generate", unit="prompt",
                                 disable=not show) as bar:
        for indices in batches:
            chunk = [prompt_ids[i] for i in indices]
            chunk_keys = [keys[i] for i in indices]
            for g in _generate_batch(model, tokenizer, chunk, chunk_keys, cfg, eos_ids, stop_ids):
                results[position[g.prompt_index] * cfg.n + g.candidate] = g
            bar.update(len(indices))
    return results  # type: ignore[return-value]


def collate_generations(generations: Sequence[Generation], pad_token_id: int) -> dict[str, Tensor]:
    """Generations -> a batch laid out like completion_logps' inputs and outputs.

    input_ids (B, P + R): prompt left-padded to P, response right-padded to R;
    attention_mask (B, P + R) long; completion_mask (B, P + R) bool on response tokens;
    token_logps (B, P + R) fp32: the sampled log-probs on response tokens, else 0, so it
    lines up with `completion_logps(...).token_logps`.
    """
    P = max(len(g.prompt_ids) for g in generations)
    R = max(len(g.response_ids) for g in generations)
    B = len(generations)
    input_ids = torch.full((B, P + R), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    completion_mask = torch.zeros((B, P + R), dtype=torch.bool)
    token_logps = torch.zeros((B, P + R), dtype=torch.float32)
    for b, g in enumerate(generations):
        start, end = P - len(g.prompt_ids), P + len(g.response_ids)
        input_ids[b, start:end] = torch.tensor(g.prompt_ids + g.response_ids)
        attention_mask[b, start:end] = 1
        completion_mask[b, P:end] = True
        token_logps[b, P:end] = torch.tensor(g.logprobs, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask, "token_logps": token_logps}
