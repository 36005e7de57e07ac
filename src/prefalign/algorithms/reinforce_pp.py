"""REINFORCE++ against a reward model or a scoring function (Hu 2025, arXiv:2501.03262), as
OpenRLHF's `--advantage_estimator reinforce` (and `reinforce_baseline` with `baseline`).

One step of the on-policy loop (algorithms.onpolicy) is one REINFORCE++ iteration:
  1. rollout: sample num_generations responses per prompt (consecutive rows of one
     process), score them;
  2. one no-grad pass gives the old token log-probs (no critic); the reference's only
     when kl_coef > 0;
  3. per-token rewards: the score on the last completion token minus kl_coef times the
     KL estimate of each token (old vs reference); returns G_t = sum_{i >= t} gamma^(i-t)
     r_i; advantages = the returns whitened over every completion token of the global
     batch, all processes together (rl.reinforce_pp_advantages). `baseline`
     (REINFORCE++-baseline) first subtracts from each score its prompt's mean score;
  4. num_iterations passes over the rollout, each num_mini_batches x num_generations
     optimizer updates of batch_size x grad_accum completions per process, of the clipped
     surrogate with per-token advantages (losses.grpo_policy_loss, no KL term: the KL is
     in the reward) averaged over every completion token of the update.
The old log-probs come from the same forward, on the same micro-batches, as the first
update's: the ratio is exactly 1 on the first update of a rollout.
Differences from OpenRLHF, deliberate: the whitening divides by sqrt(var + 1e-8) with the
unbiased variance (OpenRLHF: the biased one, clamped at 1e-8); the token mean runs over the
whole update, where OpenRLHF averages each micro-batch's token mean (equal without
accumulation). Not built: OpenRLHF's adaptive KL controller, KL as a loss (use_kl_loss),
the k2 estimator, and its default clip of the scores to [-10, 10].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from prefalign.algorithms.grpo import GRPOOptions
from prefalign.algorithms.onpolicy import (
    OnPolicyConfig,
    Rollout,
    Stateless,
    collate_rollout,
    gather_across,
    pad_rows,
    sum_across,
    train_critic_free,
)
from prefalign.algorithms.ppo import PPOOptions
from prefalign.batches import RolloutBatch
from prefalign.config import Section, option, option_like, require
from prefalign.generation import SamplingOptions
from prefalign.losses import grpo_policy_loss
from prefalign.masked import masked_mean
from prefalign.rl import (
    frac_reward_zero_std,
    group_reward_std,
    kl_estimate,
    reinforce_pp_advantages,
)


@dataclass(frozen=True)
class ReinforcePPOptions(Section):
    """The reinforce-pp section: the KL-shaped returns, the clipped update."""

    SECTION = "reinforce-pp"

    num_generations: int = option(
        1, "responses sampled per prompt (OpenRLHF's n_samples_per_prompt)")
    baseline: bool = option(
        False, "REINFORCE++-baseline: subtract from each score the mean score of its prompt's "
        "responses before the KL shaping (needs num_generations >= 2 and gamma 1)")
    kl_coef: float = option(
        0.01, "coefficient of the per-token KL to the reference subtracted from the rewards "
        "(OpenRLHF's init_kl_coef); 0 = no reference")
    kl_estimator: str = option_like(PPOOptions, "kl_estimator", "k1")
    gamma: float = option_like(PPOOptions, "gamma", 1.0)
    epsilon: float = option_like(GRPOOptions, "epsilon", 0.2)
    epsilon_high: float | None = option_like(GRPOOptions, "epsilon_high", None)
    num_iterations: int = option(1, "update passes over each rollout (OpenRLHF's max_epochs)")
    num_mini_batches: int = option(
        1, "prompts per iteration in units of batch_size x grad_accum: each pass makes "
        "num_mini_batches x num_generations optimizer updates")
    num_samples: int = option_like(PPOOptions, "num_samples", 4)
    disable_dropout: bool = option(
        True, "switch off every dropout: with it on, the ratio to the rollout's log-probs is "
        "not 1 for an unchanged policy")

    def validate(self) -> None:
        require(self.num_generations >= 1, "num_generations", "must be >= 1")
        require(not self.baseline or self.num_generations >= 2, "num_generations",
                "must be >= 2 with baseline (the baseline is the mean score of the prompt)")
        require(not self.baseline or self.gamma == 1, "gamma",
                "must be 1 with baseline (as in OpenRLHF)")
        require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        require(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        require(self.epsilon > 0, "epsilon", "must be > 0")
        require(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be > 0")
        require(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        require(self.num_mini_batches >= 1, "num_mini_batches", "must be >= 1")
        super().validate()


@dataclass(frozen=True)
class ReinforcePPConfig(OnPolicyConfig, ReinforcePPOptions):
    """`prefalign reinforce-pp`: model, prompts, optim, run, sampling and the reinforce-pp
    section. batch_size counts prompts; each iteration samples num_generations responses
    for each."""

    COMMAND = "reinforce-pp"

    temperature: float = option_like(SamplingOptions, "temperature", 1.0,
                                     "sampling temperature (> 0: REINFORCE++ needs sampling)")


class ReinforcePP(Stateless):
    """REINFORCE++'s choices on the on-policy loop: no critic, KL-shaped token rewards,
    discounted returns whitened over the global batch, the clipped surrogate."""

    progress_keys = ("reward", "kl")
    unscorable_rewards = False  # every sample needs a score: its returns have no way to skip one
    logps_temperature = None  # the sampling temperature

    def __init__(self, config: ReinforcePPConfig, pad_token_id: int, accelerator: Any,
                 reference: Any = None) -> None:
        self.config = config
        self.reference = reference  # None when kl_coef == 0
        self.pad_token_id = pad_token_id
        self.accelerator = accelerator
        self.samples_per_prompt = config.num_generations
        self.epochs, self.mini_batches = config.num_iterations, config.num_mini_batches

    def units(self, rows: list[dict]) -> float:
        """The scored tokens (token 0 never is): Trainer.step weights each micro-batch's
        token mean by its share of the update's tokens over every process, which makes the
        accumulated loss the token mean of the whole update."""
        return float(sum(int(r["completion_mask"][1:].sum()) for r in rows))

    def collate(self, rows: list[dict]) -> RolloutBatch:
        return collate_rollout(rows, self.pad_token_id)

    def rollout_pass(self, model, batch: RolloutBatch) -> dict[str, Tensor]:
        """The update's forward, without gradients: the old token log-probs."""
        out = model(*batch.inputs(), temperature=self.config.temperature)
        return {"old_token_logps": out.token_logps}

    def compute_loss(self, model, batch: RolloutBatch) -> tuple[Tensor, dict]:
        c = self.config
        out = model(*batch.inputs(), temperature=c.temperature, stats=True)
        losses, stats = grpo_policy_loss(out.token_logps, batch.old_token_logps,
                                         batch.advantages, out.mask, epsilon=c.epsilon,
                                         epsilon_high=c.epsilon_high)
        stats["entropy"] = masked_mean(out.entropy.detach(), out.mask)
        return masked_mean(losses, out.mask), stats

    # -- advantages ---------------------------------------------------------------------
    def advantages(self, rollout: Rollout) -> dict[str, Any]:
        """Whitened KL-shaped returns on each row, (T,) per row; the rollout's metrics."""
        c, rows = self.config, rollout.rows
        batch = self.collate(rows)
        mask = batch.completion_mask & batch.attention_mask.bool()
        mask[:, 0] = False  # token 0 has no log-prob
        old = batch.old_token_logps.float()
        # No reference (kl_coef 0): the KL is 0 everywhere.
        ref = old if self.reference is None else pad_rows(
            rows, "ref_token_logps", old.shape[1], dtype=torch.float32)
        scores = rollout.scores.float()
        if c.baseline:  # a prompt's G rows are consecutive rows of this process
            means = scores.view(-1, c.num_generations).mean(1)
            scores = scores - means.repeat_interleave(c.num_generations)
        reduce = partial(sum_across, self.accelerator)
        advantages, _ = reinforce_pp_advantages(scores, old, ref, mask, c.kl_coef, c.gamma,
                                                c.kl_estimator, reduce=reduce)
        for i, row in enumerate(rows):
            row["advantages"] = advantages[i, : len(row["input_ids"])]
        metrics = self._metrics(rollout)
        if self.reference is not None:  # the mean per-token KL estimate over every process
            kl = kl_estimate(old, ref, c.kl_estimator)
            metrics["kl"] = masked_mean(kl, mask, reduce=reduce).item()
        return metrics

    def _metrics(self, rollout: Rollout) -> dict[str, Any]:
        """TRL's names, over the global batch: the raw scores' mean and std, the share of
        prompts whose scores are all equal (G >= 2), completion lengths and truncations."""
        rows, g = rollout.rows, self.config.num_generations
        lengths = torch.tensor([float(r["completion_mask"].sum()) for r in rows])
        finished = torch.tensor([float(r["finished"]) for r in rows])
        scores, lengths, finished = (gather_across(self.accelerator, t)
                                     for t in (rollout.scores, lengths, finished))
        metrics = {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": 1.0 - finished.mean().item(),
        }
        if g > 1:
            metrics["frac_reward_zero_std"] = frac_reward_zero_std(
                group_reward_std(scores, g)).item()
        return metrics


def run_reinforce_pp(config: ReinforcePPConfig, accelerator=None,
                     scorer: Callable | None = None):
    """`prefalign reinforce-pp`: train, then write OUTPUT/final.

    scorer: a Python function (prompts, responses) -> scores (or one taking a single
    pair), used instead of config.reward_model / reward_fn.
    """
    return train_critic_free(config, accelerator, scorer, "REINFORCE++", ReinforcePP, config.kl_coef)
