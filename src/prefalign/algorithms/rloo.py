"""RLOO against a reward model or a scoring function (Ahmadian et al. 2024, "Back to
Basics", arXiv:2402.14740), as TRL 1.16's RLOOTrainer.

One step of the on-policy loop (algorithms.onpolicy) is one RLOO iteration:
  1. rollout: sample num_generations (G) responses per prompt, score them; the G samples
     of a prompt are consecutive rows of one process (groups are never split);
  2. one no-grad pass gives the old token log-probs; the reference's only when beta > 0;
  3. rewards: scores clipped to reward_clip_range, minus beta times the KL of the whole
     completion, sum_t (log pi_old - log ref) (rl.kl_penalized_rewards: TRL's RLOO puts
     the KL in the reward, with that estimator, and has no KL term in its loss);
  4. advantages: the leave-one-out baseline, r_i minus the mean of the G - 1 other rewards
     of the group (rl.rloo_advantages), normalised over the batch if asked;
  5. num_iterations passes over the rollout, each G optimizer updates of
     batch_size x grad_accum completions per process, of losses.rloo_policy_loss (the
     clipped ratio of whole-sequence log-probs) averaged over the completions.
The rollout's rows, their collate and the log-prob pass are GRPO's (the class derives from
it); the advantages and the loss are RLOO's. The old log-probs come from the same forward
as the first update's: the ratio is exactly 1 on the first update of a rollout. Metrics are
named as TRL's RLOOTrainer logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from prefalign.algorithms.grpo import GRPO, GRPOBatch
from prefalign.algorithms.onpolicy import (
    OnPolicyConfig,
    Rollout,
    gather_across,
    pad_rows,
    train_critic_free,
)
from prefalign.algorithms.ppo import PPOOptions
from prefalign.config import Section, option, option_like, require
from prefalign.generation import SamplingOptions
from prefalign.losses import rloo_policy_loss
from prefalign.masked import masked_mean
from prefalign.rl import (
    frac_reward_zero_std,
    group_reward_std,
    kl_penalized_rewards,
    nanstd,
    rloo_advantages,
)


@dataclass(frozen=True)
class RLOOOptions(Section):
    """The rloo section: the group size, the KL in the reward, the clipped update."""

    SECTION = "rloo"

    num_generations: int = option(
        2, "responses sampled per prompt (G): each one's baseline is the mean reward of the "
        "other G - 1")
    beta: float = option(
        0.05, "coefficient of the KL to the reference subtracted from each reward (the sum "
        "over the completion of log pi - log ref); 0 = no reference")
    epsilon: float = option(0.2, "clip range of the sequence ratio (lower bound 1 - epsilon)")
    epsilon_high: float | None = option(
        None, "upper clip 1 + epsilon_high (DAPO's clip-higher); none = epsilon")
    normalize_advantages: bool = option(
        False, "scale the advantages to mean 0 and std 1 over the batch of every process")
    reward_clip_range: list[float] | None = option(
        None, "clip each reward to [MIN, MAX] before the KL penalty and the baseline (a "
        "negative MIN takes '=': --reward-clip-range=-1,1)", metavar="MIN,MAX")
    num_iterations: int = option(1, "update passes over each rollout")
    mask_truncated_completions: bool = option(
        False, "leave out of the loss (and of the KL) the completions that did not end with "
        "EOS/stop")
    num_samples: int = option_like(PPOOptions, "num_samples", 4)
    disable_dropout: bool = option(
        True, "switch off every dropout: with it on, the ratio to the rollout's log-probs is "
        "not 1 for an unchanged policy")

    def validate(self) -> None:
        require(self.num_generations >= 2, "num_generations",
                "must be >= 2 (the baseline is the mean of the other samples of the prompt)")
        require(self.beta >= 0, "beta", "must be >= 0")
        require(self.epsilon > 0, "epsilon", "must be > 0")
        require(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be > 0")
        clip = self.reward_clip_range
        require(clip is None or (len(clip) == 2 and clip[0] <= clip[1]), "reward_clip_range",
                "must be two numbers MIN,MAX with MIN <= MAX, e.g. --reward-clip-range=-1,1")
        require(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        super().validate()


@dataclass(frozen=True)
class RLOOConfig(OnPolicyConfig, RLOOOptions):
    """`prefalign rloo`: model, prompts, optim, run, sampling and the rloo section. batch_size
    counts prompts; each iteration samples G responses for each."""

    COMMAND = "rloo"

    temperature: float = option_like(SamplingOptions, "temperature", 1.0,
                                     "sampling temperature (> 0: RLOO needs sampling)")


class RLOO(GRPO):
    """RLOO's choices on GRPO's rollout (G samples per prompt in consecutive rows, no
    critic): KL-penalised rewards, leave-one-out advantages, the clipped sequence-level
    loss averaged over completions."""

    progress_keys = ("reward", "kl")
    unscorable_rewards = True  # NaN scores: out of the leave-one-out baseline, advantage 0 (TRL)

    def __init__(self, config: RLOOConfig, pad_token_id: int, accelerator: Any,
                 reference: Any = None) -> None:
        self.config = config
        self.reference = reference  # None when beta == 0
        self.pad_token_id = pad_token_id
        self.accelerator = accelerator
        self.samples_per_prompt = config.num_generations
        self.epochs = config.num_iterations

    def units(self, rows: list[dict]) -> float:
        """The loss is a mean over completions: Trainer.step's weights (rows over the
        update's rows on every process) make the accumulated loss the update's mean."""
        return float(len(rows))

    def compute_loss(self, model, batch: GRPOBatch) -> tuple[Tensor, dict]:
        c = self.config
        out = model(*batch.inputs(), temperature=c.temperature, stats=True)
        # A masked (truncated) completion keeps a row of zeros: ratio 1, no gradient, but it
        # still counts in the mean, as in TRL.
        mask = out.mask & batch.keep.unsqueeze(1)
        logps = torch.where(mask, out.token_logps, 0.0).sum(1)
        old_logps = torch.where(mask, batch.old_token_logps, 0.0).sum(1)
        losses, stats = rloo_policy_loss(logps, old_logps, batch.advantages,
                                         epsilon=c.epsilon, epsilon_high=c.epsilon_high)
        stats["entropy"] = masked_mean(out.entropy, mask)
        return losses.mean(), stats

    # -- advantages ---------------------------------------------------------------------
    def advantages(self, rollout: Rollout) -> dict[str, Any]:
        """Leave-one-out advantages of the KL-penalised rewards on each row; TRL's rollout
        metrics. The rewards are gathered from every process first: the normalisation and
        the metrics are those of the global batch (a group is on one process)."""
        c, rows = self.config, rollout.rows
        scores = rollout.scores.float()
        rewards = scores.clamp(*c.reward_clip_range) if c.reward_clip_range else scores
        kl_stats = torch.zeros(2)  # the KL summed over the kept tokens, and their count
        if self.reference is not None:
            pad = partial(pad_rows, rows, length=max(len(r["input_ids"]) for r in rows))
            keep = torch.tensor([self._keep(r) for r in rows])
            mask = pad("completion_mask") & keep.unsqueeze(1)
            old, ref = pad("old_token_logps"), pad("ref_token_logps")
            rewards = kl_penalized_rewards(rewards, old, ref, mask, c.beta)
            kl_stats = torch.stack([torch.where(mask, old - ref, 0.0).sum(), mask.sum().float()])
        lengths = torch.tensor([float(r["completion_mask"].sum()) for r in rows])
        finished = torch.tensor([float(r["finished"]) for r in rows])
        scores, rewards, lengths, finished, kl_stats = (
            gather_across(self.accelerator, t) for t in (scores, rewards, lengths, finished,
                                                         kl_stats))
        advantages = rloo_advantages(rewards, c.num_generations, c.normalize_advantages)
        start = self.accelerator.process_index * len(rows)
        for row, value in zip(rows, advantages[start : start + len(rows)].tolist()):
            row["advantages"] = value
        metrics = {
            "reward": torch.nanmean(scores).item(),  # TRL logs the scores, without the KL
            "reward_std": nanstd(scores).item(),
            "frac_reward_zero_std": frac_reward_zero_std(
                group_reward_std(rewards, c.num_generations)).item(),
            **_length_metrics(lengths, finished),
        }
        if self.reference is not None:  # TRL's kl: the mean over every kept token
            kl_sum, count = kl_stats.view(-1, 2).sum(0)
            metrics["kl"] = (kl_sum / count.clamp(min=1)).item()
        return metrics


def _length_metrics(lengths: Tensor, finished: Tensor) -> dict[str, float]:
    """TRL's completions/* metrics of the global batch: lengths, and those of the completions
    that ended (EOS or stop string); clipped_ratio is the share that did not."""
    ended = lengths[finished.bool()]
    if ended.numel() == 0:  # TRL's edge case: no completion ended
        ended = torch.zeros(1)
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - finished.mean().item(),
        "completions/mean_terminated_length": ended.mean().item(),
        "completions/min_terminated_length": ended.min().item(),
        "completions/max_terminated_length": ended.max().item(),
    }


def run_rloo(config: RLOOConfig, accelerator=None, scorer: Callable | None = None):
    """`prefalign rloo`: train, then write OUTPUT/final.

    scorer: a Python function (prompts, responses) -> scores (or one taking a single
    pair), used instead of config.reward_model / reward_fn.
    """
    return train_critic_free(config, accelerator, scorer, "RLOO", RLOO, config.beta)
