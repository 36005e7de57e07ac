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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from prefalign.algorithms.reference import Reference, make_reference
from prefalign.batches import UnpairedBatch
from prefalign.config import Section, option, require
from prefalign.data.unpaired import collate_unpaired, weight_balance_note
from prefalign.logprobs import CompletionLogps
from prefalign.losses import kto_kl_estimate, kto_loss, weighted_mean
from prefalign.masked import masked_mean
from prefalign.train.config import TrainConfig
from prefalign.train.loop import TrainResult
from prefalign.train.run import Run
from prefalign.train.sections import ReferenceOptions

# (local values (B,)) -> the values of every process, concatenated; identity on one process.
Gather = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class KTOOptions(Section):
    """The kto section: the loss weights of desirable and undesirable rows."""

    SECTION = "kto"

    beta: float = option(0.1, "strength of the KL penalty toward the reference")
    desirable_weight: float = option(
        1.0, "loss weight of desirable (label true) rows; see the balance hint at start")
    undesirable_weight: float = option(1.0, "loss weight of undesirable (label false) rows")
    disable_dropout: bool = option(
        True, "switch off every dropout (the model's and LoRA's), so that policy and "
        "reference log-probs differ by the weights only, as TRL's KTOTrainer does by default")

    def validate(self) -> None:
        require(self.beta > 0, "beta", "must be > 0")
        require(self.desirable_weight > 0, "desirable_weight", "must be > 0")
        require(self.undesirable_weight > 0, "undesirable_weight", "must be > 0")
        super().validate()


@dataclass(frozen=True)
class KTOConfig(TrainConfig, ReferenceOptions, KTOOptions):
    """`prefalign kto`: the shared trainer sections, the reference model, the kto section."""

    COMMAND = "kto"

    def validate(self) -> None:
        super().validate()
        # With one row the mismatched pair is the row itself and z0 becomes its own reward.
        require(self.batch_size >= 2, "batch_size",
                "must be >= 2: the KL estimate pairs each prompt with another row's completion")


class KTO:
    """compute_loss for KTO.

    reference: scores a batch under the reference model (see algorithms.reference).
    gather: concatenates the KL batch's log-probs of all processes during training, so z0
    is one estimate over the global batch as in TRL; None on one process.
    """

    progress_keys = ("kl", "rewards/margins")

    def __init__(self, config: KTOConfig, pad_token_id: int, reference: Reference,
                 gather: Gather | None = None) -> None:
        self.config = config
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.gather = gather

    def collate(self, features: list[dict[str, Any]]) -> UnpairedBatch:
        return collate_unpaired(features, self.pad_token_id, self.config.max_length)

    def units(self, features: list[dict[str, Any]]) -> float:
        # The loss is a weighted mean over rows: weight 2 counts like the row repeated.
        return float(sum(f.get("weight", 1.0) for f in features))

    def kl(self, model: torch.nn.Module, batch: UnpairedBatch) -> Tensor:
        """z0 from the KL batch: policy and reference log-probs, both without gradients."""
        inputs = batch.kl_inputs()
        with torch.no_grad():
            policy = model(*inputs).logps
        ref = self.reference(model, *inputs)
        # Only training steps gather: evaluation needs no global z0 (its loss is a report).
        if self.gather is not None and model.training:
            if batch.stand_in:
                # A zero-weight stand-in (the loop's, see train.loop) still takes part in
                # the gather, so every process calls it equally often, but adds no rows.
                policy, ref = policy[:0], ref[:0]
            policy, ref = self.gather(policy), self.gather(ref)
        return kto_kl_estimate(policy, ref)

    def compute_loss(self, model: torch.nn.Module, batch: UnpairedBatch) -> tuple[Tensor, dict]:
        c = self.config
        kl = self.kl(model, batch)  # first, as TRL does: same dropout draws in the same order
        out: CompletionLogps = model(*batch.inputs(), stats=True)
        ref = self.reference(model, *batch.inputs(), index=batch.index).to(out.logps)
        labels = batch.label.bool()
        losses, rewards = kto_loss(out.logps, ref, labels, kl, c.beta, c.desirable_weight,
                                   c.undesirable_weight)
        loss = weighted_mean(losses, batch.weight)
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
                metrics[f"logits/{name}"] = masked_mean(out.mean_logits[rows], out.mask[rows])
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


def run_kto(config: KTOConfig, accelerator: Accelerator | None = None) -> TrainResult:
    """`prefalign kto`: train, then write OUTPUT/final (and metrics.jsonl, config.yaml)."""
    run = Run.open(config, accelerator)
    train, report = run.load("unpaired", config.data)
    evals, _ = run.load("unpaired", config.eval_data, "eval_data")
    run.load_model()
    note = weight_balance_note(report.desirable, report.undesirable, config.desirable_weight,
                               config.undesirable_weight)
    if note:
        run.print(f"note: {note}")
    multi = run.accelerator.num_processes > 1
    gather = gather_across_processes(run.accelerator) if multi else None
    algorithm = KTO(config, run.tokenizer.pad_token_id, make_reference(run, config), gather)
    return run.fit(algorithm, train, evals)
