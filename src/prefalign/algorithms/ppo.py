"""PPO against a reward model or a scoring function (Ouyang et al. 2022, arXiv:2203.02155).

One step of the on-policy loop (algorithms.onpolicy) is one PPO iteration:
  1. rollout: sample one response per prompt (KV cache), score it;
  2. one no-grad pass gives the old log-probs and values, one the reference log-probs;
  3. rewards = score on the last token - kl_coef * KL per token; GAE; whitened advantages;
  4. ppo_epochs passes over num_mini_batches mini-batches, each one optimizer update of the
     clipped policy loss + vf_coef * clipped value loss; stop early when approx KL exceeds
     target_approx_kl.
The old log-probs come from the same forward, on the same micro-batches, as the first
update's, so the ratio is exactly 1 on the first mini-batch of the first epoch. Under data
parallelism each process samples its share of the prompts, as one process would; whitening,
the KL controller, the approx-KL stop and objective/* use every process's rollouts.
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
    collate_rollout,
    fit_on_policy,
    open_on_policy_run,
    pad_rows,
    rollout_scorer,
    sum_across,
)
from prefalign.algorithms.reference import AdaptersOff, FrozenCopy, make_reference
from prefalign.batches import RolloutBatch
from prefalign.config import Section, option, option_like, require
from prefalign.generation import SamplingOptions
from prefalign.losses import ppo_policy_loss, ppo_value_loss
from prefalign.masked import masked_mean, masked_whiten
from prefalign.rl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_estimate,
    shaped_rewards,
)
from prefalign.train.run import Run


@dataclass(frozen=True)
class PPOOptions(Section):
    """The ppo section: the critic, the KL penalty, GAE and the clipped update."""

    SECTION = "ppo"

    value_model: str | None = option(
        None, "initialise a separate critic from the backbone of this reward model (or "
        "causal LM) dir; none = value head on the policy backbone")
    kl_coef: float = option(0.05, "initial KL penalty coefficient")
    kl_estimator: str = option("k1", "per-token KL estimator", choices=KL_ESTIMATORS)
    target_kl: float | None = option(
        None, "adapt kl_coef toward this KL per sequence (Ziegler et al. 2019); none = fixed")
    kl_horizon: int = option(10000, "horizon of the adaptive KL controller")
    gamma: float = option(1.0, "discount factor")
    lam: float = option(0.95, "GAE lambda")
    cliprange: float = option(0.2, "policy ratio clip range")
    cliprange_value: float = option(0.2, "value clip range")
    vf_coef: float = option(0.1, "value loss coefficient")
    ppo_epochs: int = option(4, "passes over each rollout batch")
    num_mini_batches: int = option(1, "optimizer updates per epoch over the rollout batch")
    target_approx_kl: float | None = option(
        None, "stop the epochs of a rollout early when approx KL exceeds this (e.g. 0.02)")
    whiten_rewards: bool = option(False, "whiten the scores over the rollout batch")
    reward_clip: float | None = option(None, "clip scores to [-c, c]")
    missing_eos_penalty: float | None = option(
        None, "subtract this from the score of responses that did not end with EOS/stop")
    num_samples: int = option(4, "sample generations written to samples.jsonl per log")
    disable_dropout: bool = option(
        True, "switch off every dropout (the model's, LoRA's and the critic's): with it on, "
        "the ratio to the rollout's log-probs is not 1 for an unchanged policy (TRL's "
        "PPOTrainer always switches it off)")

    def validate(self) -> None:
        require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        require(self.target_kl is None or self.target_kl > 0, "target_kl", "must be > 0")
        require(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        require(self.cliprange > 0 and self.cliprange_value > 0, "cliprange", "must be > 0")
        require(self.ppo_epochs >= 1 and self.num_mini_batches >= 1, "ppo_epochs",
                "and num_mini_batches must be >= 1")
        super().validate()


@dataclass(frozen=True)
class PPOConfig(OnPolicyConfig, PPOOptions):
    """`prefalign ppo`: model, prompts, optim, run, sampling and the ppo section. No eval
    set, and no truncation or length options: prompts are sampled from as they are."""

    COMMAND = "ppo"

    temperature: float = option_like(SamplingOptions, "temperature", 0.7,
                                     "sampling temperature (> 0: PPO needs sampling)")


class PPO:
    """PPO's choices on the on-policy loop (algorithms.onpolicy): one sample per prompt, a
    value head, KL-shaped rewards, GAE, the clipped update and the approx-KL stop."""

    progress_keys = ("objective/scores", "objective/kl")
    unscorable_rewards = False  # every sample needs a score: GAE has no way to skip one
    logps_temperature = None  # the sampling temperature
    samples_per_prompt = 1

    def __init__(self, config: PPOConfig, pad_token_id: int, accelerator: Any,
                 reference: AdaptersOff | FrozenCopy | None = None) -> None:
        self.config = config
        self.reference = reference  # from make_reference; None only if nothing is rolled out
        self.pad_token_id = pad_token_id
        self.accelerator = accelerator
        self.epochs, self.mini_batches = config.ppo_epochs, config.num_mini_batches
        self.kl_ctl = (AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
                       if config.target_kl else FixedKLController(config.kl_coef))
        self._approxkl: list[Tensor] = []  # of the current update's micro-batches

    def units(self, rows: list[dict]) -> float:
        return float(len(rows))

    def collate(self, rows: list[dict]) -> RolloutBatch:
        """Rollout rows -> a RolloutBatch of right-padded (B, T) tensors."""
        return collate_rollout(rows, self.pad_token_id)

    def rollout_pass(self, model, batch: RolloutBatch) -> dict[str, Tensor]:
        """The update's forward, without gradients: old log-probs, values, entropy."""
        c = self.config
        out, values = model(*batch.inputs(), temperature=c.temperature, stats=True,
                            chunk_size=c.logps_chunk_size)
        lengths = batch.attention_mask.sum(1).tolist()
        entropy = torch.stack([masked_mean(out.entropy[i, :n], out.mask[i, :n])
                               for i, n in enumerate(lengths)])
        return {"old_token_logps": out.token_logps, "old_values": values, "entropy": entropy}

    def compute_loss(self, model, batch: RolloutBatch) -> tuple[Tensor, dict]:
        c = self.config
        out, values = model(*batch.inputs(), temperature=c.temperature, stats=True,
                            chunk_size=c.logps_chunk_size)
        mask = out.mask
        pg_losses, pg = ppo_policy_loss(out.token_logps, batch.old_token_logps, batch.advantages,
                                        mask, c.cliprange)
        vf_losses, vf = ppo_value_loss(values, batch.old_values, batch.returns, mask,
                                       c.cliprange_value)
        pg_loss, vf_loss = masked_mean(pg_losses, mask), masked_mean(vf_losses, mask)
        self._approxkl.append(pg["approxkl"])
        return pg_loss + c.vf_coef * vf_loss, {
            "policy/loss": pg_loss.detach(), "policy/approxkl": pg["approxkl"],
            "policy/clipfrac": pg["clipfrac"], "policy/ratio": pg["ratio"],
            "policy/entropy": masked_mean(out.entropy, mask), "val/loss": vf_loss.detach(),
            "val/clipfrac": vf["clipfrac"],
        }

    def stop_early(self) -> bool:
        """Whether the last update's approx KL, over every process (so that all stop
        together), exceeds target_approx_kl."""
        approxkl, self._approxkl = self._approxkl, []
        target = self.config.target_approx_kl
        if not target or not approxkl:
            return False
        total, count = self._global_sums(torch.stack(approxkl).sum(), len(approxkl))
        return total / count > target

    # -- statistics over every process's rollouts ---------------------------------------
    def _global_sums(self, *values: Tensor) -> list[float]:
        """Each scalar summed over every process, in one collective (identity on one)."""
        acc = self.accelerator
        sums = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if acc.num_processes > 1:
            sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
        return sums.tolist()

    def sum_across(self, values: Tensor) -> Tensor:
        """`values` summed over every process (identity on one): masked.Reduce, so that
        whitening uses the mean and variance of every process's rollouts and advantages
        are scaled alike everywhere, as they would be on one process."""
        return sum_across(self.accelerator, values)

    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    # -- advantages ---------------------------------------------------------------------
    def advantages(self, rollout: Rollout) -> dict[str, Any]:
        """Scores shaped (EOS penalty, clip, whitening) minus kl_coef * KL per token, GAE,
        whitened advantages on each row; the KL controller moves; the metrics."""
        c, rows = self.config, rollout.rows
        scores = rollout.scores
        finished = torch.tensor([r["finished"] for r in rows])
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~finished).float()
        if c.reward_clip is not None:
            scores = scores.clamp(-c.reward_clip, c.reward_clip)
        if c.whiten_rewards:
            scores = masked_whiten(scores, torch.ones_like(scores, dtype=torch.bool),
                                   shift_mean=False, reduce=self.sum_across)
        batch = self.collate(rows)
        mask = batch.completion_mask & batch.attention_mask.bool()
        mask[:, 0] = False
        pad = partial(pad_rows, rows, length=batch.input_ids.shape[1], dtype=torch.float32)
        old, ref, values = pad("old_token_logps"), pad("ref_token_logps"), pad("old_values")
        kl = kl_estimate(old, ref, c.kl_estimator) * mask
        kl_coef = self.kl_ctl.value
        rewards = shaped_rewards(scores, kl, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        advantages = masked_whiten(advantages, mask, reduce=self.sum_across)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            row["advantages"], row["returns"] = advantages[i, :n], returns[i, :n]
        metrics, n = self._metrics(rollout, scores, kl.sum(1), kl_coef, (values, returns, mask))
        self.kl_ctl.update(metrics["objective/kl"], int(n))
        return metrics

    def _metrics(self, rollout: Rollout, scores: Tensor, kl_per_seq: Tensor, kl_coef: float,
                 value_terms: tuple[Tensor, Tensor, Tensor]) -> tuple[dict[str, Any], float]:
        """Per-sequence means over every process's rollouts (one collective): the KL
        controller must see the same global KL everywhere, and the logs the global batch.
        Also the number of sequences over every process."""
        rows, (values, returns, mask) = rollout.rows, value_terms
        entropy = torch.tensor([r["entropy"] for r in rows])
        finished = torch.tensor([r["finished"] for r in rows])
        n, score_sum, kl_sum, rlhf_sum, entropy_sum, tokens, eos_sum, value_sum = self._global_sums(
            len(rows), rollout.scores.sum(), kl_per_seq.sum(),
            (scores - kl_coef * kl_per_seq).sum(), entropy.sum(), mask.sum(), finished.sum(),
            (values * mask).sum())
        return {
            "objective/scores": score_sum / n,
            "objective/kl": kl_sum / n,
            "objective/non_score_reward": -kl_coef * kl_sum / n,
            "objective/rlhf_reward": rlhf_sum / n,
            "objective/entropy": entropy_sum / n,
            "val/explained_variance": explained_variance(values, returns, mask,
                                                         reduce=self.sum_across).item(),
            "val/mean": value_sum / max(tokens, 1.0),
            "kl_coef": kl_coef,
            "response_length": tokens / n,
            "eos_fraction": eos_sum / n,
        }, n


def run_ppo(config: PPOConfig, accelerator=None, scorer: Callable | None = None):
    """`prefalign ppo`: train, then write OUTPUT/final (+ value_head.safetensors).

    scorer: a Python function (prompts, responses) -> scores (or one taking a single
    pair), used instead of config.reward_model / reward_fn.
    """
    from prefalign.models import save_value_head

    run, prompts = open_on_policy_run(config, accelerator, scorer, "PPO")
    module = policy_with_value(run, config)
    score = rollout_scorer(run, config, scorer)
    algorithm = PPO(config, run.tokenizer.pad_token_id, run.accelerator,
                    make_reference(run, config))
    return fit_on_policy(run, algorithm, prompts, model=module, scorer=score,
                         extra=lambda directory: save_value_head(module.value_head, directory))


def policy_with_value(run: Run, config: PPOConfig):
    """run.model with a value head: on its own backbone, or on a separate critic
    (config.value_model) with LoRA and dropout as the policy's."""
    from prefalign.lora import apply_lora
    from prefalign.models import PolicyWithValue, ValueHead, critic_backbone, disable_dropout

    critic = None
    if config.value_model:
        critic = critic_backbone(config.value_model)
        if config.lora_r > 0:
            apply_lora(critic, config.lora_targets, config.lora_r, config.lora_alpha)
        if config.disable_dropout:
            disable_dropout(critic)
    hidden = (critic or run.model).config.get_text_config().hidden_size
    return PolicyWithValue(run.model, ValueHead(hidden), critic)
