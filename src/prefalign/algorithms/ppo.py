"""PPO against a reward model or a scoring function (Ouyang et al. 2022, arXiv:2203.02155).

One training-loop step is one PPO iteration:
  1. rollout: sample responses to the step's prompts (KV cache), score them;
  2. one no-grad pass gives the old log-probs and values, one the reference log-probs;
  3. rewards = score on the last token - kl_coef * KL per token; GAE; whitened advantages;
  4. ppo_epochs passes over num_mini_batches mini-batches, each one optimizer update of the
     clipped policy loss + vf_coef * clipped value loss; stop early when approx KL exceeds
     target_approx_kl.
The old log-probs come from the same forward, on the same micro-batches, as the first
update's, so the ratio is exactly 1 on the first mini-batch of the first epoch. Under data
parallelism each process samples its share of the prompts with its own seed; whitening,
the KL controller, the approx-KL stop and objective/* use every process's rollouts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from prefalign.algorithms.reference import AdaptersOff, FrozenCopy, make_reference
from prefalign.batches import RolloutBatch
from prefalign.config import Section, option, option_like, require
from prefalign.errors import ConfigError
from prefalign.generation import SamplingConfig, SamplingOptions, generate
from prefalign.logprobs import LogpsModel
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
from prefalign.scoring import TextPrompts, load_scorer, row_columns
from prefalign.train.run import Run
from prefalign.train.sections import (
    MergeOption,
    ModelOptions,
    OptimOptions,
    PromptDataOptions,
    RunOptions,
)


@dataclass(frozen=True)
class PPOOptions(Section):
    """The ppo section: the scorer, the critic, the KL penalty, GAE and the clipped update."""

    SECTION = "ppo"

    reward_model: str | None = option(None, "reward model directory (from prefalign reward)")
    reward_fn: str | None = option(
        None, "scorer instead of a reward model: module:function or a built-in scorer spec")
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
        require(not (self.reward_model and self.reward_fn), "reward_model",
                "and reward_fn exclude each other: give one")
        require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        require(self.target_kl is None or self.target_kl > 0, "target_kl", "must be > 0")
        require(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        require(self.cliprange > 0 and self.cliprange_value > 0, "cliprange", "must be > 0")
        require(self.ppo_epochs >= 1 and self.num_mini_batches >= 1, "ppo_epochs",
                "and num_mini_batches must be >= 1")
        super().validate()


@dataclass(frozen=True)
class PPOConfig(ModelOptions, PromptDataOptions, OptimOptions, MergeOption, RunOptions,
                SamplingOptions, PPOOptions):
    """`prefalign ppo`: model, prompts, optim, run, sampling and the ppo section. No eval
    set, and no truncation or length options: prompts are sampled from as they are."""

    COMMAND = "ppo"
    # The loop's length grouping has no lengths to group prompts by.
    group_by_length: ClassVar[bool] = False

    data: str = option_like(PromptDataOptions, "data", "",
                            "prompts to sample from: JSONL, JSON, Parquet, CSV or a datasets "
                            "folder (rows with prompt or messages, or preference rows)")
    max_new_tokens: int = option_like(SamplingOptions, "max_new_tokens", 64)
    temperature: float = option_like(SamplingOptions, "temperature", 0.7,
                                     "sampling temperature (> 0: PPO needs sampling)")

    def validate(self) -> None:
        super().validate()
        require(self.temperature > 0, "temperature", "must be > 0 (PPO needs sampling)")


Scorer = Callable[[list, list], list]


class PPO:
    """Rollouts and the clipped PPO update for the training loop (see module docstring)."""

    progress_keys = ("objective/scores", "objective/kl")

    def __init__(self, config: PPOConfig, tokenizer: Any, scorer: Scorer, accelerator: Any,
                 reference: AdaptersOff | FrozenCopy | None = None, samples_path=None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.accelerator = accelerator
        self.reference = reference  # from make_reference; None only if nothing is rolled out
        self.samples_path = samples_path
        self.minibatches_per_step = config.num_mini_batches
        self.kl_ctl = (AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
                       if config.target_kl else FixedKLController(config.kl_coef))
        self.iteration = 0
        self._metrics: dict[str, Any] = {}
        self._approxkl: list[Tensor] = []

    # -- loop protocol ----------------------------------------------------------------
    def units(self, rows: list[dict]) -> float:
        return float(len(rows))

    def collate(self, rows: list[dict]) -> RolloutBatch:
        """Experience rows -> a RolloutBatch of right-padded (B, T) tensors."""
        length = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, value: Any = 0) -> Tensor:
            out = torch.full((len(rows), length), value, dtype=rows[0][key].dtype)
            for i, r in enumerate(rows):
                out[i, : len(r[key])] = r[key]
            return out

        scored = {key: pad(key) for key in ("old_token_logps", "old_values", "advantages",
                                            "returns") if key in rows[0]}
        return RolloutBatch(pad("input_ids", self.tokenizer.pad_token_id),
                            pad("attention_mask"), pad("completion_mask"), **scored)

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

    def plan(self, model, micro: list[list[dict]]) -> Iterator[tuple[list[list[dict]], float]]:
        """Rollout for this step's prompts, then the updates of every epoch and mini-batch."""
        c = self.config
        prompts = [f for m in micro for f in m]
        rows = self._rollout(model, prompts)
        size = c.batch_size * c.grad_accum
        procs = self.accelerator.num_processes
        rng = random.Random(c.seed * 7919 + self.iteration)
        self._approxkl.clear()
        for epoch in range(c.ppo_epochs):
            # Epoch 0 keeps the rollout's order: its first micro-batches are exactly those
            # the old log-probs were computed on.
            order = list(range(len(rows))) if epoch == 0 else rng.sample(range(len(rows)), len(rows))
            for start in range(0, len(rows), size):
                chosen = [rows[i] for i in order[start : start + size]]
                batches = [chosen[i : i + c.batch_size] for i in range(0, len(chosen), c.batch_size)]
                self._approxkl.clear()
                yield batches, float(len(chosen) * procs)
                if c.target_approx_kl and self._mean_approxkl() > c.target_approx_kl:
                    self._metrics["policy/early_stop_epoch"] = epoch
                    return

    def _mean_approxkl(self) -> float:
        """Mean approx KL of the last update over every process, so all stop together."""
        if not self._approxkl:
            return 0.0
        total, count = self._global_sums(torch.stack(self._approxkl).sum(), len(self._approxkl))
        return total / count

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
        acc = self.accelerator
        if acc.num_processes == 1:
            return values
        return acc.reduce(values.to(acc.device), reduction="sum").to(values.device)

    def pop_metrics(self) -> dict[str, Any]:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.iteration = state["iteration"]

    # -- rollout ----------------------------------------------------------------------
    @torch.no_grad()
    def _rollout(self, model, prompts: list[dict]) -> list[dict]:
        c, acc = self.config, self.accelerator
        unwrapped = acc.unwrap_model(model)
        sampling = SamplingConfig.of(c, seed=c.seed * 100_003 + self.iteration
                                     * acc.num_processes + acc.process_index,
                                     batch_size=c.batch_size)
        gens = generate(unwrapped.policy, self.tokenizer, [p["prompt"] for p in prompts],
                        sampling, progress=False)
        rows = [self._row(g) for g in gens]
        # Old log-probs and values: the update's forward, on the update's micro-batches.
        for start in range(0, len(rows), c.batch_size):
            part = rows[start : start + c.batch_size]
            inputs = self.collate(part).to(acc.device).inputs()
            with acc.autocast():
                out, values = model(*inputs, temperature=c.temperature, stats=True,
                                    chunk_size=c.logps_chunk_size)
                ref = self._reference_logps(unwrapped, inputs)
            for i, row in enumerate(part):
                n = len(row["input_ids"])
                row["old_token_logps"] = out.token_logps[i, :n].float().cpu()
                row["old_values"] = values[i, :n].float().cpu()
                row["ref_token_logps"] = ref[i, :n].float().cpu()
                row["entropy"] = float(masked_mean(out.entropy[i, :n], out.mask[i, :n]))
        texts = [g.text for g in gens]
        scores = torch.tensor(self.scorer([p["prompt"] for p in prompts], texts,
                                          row_columns(prompts)), dtype=torch.float32)
        return self._advantages(rows, scores, prompts, texts, gens)

    def _row(self, g) -> dict[str, Tensor]:
        ids = torch.tensor(g.prompt_ids + g.response_ids)
        completion = torch.zeros(len(ids), dtype=torch.bool)
        completion[len(g.prompt_ids):] = True
        return {"input_ids": ids, "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "completion_mask": completion, "finished": g.finished}

    def _reference_logps(self, unwrapped, inputs) -> Tensor:
        """(B, T) reference log-probs per token, at the sampling temperature: the KL
        penalty is per token (a FrozenCopy ignores the policy; AdaptersOff reads it)."""
        policy = LogpsModel(unwrapped.policy)
        out = self.reference.score(policy, *inputs, temperature=self.config.temperature)
        return out.token_logps

    def _advantages(self, rows, scores: Tensor, prompts, texts, gens) -> list[dict]:
        c = self.config
        raw_scores = scores.clone()
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
        pad = lambda key: self._pad_key(rows, key, batch.input_ids.shape[1])  # noqa: E731
        old, ref, values = pad("old_token_logps"), pad("ref_token_logps"), pad("old_values")
        kl = kl_estimate(old, ref, c.kl_estimator) * mask
        kl_coef = self.kl_ctl.value
        rewards = shaped_rewards(scores, kl, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        advantages = masked_whiten(advantages, mask, reduce=self.sum_across)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            row["advantages"], row["returns"] = advantages[i, :n], returns[i, :n]
        kl_per_seq = kl.sum(1)
        # Per-sequence means over every process's rollouts (one collective): the KL
        # controller must see the same global KL everywhere, and the logs the global batch.
        entropy = torch.tensor([r["entropy"] for r in rows])
        n, score_sum, kl_sum, rlhf_sum, entropy_sum, tokens, eos_sum, value_sum = self._global_sums(
            len(rows), raw_scores.sum(), kl_per_seq.sum(), (scores - kl_coef * kl_per_seq).sum(),
            entropy.sum(), mask.sum(), finished.sum(), (values * mask).sum())
        self._metrics = {
            "objective/scores": score_sum / n,
            "objective/kl": kl_sum / n,
            "objective/non_score_reward": -kl_coef * kl_sum / n,
            "objective/rlhf_reward": rlhf_sum / n,
            "objective/entropy": entropy_sum / n,
            # Per process, averaged over processes when logged (not a sum of parts).
            "val/explained_variance": explained_variance(values, returns, mask).item(),
            "val/mean": value_sum / max(tokens, 1.0),
            "kl_coef": kl_coef,
            "response_length": tokens / n,
            "eos_fraction": eos_sum / n,
        }
        self.kl_ctl.update(self._metrics["objective/kl"], int(n))
        self._write_samples(prompts, texts, raw_scores)
        self.iteration += 1
        return rows

    @staticmethod
    def _pad_key(rows, key: str, length: int) -> Tensor:
        out = torch.zeros(len(rows), length)
        for i, r in enumerate(rows):
            out[i, : len(r[key])] = r[key]
        return out

    def _write_samples(self, prompts, texts, scores) -> None:
        c = self.config
        if (self.samples_path is None or not self.accelerator.is_main_process
                or self.iteration % c.logging_steps):
            return
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for p, t, s in list(zip(prompts, texts, scores.tolist()))[: c.num_samples]:
                handle.write(json.dumps({"step": self.iteration + 1, "prompt": p["prompt"],
                                         "response": t, "score": s}) + "\n")


def run_ppo(config: PPOConfig, accelerator=None, scorer: Callable | None = None):
    """`prefalign ppo`: train, then write OUTPUT/final (+ value_head.safetensors).

    scorer: a Python function (prompts, responses) -> scores (or one taking a single
    pair), used instead of config.reward_model / reward_fn.
    """
    from prefalign.models import save_value_head
    from prefalign.train.distributed import shards_parameters

    _require_scorer(config, scorer)
    run = Run.open(config, accelerator)
    prompts, _ = run.load_prompts(config.data)
    run.load_model()
    if shards_parameters(run.accelerator):
        # Sampling runs the unwrapped policy, which under FSDP / ZeRO-3 holds only a shard.
        raise ConfigError("PPO does not run under FSDP or DeepSpeed ZeRO-3 yet: sampling needs "
                          "the whole policy on every process. Use DDP or ZeRO-2 (see "
                          "docs/distributed.md)")
    module = policy_with_value(run, config)
    score = TextPrompts(load_scorer(scorer or config.reward_model or config.reward_fn),
                        run.tokenizer)
    algorithm = PPO(config, run.tokenizer, score, run.accelerator, make_reference(run, config),
                    samples_path=run.output_dir / "samples.jsonl")
    return run.fit(algorithm, prompts, [], model=module,
                   extra=lambda directory: save_value_head(module.value_head, directory))


def _require_scorer(config: PPOConfig, scorer: Callable | None) -> None:
    """What scores the rollouts must be given, and a reward model checked before minutes
    of loading the policy."""
    if not (scorer or config.reward_model or config.reward_fn):
        raise ConfigError("config key 'reward_model' or 'reward_fn' is required: the reward "
                          "model directory or a scorer spec (module:function, a built-in)")
    if not scorer and config.reward_model:
        from prefalign.models import check_reward_model

        check_reward_model(config.reward_model)


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
