"""Online DPO against a reward model, a scoring function or a local judge model (Guo et al.
2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792), as TRL
1.16's OnlineDPOTrainer.

One step of the on-policy loop (algorithms.onpolicy) is one online DPO iteration:
  1. rollout: sample two responses per prompt (consecutive rows of one process), score them;
     a judge (JudgeRanking) scores the winner of each pair 1 and the loser 0. A pair with
     a sample no reward scored (the judge gave no verdict; every reward function returned
     None) is left out of the loss;
  2. the reference's token log-probs (adapters off for LoRA, a frozen copy otherwise) at
     temperature 1: the DPO loss reads the model's own log-probs, as TRL's; the sampling
     temperature only shapes what is sampled;
  3. ranking (`advantages`): missing_eos_penalty is subtracted from the score of a response
     that did not end with EOS or a stop string; the higher score is chosen, and on a tie
     the first sample, as TRL (`first >= second`); the rollout's rows become one row per
     ranked pair;
  4. one optimizer update over the pairs (batch_size pairs per micro-batch, grad_accum
     micro-batches) of the loss_type's preference loss (losses.PREFERENCE_LOSSES) against
     the reference. The samples are fresh and there is one pass: no old log-probs, no ratio.
Metrics are named as TRL's OnlineDPOTrainer logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefalign.algorithms.onpolicy import (
    OnPolicyConfig,
    Rollout,
    Stateless,
    fit_on_policy,
    gather_across,
    open_on_policy_run,
    pad_rows,
    rollout_scorer,
)
from prefalign.algorithms.ppo import PPOOptions
from prefalign.algorithms.reference import make_reference
from prefalign.batches import RolloutBatch
from prefalign.config import Section, option, option_like, require
from prefalign.generation import SamplingOptions
from prefalign.logprobs import LogpsModel
from prefalign.losses import (
    PREFERENCE_LOSS_ALIASES,
    PREFERENCE_LOSSES,
    LossParams,
    PairLogps,
    loss_spec,
    preference_loss,
)
from prefalign.scoring import Scorer

# The DPO-family losses that compare a pair against the reference; the reference-free ones
# (simpo, orpo) belong to offline data with a fixed chosen answer. Built from the registry
# so that the names never drift apart.
ONLINE_LOSS_TYPES: tuple[str, ...] = (
    *PREFERENCE_LOSS_ALIASES,
    *(name for name, spec in PREFERENCE_LOSSES.items() if not spec.reference_free),
)


@dataclass(frozen=True)
class OnlineDPOOptions(Section):
    """The online_dpo section: the judge, the EOS penalty and the preference loss."""

    SECTION = "online_dpo"

    judge: str | None = option(
        None, "local judge model directory instead of a scorer: asked which response of each "
        "pair is better, in both orders; a pair without a consistent verdict is left out")
    missing_eos_penalty: float | None = option(
        None, "subtract this from the score of a response that did not end with EOS/stop "
        "before the pair is ranked (TRL's missing_eos_penalty)")
    loss_type: str = option(
        "sigmoid", "preference loss on each ranked pair against the reference; sigmoid = "
        "dpo; ipo on summed log-ratios, as TRL's OnlineDPOTrainer", choices=ONLINE_LOSS_TYPES)
    beta: float = option(0.1, "strength of the KL penalty toward the reference (IPO: tau)")
    label_smoothing: float = option(0.0, "assumed label-flip rate (cDPO for sigmoid, robust)")
    num_samples: int = option_like(PPOOptions, "num_samples", 4)
    disable_dropout: bool = option(
        True, "switch off every dropout, so that policy and reference log-probs differ by the "
        "weights only (TRL's OnlineDPOTrainer does by default)")

    def validate(self) -> None:
        require(not (self.judge and (self.reward_model or self.reward_fn)), "judge",
                "excludes reward_model and reward_fn: give one")
        require(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
                "missing_eos_penalty", "must be >= 0 (it is subtracted from the score)")
        require(self.beta > 0, "beta", "must be > 0")
        require(0 <= self.label_smoothing <= 0.5, "label_smoothing", "must be in [0, 0.5]")
        require(not self.label_smoothing or loss_spec(self.loss_type).uses_label_smoothing,
                "label_smoothing", f"has no effect on loss_type {self.loss_type}")
        super().validate()


@dataclass(frozen=True)
class OnlineDPOConfig(OnPolicyConfig, OnlineDPOOptions):
    """`prefalign online-dpo`: model, prompts, optim, run, sampling and the online_dpo
    section. batch_size counts prompts (pairs); each iteration samples two responses each."""

    COMMAND = "online-dpo"

    temperature: float = option_like(SamplingOptions, "temperature", 0.9,
                                     "sampling temperature (> 0: the two responses must differ)")


@dataclass
class PairRolloutBatch(RolloutBatch):
    """2B sequences, the B chosen responses then their B rejected ones (RolloutBatch's
    fields), with ref_token_logps (2B, T), scores (2B,) after the EOS penalty, and keep (B,)
    bool: both samples were scored (e.g. the judge gave a verdict): the pair counts in the
    loss."""

    ref_token_logps: Tensor | None = None
    scores: Tensor | None = None
    keep: Tensor | None = None


def rank_pairs(scores: Tensor, finished: Tensor, missing_eos_penalty: float | None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Rank each prompt's two samples, TRL's OnlineDPOTrainer rule.

    scores, finished (2N,): samples 2k and 2k+1 answer prompt k. A sample that did not
    finish (no EOS / stop string) loses missing_eos_penalty from its score; the higher
    score is chosen, the first sample on a tie. Returns (chosen, rejected) indices (N,)
    and the penalised scores (2N,).
    """
    scores = scores.float().clone()
    if missing_eos_penalty is not None:
        scores[~finished.bool()] -= missing_eos_penalty
    first = torch.arange(0, len(scores), 2)
    first_wins = scores[first] >= scores[first + 1]
    chosen = torch.where(first_wins, first, first + 1)
    return chosen, torch.where(first_wins, first + 1, first), scores


