"""Scoring with a trained reward model: batched, gradient-free rewards of token sequences
(score_sequences) and of (prompt, response) pairs rendered as in reward training
(RewardScorer). Imported only when a reward model scores: it pulls in torch and the model
code, which rule scorers never need.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from prefalign.data.collate import pad_sequences
from prefalign.data.unpaired import normalize_unpaired_row, tokenize_unpaired
from prefalign.models import RewardModel, check_reward_model, load_reward_model, load_tokenizer


@torch.no_grad()
def score_sequences(model: RewardModel, sequences: list[list[int]], batch_size: int = 8,
                    autocast=None) -> list[float]:
    """Rewards of token-id sequences, right-padded in batches of similar length.

    Rows are sorted by length so a batch holds little padding; results come back in the
    order given. autocast: a context factory (the accelerator's) for mixed precision.
    """
    if not sequences:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = model.pad_token_id if model.pad_token_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = pad_sequences([list(sequences[i]) for i in rows], pad, "right", None)
            with autocast() if autocast else nullcontext():
                rewards = model(ids.to(device), mask.to(device))
            for i, r in zip(rows, rewards.float().cpu().tolist()):
                out[i] = r
    finally:
        model.train(was_training)
    return out


def pair_sequences(features: list[dict[str, Any]]) -> list[list[int]]:
    """[prompt+chosen for every pair] + [prompt+rejected for every pair], as training sees them."""
    return ([list(f["prompt_input_ids"]) + list(f["chosen_input_ids"]) for f in features]
            + [list(f["prompt_input_ids"]) + list(f["rejected_input_ids"]) for f in features])


class RewardScorer:
    """Batched, gradient-free scores of (prompt, response) pairs for other stages (PPO,
    best-of-N, evaluation). Responses are rendered exactly as in reward training: text
    gets EOS appended once, messages go through the chat template.

        scorer = RewardScorer("outputs/rm/final")
        scorer.score(["2 + 2 ="], [" 4"])  # -> [1.73]
    """

    def __init__(self, model: RewardModel | str | Path, tokenizer=None, batch_size: int = 8,
                 max_length: int | None = 1024, max_prompt_length: int | None = 512,
                 device: str | torch.device | None = None, trust_remote_code: bool = False,
                 chat_template: str | None = None, text_as_chat: bool = False):
        if not isinstance(model, RewardModel):
            # Refused before anything loads: a causal LM here would score with a random head.
            local = check_reward_model(model)
            tokenizer = tokenizer or load_tokenizer(str(local), trust_remote_code,
                                                    chat_template, text_as_chat)
            model = load_reward_model(model, tokenizer, trust_remote_code)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if tokenizer is None:
            raise ValueError("RewardScorer needs the tokenizer of an in-memory model")
        self.model = model if device is None else model.to(device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def tokenize(self, examples: list[dict]) -> list[list[int]]:
        """Normalised single-response examples (prompt, completion, origin) -> full ids."""
        features, _ = tokenize_unpaired(examples, self.tokenizer, self.max_length,
                                        self.max_prompt_length)
        return [f["prompt_input_ids"] + f["completion_input_ids"] for f in features]

    def score(self, prompts: list[str | list[dict]], responses: list[str | list[dict]]
              ) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        examples = [normalize_unpaired_row({"prompt": p, "completion": r, "label": True},
                                           f"<scorer> row {i}")
                    for i, (p, r) in enumerate(zip(prompts, responses))]
        return self.score_ids(self.tokenize(examples))

    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        return score_sequences(self.model, sequences, self.batch_size)

