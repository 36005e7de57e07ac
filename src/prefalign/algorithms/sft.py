"""SFT: supervised fine-tuning, the token-level mean negative log-likelihood of completions.

loss = -sum(log p(token | prefix) over loss tokens) / (number of loss tokens), where the loss
tokens are the completion tokens (every assistant turn of a `messages` row; see
data.instructions) or, with completion_only_loss off, every token. This is TRL 1.16's
SFTTrainer loss (its per-token mean over labels != -100).

`units` is the number of loss tokens, so the loop weights each micro-batch by its share of
the step's tokens: accumulated or multi-process steps give the exact token mean of the whole
step, as one large batch would, however the completion lengths differ between micro-batches.

Metrics: `loss`, `token_accuracy` (share of loss tokens whose target is the argmax of the
logits) and `perplexity`. Perplexity is exp of the logged window's token-mean loss, not a
mean of per-micro-batch exp(loss): that mean would depend on how the step is split into
micro-batches and overstate the perplexity (Jensen's inequality).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator
from torch import Tensor, nn

from prefalign.algorithms.runner import Run, data_options, finish_run, load_policy, open_run
from prefalign.config import option
from prefalign.data.instructions import (
    collate_instructions,
    load_instructions,
    loss_mask,
    loss_token_count,
)
from prefalign.logprobs import CompletionLogps, LogpsModel
from prefalign.losses import nll_loss
from prefalign.packing import fallback_note, pack_sequences, packed_kwargs
from prefalign.train.config import TrainConfig
from prefalign.train.loop import Trainer, TrainResult
from prefalign.train.metrics import MetricWindow


@dataclass
class SFTConfig(TrainConfig):
    # Redeclared for its default: SFT moves further from the start than DPO does (TRL's
    # SFTConfig uses 2e-5; LoRA usually takes about ten times more).
    learning_rate: float | None = option(
        None, "peak learning rate; none = 2e-5 for full fine-tuning, 2e-4 with LoRA")
    completion_only_loss: bool = option(
        True, "loss on completions (every assistant turn of `messages` rows) only; "
        "false = on every token, prompts included")
    packing: bool = option(
        False, "pack several examples into rows of up to max_length tokens (position ids "
        "restart, block-diagonal attention): less padding, the same loss")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.lora_r > 0 else 2e-5


class TopOneLogpsModel(LogpsModel):
    """A LogpsModel that also tells, per scored token, whether it is the model's argmax.

    The argmax is read off the chunks of logits the log-probs are computed from, inside
    forward (so data-parallel wrappers see every use of the weights there), at no extra
    LM-head cost.
    """

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                **kwargs) -> CompletionLogps:
        kwargs.setdefault("top1", True)
        return super().forward(input_ids, attention_mask, completion_mask, **kwargs)


class SFT:
    """compute_loss for SFT: the token mean NLL over the batch's loss tokens."""

    progress_keys = ("token_accuracy",)

    def __init__(self, config: SFTConfig, pad_token_id: int) -> None:
        self.config = config
        self.pad_token_id = pad_token_id

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        only = self.config.completion_only_loss
        if not self.config.packing:
            return collate_instructions(features, self.pad_token_id, only)
        sequences = [list(f["prompt_input_ids"]) + list(f["completion_input_ids"])
                     for f in features]
        masks = [loss_mask(f, only) for f in features]
        return pack_sequences(sequences, masks, self.pad_token_id, self.config.max_length)

    def units(self, features: list[dict[str, Any]]) -> float:
        return float(sum(loss_token_count(f, self.config.completion_only_loss)
                         for f in features))

    def compute_loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict]:
        out = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                    **packed_kwargs(batch))
        loss = nll_loss(out.token_logps, out.mask)
        metrics = {}
        top1 = getattr(out, "top1", None)
        if top1 is not None:
            n = out.mask.sum().clamp(min=1)
            metrics["token_accuracy"] = (top1 & out.mask).sum() / n
        return loss, metrics


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


class PerplexityWindow(MetricWindow):
    """Adds `perplexity` = exp(the window's token-mean loss) to the window's means."""

    def means(self) -> dict[str, float]:
        means = super().means()
        if "loss" in means:
            means["perplexity"] = _exp(means["loss"])
        return means


class SFTTrainer(Trainer):
    """The loop, logging perplexity for training windows and evaluations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.window = PerplexityWindow()

    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate()
        if "eval/loss" in metrics:
            metrics["eval/perplexity"] = _exp(metrics["eval/loss"])
        return metrics


def load_examples(source: str, run: Run, key: str) -> list[dict[str, Any]]:
    """Instruction features for training or evaluation, with a one-line data report."""
    c = run.config
    features, report = load_instructions(source, run.tokenizer, max_length=c.max_length,
                                         max_prompt_length=c.max_prompt_length, strict=c.strict,
                                         **data_options(run, key))
    run.print(f"{key}: {report.describe()}")
    return features


def run_sft(config: SFTConfig, accelerator: Accelerator | None = None) -> TrainResult:
    """`prefalign sft`: train, then write OUTPUT/final (and metrics.jsonl, config.yaml).

    OUTPUT/final is a PEFT adapter (LoRA) or an HF model directory (full fine-tuning); either
    is a valid `--model` for the next stage (dpo, kto, ppo). Dropout stays on, as in TRL's
    SFTTrainer (which has no switch for it); the later stages switch it off by default.
    """
    run = open_run(config, accelerator)
    train = load_examples(config.data, run, "data")
    evals = load_examples(config.eval_data, run, "eval_data") if config.eval_data else []
    load_policy(run)
    note = fallback_note(run.model, "packing") if config.packing else None
    if note:
        run.print(note)
        config.packing = False
    policy = TopOneLogpsModel(run.model, chunk_size=config.logps_chunk_size)
    algorithm = SFT(config, run.tokenizer.pad_token_id)
    trainer = SFTTrainer(config, policy, algorithm, train, evals, run.accelerator)
    result = trainer.train()
    finish_run(run)
    return result
