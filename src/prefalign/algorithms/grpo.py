"""GRPO against a reward model or a scoring function (Shao et al. 2024, arXiv:2402.03300).

One step of the on-policy loop (algorithms.onpolicy) is one GRPO iteration:
  1. rollout: sample num_generations (G) responses per prompt, score them; the G samples
     of a prompt are consecutive rows of one process (groups are never split);
  2. one no-grad pass gives the old token log-probs (no critic); the reference's only
     when beta > 0 (TRL loads none at beta 0);
  3. advantages: rl.group_advantages of the scores over each group (scale_rewards);
  4. num_iterations passes over the rollout, each G optimizer updates of
     batch_size x grad_accum completions per process, of losses.grpo_policy_loss reduced
     by the loss_type (TRL's `loss_type`).
The old log-probs come from the same forward, on the same micro-batches, as the first
update's: the ratio is exactly 1 on the first update of a rollout. Metrics are named as
TRL's GRPOTrainer logs them, `entropy` included (the mean per-token entropy of the policy
over the loss's completion tokens, read off the update's own forward). With
drop_zero_std_groups (DAPO's dynamic-sampling filter), the groups whose rewards are all
equal leave the rollout after step 3: their advantages are 0, so they would only add tokens
(or rows) to the loss's mean; `dropped_groups` counts them. Samples that no reward function
scored (all None) are left out of their group's baseline with advantage 0, as in TRL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from prefalign.algorithms.onpolicy import (
    OnPolicyConfig,
    Rollout,
    Stateless,
    gather_across,
    pad_rows,
    train_critic_free,
)
from prefalign.algorithms.ppo import PPOOptions
from prefalign.batches import RolloutBatch
from prefalign.config import Section, option, option_like, require
from prefalign.errors import ConfigError
from prefalign.generation import SamplingOptions
from prefalign.losses import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    grpo_aggregate,
    grpo_policy_loss,
)
from prefalign.masked import masked_mean
from prefalign.rl import (
    SCALE_REWARDS,
    frac_reward_zero_std,
    group_advantages,
    informative_groups,
    nanstd,
)


@dataclass(frozen=True)
class GRPOOptions(Section):
    """The grpo section: the group size, the clipped update and its reduction."""

    SECTION = "grpo"

    num_generations: int = option(8, "responses sampled per prompt (G, the group size)")
    loss_type: str = option("dapo", "reduction of the per-token losses, as TRL's loss_type",
                            choices=tuple(GRPO_LOSS_TYPES))
    epsilon: float = option(0.2, "clip range of the ratio (lower bound 1 - epsilon)")
    epsilon_high: float | None = option(
        None, "upper clip 1 + epsilon_high (DAPO's clip-higher); none = epsilon")
    beta: float = option(0.0, "coefficient of the k3 KL to the reference; 0 = no reference")
    scale_rewards: str = option("group", "divide the advantages by the std of the group, "
                                "of the batch, or not at all", choices=SCALE_REWARDS)
    importance_sampling_level: str = option(
        "token", "ratio per token, or per sequence (GSPO)", choices=IMPORTANCE_SAMPLING_LEVELS)
    num_iterations: int = option(1, "update passes over each rollout")
    mask_truncated_completions: bool = option(
        False, "leave out of the loss the completions that did not end with EOS/stop")
    drop_zero_std_groups: bool = option(
        False, "DAPO's filter: leave out of the update the groups whose rewards are all equal "
        "(advantage 0: no gradient, only a smaller mean); one process only")
    num_samples: int = option_like(PPOOptions, "num_samples", 4)
    disable_dropout: bool = option(
        True, "switch off every dropout: with it on, the ratio to the rollout's log-probs is "
        "not 1 for an unchanged policy")

    def validate(self) -> None:
        require(self.num_generations >= 2, "num_generations",
                "must be >= 2 (advantages are relative to the group)")
        require(self.epsilon > 0, "epsilon", "must be > 0")
        require(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be > 0")
        require(self.beta >= 0, "beta", "must be >= 0")
        require(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        super().validate()


@dataclass(frozen=True)
class GRPOConfig(OnPolicyConfig, GRPOOptions):
    """`prefalign grpo`: model, prompts, optim, run, sampling and the grpo section. As for
    PPO, no eval set and no truncation: prompts are sampled from as they are. batch_size
    counts prompts; each iteration samples G responses for each."""

    COMMAND = "grpo"

    temperature: float = option_like(SamplingOptions, "temperature", 1.0,
                                     "sampling temperature (> 0: GRPO needs sampling)")


@dataclass
class GRPOBatch(RolloutBatch):
    """A RolloutBatch with advantages (B,) one per completion, the reference's token
    log-probs (B, T) when beta > 0, and keep (B,) bool: the completion counts in the loss."""

    ref_token_logps: Tensor | None = None
    keep: Tensor | None = None


class GRPO(Stateless):
    """GRPO's choices on the on-policy loop: G samples per prompt, no critic, group-relative
    advantages, the clipped surrogate (+ beta * k3) reduced by loss_type."""

    progress_keys = ("reward", "reward_std")
    mini_batches = 1
    unscorable_rewards = True  # NaN scores: out of the group baseline, advantage 0 (TRL)
    logps_temperature = None  # the sampling temperature, as TRL's GRPO

    def __init__(self, config: GRPOConfig, pad_token_id: int, accelerator: Any,
                 reference: Any = None) -> None:
        self.config = config
        self.reference = reference  # None when beta == 0
        self.pad_token_id = pad_token_id
        self.accelerator = accelerator
        if config.drop_zero_std_groups and accelerator.num_processes > 1:
            # Each process would keep a different number of rows, hence run a different
            # number of micro-batches and updates: their collectives would not match.
            raise ConfigError("config key 'drop_zero_std_groups' works on one process only; "
                              "run without it under data parallelism")
        self.samples_per_prompt = config.num_generations
        self.epochs = config.num_iterations

    def _keep(self, row: dict) -> bool:
        return bool(row["finished"]) or not self.config.mask_truncated_completions

    def units(self, rows: list[dict]) -> float:
        """What the loss is a mean over. dapo: the kept scored tokens, so that Trainer.step's
        weights (units over the update's total on every process) give sum / tokens of the
        whole update, TRL's num_items_in_batch; the others: completions."""
        if self.config.loss_type != "dapo":
            return float(len(rows))
        return float(sum(int(r["completion_mask"][1:].sum()) for r in rows if self._keep(r)))

    def collate(self, rows: list[dict]) -> GRPOBatch:
        """Rollout rows -> right-padded (B, T) tensors, advantages (B,), keep (B,)."""
        pad = partial(pad_rows, rows, length=max(len(r["input_ids"]) for r in rows))

        extra = {key: pad(key) for key in ("old_token_logps", "ref_token_logps") if key in rows[0]}
        if "advantages" in rows[0]:
            extra["advantages"] = torch.tensor([r["advantages"] for r in rows])
        return GRPOBatch(pad("input_ids", value=self.pad_token_id), pad("attention_mask"),
                         pad("completion_mask"), keep=torch.tensor([self._keep(r) for r in rows]),
                         **extra)

    def rollout_pass(self, model, batch: GRPOBatch) -> dict[str, Tensor]:
        """The update's forward, without gradients: the old token log-probs."""
        out = model(*batch.inputs(), temperature=self.config.temperature)
        return {"old_token_logps": out.token_logps}

    def compute_loss(self, model, batch: GRPOBatch) -> tuple[Tensor, dict]:
        c = self.config
        # stats: the entropy comes from the same chunks of logits as the log-probs.
        out = model(*batch.inputs(), temperature=c.temperature, stats=True)
        mask = out.mask & batch.keep.unsqueeze(1)
        losses, stats = grpo_policy_loss(
            out.token_logps, batch.old_token_logps, batch.advantages, mask, epsilon=c.epsilon,
            epsilon_high=c.epsilon_high, beta=c.beta, ref_token_logps=batch.ref_token_logps,
            importance_sampling_level=c.importance_sampling_level)
        # dapo: this micro-batch's tokens, which are also its units (see `units`): Trainer.step
        # then weights it by its share of the update's tokens over every process.
        num_items = mask.sum() if c.loss_type == "dapo" else None
        loss = grpo_aggregate(c.loss_type, losses, mask, c.max_new_tokens, num_items)
        return loss, {**stats, "entropy": masked_mean(out.entropy, mask)}

    # -- advantages ---------------------------------------------------------------------
    def advantages(self, rollout: Rollout) -> dict[str, Any]:
        """Group-relative advantages on each row; TRL's rollout metrics. Scores, lengths and
        finish flags are gathered from every process first: scale_rewards "batch" and the
        metrics use the global batch, as on one process."""
        c, rows = self.config, rollout.rows
        lengths = torch.tensor([float(r["completion_mask"].sum()) for r in rows])
        finished = torch.tensor([float(r["finished"]) for r in rows])
        scores, lengths, finished = (self._gather(t) for t in (rollout.scores, lengths, finished))
        advantages, std = group_advantages(scores, c.num_generations, c.scale_rewards)
        start = self.accelerator.process_index * len(rows)
        for row, value in zip(rows, advantages[start : start + len(rows)].tolist()):
            row["advantages"] = value
        metrics = {
            "reward": torch.nanmean(scores).item(),  # TRL's: unscorable samples left out
            "reward_std": nanstd(scores).item(),
            "frac_reward_zero_std": frac_reward_zero_std(std).item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": 1.0 - finished.mean().item(),
        }
        if c.drop_zero_std_groups:
            metrics["dropped_groups"] = self._drop_zero_std_groups(rollout, scores, advantages)
        return metrics

    def _drop_zero_std_groups(self, rollout: Rollout, scores: Tensor, advantages: Tensor
                              ) -> float:
        """Remove from rollout.rows the groups whose rewards are all equal (TRL's zero-std
        test, rl.informative_groups) or whose advantages are all 0 (e.g. every sample
        unscorable); the update then runs on the other groups alone. Returns their count."""
        G = self.config.num_generations
        keep = informative_groups(scores, G) & (advantages != 0).view(-1, G).any(1
                                                                          ).repeat_interleave(G)
        rollout.rows[:] = [row for row, k in zip(rollout.rows, keep.tolist()) if k]
        return float((~keep).sum().item() / G)

    def _gather(self, values: Tensor) -> Tensor:
        """(N,) of this process -> (P * N,) in process order (every process has N rows)."""
        return gather_across(self.accelerator, values)


def run_grpo(config: GRPOConfig, accelerator=None, scorer: Callable | None = None):
    """`prefalign grpo`: train, then write OUTPUT/final.

    scorer: a Python function (prompts, responses) -> scores (or one taking a single
    pair), used instead of config.reward_model / reward_fn.
    """
    return train_critic_free(config, accelerator, scorer, "GRPO", GRPO, config.beta)