class JudgeRanking(Scorer):
    """A judge (preferences.local_judge.LocalJudge) as the rollout's scorer: each prompt's
    two responses (rows 2k, 2k+1) are asked in both orders (preferences.pairwise); the
    winner scores 1, the loser 0. No verdict that survives the swap (a tie, a flip, no
    parsable answer, two identical responses) scores None for both, TRL's "no reward": the
    engine makes it NaN and the pair is left out of the loss."""

    name = "judge"

    def __init__(self, judge: Any, retries: int = 2) -> None:
        self.judge, self.retries = judge, retries

    def _score(self, prompts: list, responses: list[str]) -> list[float | None]:
        from prefalign.preferences.pairwise import PAIRWISE_TEMPLATE, pairwise_batch

        items = [{"prompt": prompts[k], "candidates": responses[k : k + 2], "id": None,
                  "origin": f"pair {k // 2}"} for k in range(0, len(responses), 2)]
        scores: list[float | None] = []
        for record in pairwise_batch(items, self.judge, PAIRWISE_TEMPLATE, self.retries):
            verdict = record["pairs"][0]["verdict"] if record["pairs"] else None
            scores += [float(verdict == 0), float(verdict == 1)] if verdict in (0, 1) else [None] * 2
        return scores


def _kept_mean(values: Tensor, keep: Tensor) -> Tensor:
    """The mean of values (B,) over the kept rows; 0 when none is kept."""
    return (values * keep).sum() / keep.sum().clamp(min=1)


