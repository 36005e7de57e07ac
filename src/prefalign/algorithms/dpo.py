"""DPO and its variants: one concatenated chosen+rejected forward per step.

The reference log-probs come from, in order of preference for memory:
  (c) `precompute_ref`: computed once before training, cached on disk, no reference model
      in memory while training;
  (a) LoRA runs: the same weights with adapters disabled (no second copy);
  (b) full fine-tuning: a frozen copy of the starting model (or `ref_model`).
algorithms.reference.make_reference chooses and builds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefalign.algorithms.reference import FrozenCopy, Reference, make_reference
from prefalign.batches import PreferenceBatch
from prefalign.config import Section, option, require
from prefalign.data import collate_preferences
from prefalign.logprobs import CompletionLogps
from prefalign.losses import (
    PREFERENCE_LOSS_CHOICES,
    LossParams,
    PairLogps,
    loss_spec,
    nll_loss,
    preference_loss,
    weighted_mean,
)
from prefalign.masked import masked_mean
from prefalign.packing import PackedInputs, fallback_note, share_prefix
from prefalign.train.config import TrainConfig
from prefalign.train.loop import TrainResult
from prefalign.train.run import Run
from prefalign.train.sections import ReferenceOptions

# Which tokens the NLL term (rpo_alpha, ORPO's SFT term) averages over; see DPOConfig.
NLL_TOKENS = ("auto", "sequence", "completion")


@dataclass(frozen=True)
class DPOOptions(Section):
    """The dpo section: the preference loss and how the pairs are scored (iterate's DPO
    rounds take it too)."""

    SECTION = "dpo"

    beta: float = option(0.1, "strength of the KL penalty toward the reference (ORPO: lambda)")
    loss_type: str = option("sigmoid", "preference loss; sigmoid is TRL's name for dpo",
                            choices=PREFERENCE_LOSS_CHOICES)
    label_smoothing: float = option(0.0, "assumed label-flip rate (cDPO, robust, simpo)")
    simpo_gamma: float = option(0.5, "SimPO target reward margin gamma")
    rpo_alpha: float | None = option(
        None, "weight of an NLL term on the chosen sequences; none = 0 (1.0 for orpo)")
    nll_tokens: str = option(
        "auto", "tokens the NLL term averages over: sequence = prompt and chosen completion "
        "(TRL's ORPOTrainer), completion = chosen completion only (TRL's DPOTrainer "
        "rpo_alpha; the ORPO paper's Eq. 2); auto = sequence for orpo, else completion",
        choices=NLL_TOKENS)
    beta_per_source: dict[str, float] = option(
        {}, "a beta per data `source`, e.g. helpful=0.1,safe=0.5 (others use beta)")
    precompute_ref: bool = option(
        False, "compute reference log-probs once before training and cache them on disk")
    prefix_sharing: bool = option(
        False, "one row per pair, [prompt | chosen | rejected], so the prompt is computed "
        "once (rejected tokens do not attend to chosen ones); the same numbers")
    disable_dropout: bool = option(
        True, "switch off every dropout (the model's and LoRA's), so that policy and "
        "reference log-probs differ by the weights only, as TRL's DPOTrainer does by default")

    def validate(self) -> None:
        require(self.beta > 0, "beta", "must be > 0")
        require(all(b > 0 for b in self.beta_per_source.values()), "beta_per_source",
                "values must be > 0")
        require(0 <= self.label_smoothing <= 0.5, "label_smoothing", "must be in [0, 0.5]")
        spec = loss_spec(self.loss_type)
        require(not self.label_smoothing or spec.uses_label_smoothing, "label_smoothing",
                f"has no effect on loss_type {self.loss_type}")
        require(self.rpo_alpha is None or self.rpo_alpha >= 0, "rpo_alpha", "must be >= 0")
        require(self.nll_tokens == "auto" or self.nll_weight > 0, "nll_tokens",
                "has no effect without an NLL term (set rpo_alpha > 0 or loss_type orpo)")
        super().validate()

    @property
    def nll_weight(self) -> float:
        if self.rpo_alpha is not None:
            return self.rpo_alpha
        return 1.0 if self.loss_type == "orpo" else 0.0

    @property
    def nll_covers_prompt(self) -> bool:
        """Whether the NLL term includes the chosen rows' prompt tokens (see nll_tokens)."""
        if self.nll_tokens == "auto":
            return self.loss_type == "orpo"
        return self.nll_tokens == "sequence"

    @property
    def reference_free(self) -> bool:
        return loss_spec(self.loss_type).reference_free


@dataclass(frozen=True)
class DPOConfig(TrainConfig, ReferenceOptions, DPOOptions):
    """`prefalign dpo`: the shared trainer sections, the reference model, the dpo section."""

    COMMAND = "dpo"


def _completions_only(out: CompletionLogps, completion_mask: Tensor) -> CompletionLogps:
    """`out` scored prompt tokens too (for the NLL term): the same result restricted to the
    completion tokens, which every preference loss and metric reads."""
    mask = out.mask & completion_mask.bool()
    token_logps = torch.where(mask, out.token_logps, torch.zeros_like(out.token_logps))
    return dataclasses.replace(out, token_logps=token_logps, mask=mask,
                               logps=token_logps.sum(-1), lengths=mask.sum(-1).to(token_logps.dtype))


