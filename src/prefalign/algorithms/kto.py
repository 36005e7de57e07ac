"""KTO: preference optimisation from unpaired thumbs-up / thumbs-down completions.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv:2402.01306. Each step scores, for a batch of (prompt, completion, label) rows:
  policy log-probs of the completions                     (with gradients)
  policy log-probs of mismatched pairs (the KL batch)     (no gradients, as TRL 1.16)
  reference log-probs of both                             (no gradients)
z0 = max(0, mean(policy - reference) over the KL batch) is the reference point of Eq. 7;
the losses are `losses.kto_loss`. The reference is, as for DPO, the policy with its LoRA
adapters disabled, a frozen copy of the starting model, or `ref_model`.

The KL estimate is per micro-batch, as in TRL, so accumulating 8 micro-batches of 1 is not
the same as one batch of 8 (and a single row pairs with its own completion): batch_size
must be at least 2. Under data parallelism the KL batches of every process's share of a
micro-batch are gathered, so z0 is one estimate per global micro-batch, as in TRL; the
mismatched pairs are still formed within each share, so P processes of batch B pair other
completions than one process of batch P x B, and the two runs agree only until z0 > 0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from prefalign.algorithms.reference import ReferenceScorer
from prefalign.algorithms.runner import (
    Run,
    data_options,
    finish_run,
    load_frozen,
    load_policy,
    open_run,
)
from prefalign.config import option, require
from prefalign.data.unpaired import collate_unpaired, load_unpaired, weight_balance_note
from prefalign.logprobs import CompletionLogps, LogpsModel
from prefalign.losses import kto_kl_estimate, kto_loss, weighted_mean
from prefalign.train.config import TrainConfig
from prefalign.train.loop import STAND_IN, Trainer, TrainResult

# (local values (B,)) -> the values of every process, concatenated; identity on one process.
Gather = Callable[[Tensor], Tensor]


@dataclass
class KTOConfig(TrainConfig):
    beta: float = option(0.1, "strength of the KL penalty toward the reference")
    desirable_weight: float = option(
        1.0, "loss weight of desirable (label true) rows; see the balance hint at start")
    undesirable_weight: float = option(1.0, "loss weight of undesirable (label false) rows")
    ref_model: str | None = option(None, "reference model dir; none = the starting model")
    disable_dropout: bool = option(
        True, "switch off every dropout (the model's and LoRA's), so that policy and "
        "reference log-probs differ by the weights only, as TRL's KTOTrainer does by default")

    def validate(self) -> None:
        super().validate()
        require(self.beta > 0, "beta", "must be > 0")
        require(self.desirable_weight > 0, "desirable_weight", "must be > 0")
        require(self.undesirable_weight > 0, "undesirable_weight", "must be > 0")
        # With one row the mismatched pair is the row itself and z0 becomes its own reward.
        require(self.batch_size >= 2, "batch_size",
                "must be >= 2: the KL estimate pairs each prompt with another row's completion")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


class KTO:
    """compute_loss for KTO.

    reference: scores a batch under the reference model (see algorithms.reference).
    gather: concatenates the KL batch's log-probs of all processes during training, so z0
    is one estimate over the global batch as in TRL; None on one process.
    """

    progress_keys = ("kl", "rewards/margins")

    def __init__(self, config: KTOConfig, pad_token_id: int, reference: ReferenceScorer,
                 gather: Gather | None = None) -> None:
        self.config = config
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.gather = gather

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_unpaired(features, self.pad_token_id, self.config.max_length)

    def units(self, features: list[dict[str, Any]]) -> float:
        # The loss is a weighted mean over rows: weight 2 counts like the row repeated.
        return float(sum(f.get("weight", 1.0) for f in features))

    def kl(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        """z0 from the KL batch: policy and reference log-probs, both without gradients."""
        inputs = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])
        with torch.no_grad():
            policy = model(*inputs).logps
        ref = self.reference(model, *inputs)
        # Only training steps gather: evaluation needs no global z0 (its loss is a report).
        if self.gather is not None and model.training:
            if batch.get(STAND_IN):
                # A zero-weight stand-in (the loop's, see train.loop) still takes part in
                # the gather, so every process calls it equally often, but adds no rows.
                policy, ref = policy[:0], ref[:0]
            policy, ref = self.gather(policy), self.gather(ref)
        return kto_kl_estimate(policy, ref)

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict]:
        c = self.config
        kl = self.kl(model, batch)  # first, as TRL does: same dropout draws in the same order
        inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        out: CompletionLogps = model(*inputs, stats=True)
        ref = self.reference(model, *inputs).to(out.logps)
        labels = batch["label"].bool()
        losses, rewards = kto_loss(out.logps, ref, labels, kl, c.beta, c.desirable_weight,
                                   c.undesirable_weight)
        loss = weighted_mean(losses, batch.get("weight"))
        return loss, self._metrics(out, rewards, labels, kl)

    @staticmethod
    def _metrics(out: CompletionLogps, rewards: Tensor, labels: Tensor, kl: Tensor) -> dict:
        """TRL's KTO metrics. A side absent from the micro-batch is left out rather than
        logged as 0, so the logged mean covers only micro-batches that had such rows."""
        metrics: dict[str, Tensor] = {"kl": kl}
        logps = out.logps.detach()
        for name, rows in (("chosen", labels), ("rejected", ~labels)):
            if rows.any():
                metrics[f"rewards/{name}"] = rewards[rows].mean()
                metrics[f"logps/{name}"] = logps[rows].mean()
                metrics[f"logits/{name}"] = _masked_mean(out.mean_logits[rows], out.mask[rows])
        if labels.any() and not labels.all():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


def gather_across_processes(accelerator: Accelerator) -> Gather:
    """A Gather for `accelerator`: pads each process's (B_r,) values to the largest B_r,
    gathers, then drops the padding, so uneven micro-batches still give every row once."""

    def gather(values: Tensor) -> Tensor:
        sizes = accelerator.gather(torch.tensor([values.shape[0]], device=values.device))
        padded = accelerator.pad_across_processes(values, dim=0)
        everything = accelerator.gather(padded)
        width = padded.shape[0]
        return torch.cat([everything[r * width : r * width + int(n)]
                          for r, n in enumerate(sizes.tolist())])

    return gather


def load_examples(source: str, run: Run, key: str) -> tuple[list[dict[str, Any]], Any]:
    """Unpaired features for training or evaluation, with a one-line data report."""
    c = run.config
    features, report = load_unpaired(source, run.tokenizer, max_length=c.max_length,
                                     max_prompt_length=c.max_prompt_length, strict=c.strict,
                                     **data_options(run, key))
    run.print(f"{key}: {report.describe()}")
    return features, report


def run_kto(config: KTOConfig, accelerator: Accelerator | None = None) -> TrainResult:
    """`prefalign kto`: train, then write OUTPUT/final (and metrics.jsonl, config.yaml)."""
    run = open_run(config, accelerator)
    train, report = load_examples(config.data, run, "data")
    evals = load_examples(config.eval_data, run, "eval_data")[0] if config.eval_data else []
    load_policy(run)
    note = weight_balance_note(report.desirable, report.undesirable, config.desirable_weight,
                               config.undesirable_weight)
    if note:
        run.print(f"note: {note}")

    if config.ref_model:
        reference = ReferenceScorer(load_frozen(config.ref_model, run), config.logps_chunk_size)
    elif not run.is_lora:
        reference = ReferenceScorer(copy.deepcopy(run.model), config.logps_chunk_size)
    else:
        reference = ReferenceScorer(None)  # the policy with its adapters disabled
    reference.prepare(run.accelerator)
    policy = LogpsModel(run.model, chunk_size=config.logps_chunk_size)
    multi = run.accelerator.num_processes > 1
    gather = gather_across_processes(run.accelerator) if multi else None
    algorithm = KTO(config, run.tokenizer.pad_token_id, reference, gather)
    trainer = Trainer(config, policy, algorithm, train, evals, run.accelerator)
    result = trainer.train()
    finish_run(run)
    return result