class OnlineDPO(Stateless):
    """Online DPO's choices on the on-policy loop: two samples per prompt, ranked by their
    scores, one update of the DPO-family loss on the pairs against the reference."""

    progress_keys = ("objective/scores", "rewards/accuracies")
    samples_per_prompt = 2
    # A sample no reward term scored (or a pair the judge gave no verdict) is NaN, and its
    # pair is left out of the loss (`keep`), instead of the engine refusing the step.
    unscorable_rewards = True
    epochs = 1  # fresh samples, one pass: the loss needs no importance ratio
    mini_batches = 1
    # The engine's reference pass reads the model's own log-probs, as the loss does.
    logps_temperature = 1.0

    def __init__(self, config: OnlineDPOConfig, pad_token_id: int, accelerator: Any,
                 reference: Any) -> None:
        self.config = config
        self.reference = reference
        self.pad_token_id = pad_token_id
        self.accelerator = accelerator

    def units(self, rows: list[dict]) -> float:
        return float(sum(p["keep"] for p in rows))  # the loss is a mean over ranked pairs

    def collate(self, rows: list[dict]) -> RolloutBatch:
        """Sample rows (the engine's reference pass) -> a RolloutBatch; pair rows (the
        update) -> a PairRolloutBatch of their chosen rows, then their rejected rows."""
        pairs = rows if "chosen" in rows[0] else None
        if pairs:
            rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        pad = partial(pad_rows, rows, length=max(len(r["input_ids"]) for r in rows))
        inputs = (pad("input_ids", value=self.pad_token_id), pad("attention_mask"),
                  pad("completion_mask"))
        if not pairs:
            return RolloutBatch(*inputs)
        return PairRolloutBatch(*inputs, ref_token_logps=pad("ref_token_logps"),
                                scores=torch.tensor([r["score"] for r in rows]),
                                keep=torch.tensor([p["keep"] for p in pairs]))

    def rollout_pass(self, model, batch: RolloutBatch) -> dict[str, Tensor]:
        return {}  # one update pass on fresh samples: no old log-probs to keep

    def advantages(self, rollout: Rollout) -> dict[str, Any]:
        """Rank each prompt's pair (rank_pairs); rollout.rows becomes one row per pair, the
        rows the update reads. Metrics over every process's samples."""
        rows = rollout.rows
        finished = torch.tensor([bool(r["finished"]) for r in rows])
        chosen, rejected, scores = rank_pairs(rollout.scores, finished,
                                              self.config.missing_eos_penalty)
        keep = ~(scores[chosen].isnan() | scores[rejected].isnan())
        for row, score in zip(rows, scores.tolist()):
            row["score"] = score
        rollout.rows = [{"chosen": rows[c], "rejected": rows[r], "keep": k}
                        for c, r, k in zip(chosen.tolist(), rejected.tolist(), keep.tolist())]
        lengths = torch.tensor([float(r["completion_mask"].sum()) for r in rows])
        margins = scores[chosen] - scores[rejected]
        scores, margins, keep, lengths, finished = (
            gather_across(self.accelerator, t) for t in (scores, margins, keep, lengths, finished))
        metrics = {"val/contain_eos_token": finished.mean().item(),
                   "completions/mean_length": lengths.mean().item()}
        if self.config.judge:  # 1 / 0 scores say nothing a judged share does not
            return {**metrics, "val/ranked_pairs": keep.mean().item()}
        # nanmean: a sample no reward function scored is NaN (unscorable_rewards).
        return {**metrics, "objective/scores": scores.nanmean().item(),
                "objective/scores_margin": margins.nanmean().item()}

    def compute_loss(self, model, batch: PairRolloutBatch) -> tuple[Tensor, dict]:
        c = self.config
        out = model(*batch.inputs())  # temperature 1, as the reference's (logps_temperature)
        ref_logps = (batch.ref_token_logps * out.mask).sum(-1)  # (2B,)
        half = out.logps.shape[0] // 2
        # TRL's OnlineDPOTrainer applies IPO to the summed log-ratios (its DPOTrainer to
        # per-token averages): unit lengths make ipo_loss's averages those sums. No other
        # loss offered here reads the lengths.
        ones = torch.ones_like(out.logps[:half])
        logps = PairLogps(out.logps[:half], out.logps[half:], ref_logps[:half],
                          ref_logps[half:], ones, ones)
        result = preference_loss(c.loss_type, logps,
                                 LossParams(beta=c.beta, label_smoothing=c.label_smoothing))
        keep = batch.keep.to(out.logps)
        kl = (out.logps - ref_logps).detach()  # (2B,) per sequence, as TRL's objective/kl
        margins = result.chosen_rewards - result.rejected_rewards
        metrics = {
            "rewards/chosen": _kept_mean(result.chosen_rewards, keep),
            "rewards/rejected": _kept_mean(result.rejected_rewards, keep),
            "rewards/margins": _kept_mean(margins, keep),
            "rewards/accuracies": _kept_mean((margins > 0).float(), keep),
            "logps/chosen": _kept_mean(logps.chosen.detach(), keep),
            "logps/rejected": _kept_mean(logps.rejected.detach(), keep),
            "objective/kl": kl.mean(),
            "objective/entropy": -out.logps.detach().mean(),
            "objective/non_score_reward": -c.beta * kl.mean(),
            "beta": c.beta,
        }
        if not c.judge:
            metrics["objective/rlhf_reward"] = (batch.scores - c.beta * kl).nanmean()
        return _kept_mean(result.losses, keep), metrics


def judge_ranking(config: OnlineDPOConfig) -> JudgeRanking:
    """The judge config.judge names: a local model directory, asked greedily."""
    from prefalign.preferences.local_judge import LocalJudge

    require(Path(config.judge).is_dir(), "judge",
            f"{config.judge}: no such directory (a local judge model directory)")
    return JudgeRanking(LocalJudge(config.judge, seed=config.seed))


def run_online_dpo(config: OnlineDPOConfig, accelerator=None, scorer: Callable | None = None):
    """`prefalign online-dpo`: train, then write OUTPUT/final.

    scorer: a Python function (prompts, responses) -> scores (or one taking a single
    pair), used instead of config.reward_model / reward_fn / judge.
    """
    ranking = judge_ranking(config) if config.judge and not scorer else None
    run, prompts = open_on_policy_run(config, accelerator, scorer or ranking, "online DPO")
    score = ranking or rollout_scorer(run, config, scorer)
    algorithm = OnlineDPO(config, run.tokenizer.pad_token_id, run.accelerator,
                          make_reference(run, config))
    model = LogpsModel(run.model, chunk_size=config.logps_chunk_size)
    return fit_on_policy(run, algorithm, prompts, model=model, scorer=score)