class DPO:
    """compute_loss for the DPO family.

    reference: the reference log-probs of the batch's rows (algorithms.reference, a
    precomputed table included); None when the loss is reference-free.

    ORPO is TRL's ORPOTrainer (loss, rewards/*, nll_loss, log_odds_ratio, log_odds_chosen
    and gradients agree): loss = NLL of prompt + chosen tokens, a token mean over the batch,
    plus the mean odds-ratio term. logps/* and logits/* keep this class's meaning for every
    loss (sums and mean logits over completion tokens); TRL's ORPO logs per-token average
    log-probs and a mean logit over all positions there.
    """

    progress_keys = ("rewards/accuracies", "rewards/margins")

    def __init__(self, config: DPOConfig, pad_token_id: int,
                 reference: Reference | None, prefix_sharing: bool | None = None) -> None:
        self.config = config
        self.pad_token_id = pad_token_id
        self.reference = reference
        # What the run decided (run_dpo falls back to padded rows for a model that cannot
        # take the shared-prefix mask); None = as configured.
        self.prefix_sharing = config.prefix_sharing if prefix_sharing is None else prefix_sharing

    def collate(self, features: list[dict[str, Any]]) -> PreferenceBatch:
        batch = collate_preferences(features, self.pad_token_id)
        if self.prefix_sharing:
            shared = share_prefix(features, self.pad_token_id, batch.input_ids.shape[1])
            batch.packed = PackedInputs.from_keys(shared)
        return batch

    def units(self, features: list[dict[str, Any]]) -> float:
        # The loss is a weighted mean over pairs: weight 2 counts like the pair repeated.
        return float(sum(f.get("weight", 1.0) for f in features))

    def _beta(self, batch: PreferenceBatch) -> float | Tensor:
        per_source = self.config.beta_per_source
        if not per_source:
            return self.config.beta
        sources = batch.source or [None] * batch.pairs
        return torch.tensor([per_source.get(s, self.config.beta) for s in sources])

    def compute_loss(self, model: torch.nn.Module, batch: PreferenceBatch) -> tuple[Tensor, dict]:
        shared = batch.packed_kwargs()
        half = batch.pairs
        scored = batch.completion_mask.bool()
        if self.config.nll_weight and self.config.nll_covers_prompt:
            # One forward scores the chosen rows' prompt tokens too, for the NLL term only.
            scored = scored.clone()
            scored[:half] |= batch.attention_mask[:half].bool()
        full: CompletionLogps = model(batch.input_ids, batch.attention_mask, scored, stats=True,
                                      **shared)
        out = _completions_only(full, batch.completion_mask)
        ref = None
        if not self.config.reference_free:  # precomputed numbers too: a PrecomputedTable
            ref = self.reference(model, *batch.inputs(), index=batch.index, **shared).to(out.logps)
        logps = PairLogps(
            chosen=out.logps[:half], rejected=out.logps[half:],
            ref_chosen=None if ref is None else ref[:half],
            ref_rejected=None if ref is None else ref[half:],
            chosen_lengths=out.lengths[:half], rejected_lengths=out.lengths[half:],
        )
        params = LossParams(beta=self._beta(batch), label_smoothing=self.config.label_smoothing,
                            simpo_gamma=self.config.simpo_gamma)
        result = preference_loss(self.config.loss_type, logps, params)
        loss = weighted_mean(result.losses, batch.weight)
        metrics = {
            "rewards/chosen": result.chosen_rewards.mean(),
            "rewards/rejected": result.rejected_rewards.mean(),
            "rewards/margins": (result.chosen_rewards - result.rejected_rewards).mean(),
            "rewards/accuracies": (result.chosen_rewards > result.rejected_rewards).float().mean(),
            "logps/chosen": logps.chosen.detach().mean(),
            "logps/rejected": logps.rejected.detach().mean(),
            "logits/chosen": masked_mean(out.mean_logits[:half], out.mask[:half]),
            "logits/rejected": masked_mean(out.mean_logits[half:], out.mask[half:]),
        }
        metrics.update({key: values.mean() for key, values in result.stats.items()})
        if self.config.nll_weight:
            nll = nll_loss(full.token_logps[:half], full.mask[:half])
            loss = loss + self.config.nll_weight * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics


def run_dpo(config: DPOConfig, accelerator=None) -> TrainResult:
    """`prefalign dpo`: train, then write OUTPUT/final (and metrics.jsonl, config.yaml)."""
    require(not (config.precompute_ref and config.reference_free), "precompute_ref",
            f"does nothing for the reference-free loss {config.loss_type}")
    run = Run.open(config, accelerator)
    train, _ = run.load("preferences", config.data)
    evals, _ = run.load("preferences", config.eval_data, "eval_data")
    run.load_model()
    reference = make_reference(run, config, precompute_for=(train, evals))
    algorithm = DPO(config, run.tokenizer.pad_token_id, reference,
                    prefix_sharing=_prefix_sharing(run, reference))
    return run.fit(algorithm, train, evals)


def _prefix_sharing(run: Run, reference: Reference | None) -> bool:
    """config.prefix_sharing, unless the policy or a frozen reference cannot take the
    shared-prefix mask: then padded rows, recorded in the run's log."""
    if not run.config.prefix_sharing:
        return False
    models = [run.model] + ([reference.base] if isinstance(reference, FrozenCopy) else [])
    note = next(filter(None, (fallback_note(m, "prefix_sharing") for m in models)), None)
    if note:
        run.note(note)
    return note is None
