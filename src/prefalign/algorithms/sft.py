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

from prefalign.batches import SFTBatch
from prefalign.config import Section, option, option_like
from prefalign.data.collate import batch_columns
from prefalign.data.instructions import (
    collate_instructions,
    loss_mask,
    loss_token_count,
)
from prefalign.logprobs import CompletionLogps, LogpsModel
from prefalign.losses import nll_loss
from prefalign.masked import masked_mean
from prefalign.packing import PackedInputs, fallback_note, pack_sequences
from prefalign.train.config import TrainConfig
from prefalign.train.loop import Trainer, TrainResult
from prefalign.train.metrics import MetricWindow
from prefalign.train.run import Run
from prefalign.train.sections import OptimOptions


@dataclass(frozen=True)
class SFTOptions(Section):
    """The sft section: which tokens carry the loss, and packing."""

    SECTION = "sft"

    completion_only_loss: bool = option(
        True, "loss on completions (every assistant turn of `messages` rows) only; "
        "false = on every token, prompts included")
    packing: bool = option(
        False, "pack several examples into rows of up to max_length tokens (position ids "
        "restart, block-diagonal attention): less padding, the same loss")


@dataclass(frozen=True)
class SFTConfig(TrainConfig, SFTOptions):
    """`prefalign sft`: the shared trainer sections and the sft section."""

    COMMAND = "sft"
    # SFT moves further from the start than DPO does (TRL's SFTConfig uses 2e-5; LoRA
    # usually takes about ten times more).
    DEFAULT_LR = (2e-5, 2e-4)

    learning_rate: float | None = option_like(
        OptimOptions, "learning_rate", None,
        "peak learning rate; none = 2e-5 for full fine-tuning, 2e-4 with LoRA")


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

    def __init__(self, config: SFTConfig, pad_token_id: int, packing: bool | None = None) -> None:
        self.config = config
        self.pad_token_id = pad_token_id
        # What the run decided (run_sft falls back to padded rows for a model that cannot
        # take the block-diagonal mask); None = as configured.
        self.packing = config.packing if packing is None else packing

    def collate(self, features: list[dict[str, Any]]) -> SFTBatch:
        only = self.config.completion_only_loss
        if not self.packing:
            return collate_instructions(features, self.pad_token_id, only)
        sequences = [list(f["prompt_input_ids"]) + list(f["completion_input_ids"])
                     for f in features]
        masks = [loss_mask(f, only) for f in features]
        rows = pack_sequences(sequences, masks, self.pad_token_id, self.config.max_length)
        return SFTBatch(rows["input_ids"], rows["attention_mask"], rows["completion_mask"],
                        packed=PackedInputs.from_keys(rows), **batch_columns(features))

    def units(self, features: list[dict[str, Any]]) -> float:
        return float(sum(loss_token_count(f, self.config.completion_only_loss)
                         for f in features))

    def compute_loss(self, model: nn.Module, batch: SFTBatch) -> tuple[Tensor, dict]:
        out = model(*batch.inputs(), **batch.packed_kwargs())
        loss = nll_loss(out.token_logps, out.mask)
        metrics = {}
        top1 = getattr(out, "top1", None)
        if top1 is not None:
            metrics["token_accuracy"] = masked_mean(top1.float(), out.mask)
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


def run_sft(config: SFTConfig, accelerator: Accelerator | None = None) -> TrainResult:
    """`prefalign sft`: train, then write OUTPUT/final (and metrics.jsonl, config.yaml).

    OUTPUT/final is a PEFT adapter (LoRA) or an HF model directory (full fine-tuning); either
    is a valid `--model` for the next stage (dpo, kto, ppo). Dropout stays on, as in TRL's
    SFTTrainer (which has no switch for it); the later stages switch it off by default.
    """
    run = Run.open(config, accelerator)
    train, _ = run.load("sft", config.data)
    evals, _ = run.load("sft", config.eval_data, "eval_data")
    run.load_model()
    # A model that cannot take the block-diagonal mask trains on padded rows, logged.
    note = fallback_note(run.model, "packing") if config.packing else None
    if note:
        run.note(note)
    algorithm = SFT(config, run.tokenizer.pad_token_id, packing=config.packing and not note)
    policy = TopOneLogpsModel(run.model, chunk_size=config.logps_chunk_size)
    return run.fit(algorithm, train, evals, trainer_cls=SFTTrainer, model=policy)
