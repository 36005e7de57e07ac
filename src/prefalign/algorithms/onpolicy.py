"""The on-policy loop: PPO and GRPO (algorithms.ppo, algorithms.grpo) on one engine.

Each training step is one iteration over a batch of prompts, read top to bottom in
`OnPolicyTrainer._train_step`:
  1. rollout     sample `samples_per_prompt` responses per prompt (the generation engine,
                 generation_engine: KV cache, stop strings, EOS);
  2. rewards     the scorer's score of each (prompt, response);
  3. log-probs   one no-grad pass of the trained model on the update's micro-batches (the
                 algorithm's `rollout_pass`: old token log-probs, and e.g. PPO's values),
                 and the reference's token log-probs (algorithms.reference; none when
                 the algorithm has no reference);
  4. advantages  the algorithm's choice (`advantages(rollout)`), which returns the
                 iteration's metrics;
  5. updates     `epochs` passes over the rollout, each `mini_batches` optimizer updates
                 through the public `Trainer.step`; the algorithm may stop them early;
  6. log         the metrics join the step's window; samples.jsonl gets a few samples.
Trainer.train then logs, checkpoints and resumes exactly as for the offline loop; the
algorithm's own state (e.g. an adaptive KL coefficient) rides in the checkpoint.

An algorithm is a small object (`OnPolicyAlgorithm`): its reference, rollout settings, `collate` and
`units` of the rollout rows, `rollout_pass`, `advantages`, `compute_loss`, `stop_early`,
and its state. Under data parallelism every process samples its share of the prompts
(`process_prompts`: a prompt's samples on one process) with noise keyed by each prompt's
position in the window, so every process count samples the same; the algorithm reduces its
statistics across processes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from prefalign.batches import RolloutBatch
from prefalign.config import option_like, require
from prefalign.errors import ConfigError, PrefalignError
from prefalign.generation import SamplingConfig, SamplingOptions
from prefalign.generation_engine import EngineOptions, make_engine
from prefalign.logprobs import LogpsModel
from prefalign.rl import nanstd
from prefalign.scoring import Scorer, TextPrompts, load_scorer, row_columns
from prefalign.scoring.rewards import RewardOptions, check_config_rewards, config_rewards
from prefalign.text import warn
from prefalign.train.loop import Trainer, TrainResult
from prefalign.train.run import Run
from prefalign.train.sections import (
    MergeOption,
    ModelOptions,
    OptimOptions,
    PromptDataOptions,
    RunOptions,
)
from prefalign.train.window import Features, Share, split_window


def pad_rows(rows: list[dict], key: str, length: int, value: float = 0,
             dtype: torch.dtype | None = None) -> Tensor:
    """(len(rows), length): each row's 1-D tensor `key`, right-padded with `value`, in the
    rows' dtype unless `dtype` is given. The collate of every on-policy algorithm."""
    out = torch.full((len(rows), length), value, dtype=dtype or rows[0][key].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row[key])] = row[key]
    return out


def collate_rollout(rows: list[dict], pad_token_id: int) -> RolloutBatch:
    """Rollout rows -> a RolloutBatch of right-padded (B, T) tensors, with the per-token
    old log-probs, old values, advantages and returns the rows have."""
    pad = partial(pad_rows, rows, length=max(len(r["input_ids"]) for r in rows))
    scored = {key: pad(key) for key in ("old_token_logps", "old_values", "advantages",
                                        "returns") if key in rows[0]}
    return RolloutBatch(pad("input_ids", value=pad_token_id), pad("attention_mask"),
                        pad("completion_mask"), **scored)


def sum_across(accelerator: Any, values: Tensor) -> Tensor:
    """`values` summed over every process (identity on one): the `reduce` of masked.py, so
    that whitening uses the mean and variance of every process's rollouts, as one process
    holding them all would."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device), reduction="sum").to(values.device)


def gather_across(accelerator: Any, values: Tensor) -> Tensor:
    """(N,) of this process -> (P * N,) float in process order (every process has N rows)."""
    if accelerator.num_processes == 1:
        return values.float()
    return accelerator.gather(values.float().to(accelerator.device)).cpu()


@dataclass(frozen=True)
class OnPolicyConfig(ModelOptions, PromptDataOptions, OptimOptions, MergeOption, RunOptions,
                     RewardOptions, EngineOptions, SamplingOptions):
    """The sections every on-policy command composes with its own (PPOConfig, GRPOConfig):
    model, prompts, optim, run, reward, sampling. No eval set and no truncation or length options:
    prompts are sampled from as they are. A command sets COMMAND and may redeclare the
    temperature default with option_like."""

    # The loop's length grouping has no lengths to group prompts by.
    group_by_length: ClassVar[bool] = False

    data: str = option_like(PromptDataOptions, "data", "",
                            "prompts to sample from: JSONL, JSON, Parquet, CSV or a datasets "
                            "folder (rows with prompt or messages, or preference rows)")
    max_new_tokens: int = option_like(SamplingOptions, "max_new_tokens", 64)

    def validate(self) -> None:
        super().validate()
        require(self.temperature > 0, "temperature",
                f"must be > 0 ({self.COMMAND.upper()} needs sampling)")


class OnPolicyAlgorithm(Protocol):
    progress_keys: tuple[str, ...]
    reference: Any  # the Reference from make_reference: token log-probs to stay close to
    samples_per_prompt: int  # G responses sampled per prompt
    epochs: int  # update passes over each rollout
    mini_batches: int  # optimizer updates per pass
    # True: a sample no reward term scored stays NaN (with a warning) for `advantages` to
    # leave out; False: the run stops on it.
    unscorable_rewards: bool
    # The temperature of the rollout's and the reference's log-probs; None: the sampling
    # temperature (online DPO's loss reads the model's own log-probs, at 1).
    logps_temperature: float | None

    def collate(self, rows: Features) -> RolloutBatch: ...

    def units(self, rows: Features) -> float: ...

    def rollout_pass(self, model: torch.nn.Module, batch: RolloutBatch) -> dict[str, Tensor]:
        """No-grad: per-token (B, T) or per-row (B,) values kept on each row, among them
        "old_token_logps"."""

    def advantages(self, rollout: Rollout) -> dict[str, Any]:
        """Set each row's advantages (and e.g. returns), or replace rollout.rows by the rows
        the updates read (online DPO: one per ranked pair); return the iteration's metrics."""

    def compute_loss(self, model: torch.nn.Module, batch: RolloutBatch
                     ) -> tuple[Tensor, dict[str, Any]]: ...

    def stop_early(self) -> bool:
        """After each update: whether to end this rollout's updates."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stateless:
    """The OnPolicyAlgorithm methods of an algorithm that never ends a rollout's updates
    early and carries nothing between iterations (GRPO, RLOO, REINFORCE++, online DPO;
    PPO has an approx-KL stop and an adaptive KL coefficient)."""

    def stop_early(self) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Rollout:
    """One iteration's samples: per sample its prompt row, response text and row of
    tensors (input_ids, attention_mask, completion_mask, finished, then the log-prob
    passes' values and the advantages), and the scorer's raw scores (N,)."""

    prompts: list[dict[str, Any]]
    texts: list[str]
    rows: list[dict[str, Any]]
    scores: Tensor | None = None


def rollout_row(generation) -> dict[str, Any]:
    """A sampled sequence as a row: prompt + response ids, the completion mask on the
    response, and whether it ended with EOS or a stop string."""
    ids = torch.tensor(generation.prompt_ids + generation.response_ids)
    completion = torch.zeros(len(ids), dtype=torch.bool)
    completion[len(generation.prompt_ids):] = True
    return {"input_ids": ids, "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "completion_mask": completion, "finished": generation.finished}


def process_prompts(window: int, rows_per_update: int, samples_per_prompt: int,
                    procs: int, rank: int) -> list[int]:
    """The positions of process `rank`'s prompts in a window of `window` prompts (a
    multiple of procs), each prompt samples_per_prompt (G) rows: every process gets as many
    prompts, and a prompt's G rows stay on one process (groups are never split).

    A process's update reads rows_per_update (batch_size x grad_accum) of its rows, in
    order on the first pass over a rollout. When G divides rows_per_update, the window is
    cut into blocks of the prompts one update reads over every process, each block into one
    share per process: a first pass's update then reads the same rows whatever the number
    of processes. Otherwise an update cuts a group on any number of processes, and each
    process takes one contiguous share.
    """
    per_update = rows_per_update // samples_per_prompt
    share = per_update if per_update and rows_per_update % samples_per_prompt == 0 \
        else window // procs
    return [k for block in split_window(list(range(window)), share, procs) for k in block[rank]]


class OnPolicyTrainer(Trainer):
    """The loop of Trainer (logging, checkpoints, exact resume) with a step that rolls out
    and updates. train_features are prompts; `policy` is the causal LM that samples and
    that the reference reads (the trained `model` may wrap it, e.g. with a value head)."""

    def __init__(self, config: Any, model: torch.nn.Module, algorithm: OnPolicyAlgorithm,
                 prompts: Features, eval_features: Features | None = None,
                 accelerator: Any = None, *, policy: torch.nn.Module, tokenizer: Any,
                 scorer: Callable, samples_path: Path | None = None) -> None:
        self.policy, self.tokenizer, self.scorer = policy, tokenizer, scorer
        self.engine = make_engine(config.generation_engine, policy, tokenizer)
        self.samples_path = samples_path
        super().__init__(config, model, algorithm, prompts, eval_features, accelerator)

    @property
    def global_batch(self) -> int:
        """Prompts per iteration, over every process: each mini-batch one optimizer step."""
        return super().global_batch * self.algorithm.mini_batches

    # -- one iteration --------------------------------------------------------------------
    def _train_step(self) -> None:
        prompts, positions, ids = self._next_prompts()
        self.model.train()
        rollout = self.sample(prompts, positions)  # 1. rollout
        rollout.scores = self.score(rollout)  # 2. rewards
        self.rollout_logps(rollout)  # 3. old and reference token log-probs
        metrics = self.algorithm.advantages(rollout)  # 4. advantages
        self.write_samples(rollout)
        metrics.update(self.update(rollout.rows, ids))  # 5. updates
        self.window.add(metrics, weight=1.0)  # 6. log (Trainer.train writes it)
        self.scheduler.step()
        self.global_step += 1

    def _next_prompts(self) -> tuple[Features, list[int], list[int]]:
        """This process's prompts of the next window, their positions in the window (what
        their noise is keyed by), and the window's positions in train_features."""
        c, acc = self.config, self.accelerator
        order = self._next_order()
        window = [self.train_features[i] for i in order]
        # Rollouts need equally many prompts on every process (their statistics are
        # global): top a short window up with its own prompts, each one more sample.
        window += [window[i % len(window)] for i in range(-len(window) % acc.num_processes)]
        mine = process_prompts(len(window), c.batch_size * c.grad_accum,
                               self.algorithm.samples_per_prompt, acc.num_processes,
                               acc.process_index)
        return [window[k] for k in mine], mine, order

    @torch.no_grad()
    def sample(self, prompts: Features, positions: list[int]) -> Rollout:
        """G (samples_per_prompt) responses per prompt, a prompt's G consecutive. The seed
        is a function of (seed, step) and each prompt's noise is keyed by its position in
        the window: what a prompt samples depends on neither the number of processes nor
        the generation batch it lands in."""
        c, g = self.config, self.algorithm.samples_per_prompt
        # batch_size // G prompts per generation batch: about batch_size rows, as updates.
        sampling = SamplingConfig.of(c, seed=c.seed * 100_003 + self.global_step, n=g,
                                     batch_size=max(1, c.batch_size // g))
        gens = self.engine.generate([p["prompt"] for p in prompts], sampling,
                                    seed_indices=positions)
        prompts = [p for p in prompts for _ in range(g)]
        return Rollout(prompts, [x.text for x in gens], [rollout_row(x) for x in gens])

    def score(self, rollout: Rollout) -> Tensor:
        """(N,) each sample's reward: the weighted sum of the reward terms that scored it
        (TRL's nansum). Each term's mean and std over every process join the step's metrics
        as rewards/<name>/mean and /std (TRL's names). A sample no term scored (every
        function returned None) is NaN with a warning, as in TRL, for an algorithm with
        `unscorable_rewards = True` (its baselines leave NaN out, its advantage is 0);
        any other algorithm refuses it."""
        prompts = rollout.prompts
        terms = as_scorer(self.scorer).reward_terms([p["prompt"] for p in prompts],
                                                    rollout.texts, row_columns(prompts))
        total = torch.tensor(terms.total(), dtype=torch.float32)
        per_term = torch.tensor(terms.scores, dtype=torch.float32).reshape(len(terms.names), -1)
        unscorable = torch.isnan(total).nonzero().flatten().tolist()
        if unscorable:
            i = unscorable[0]
            where = (f"{len(unscorable)} sample(s), the first of prompt "
                     f"{str(prompts[i]['prompt'])[:60]!r} and completion {rollout.texts[i][:60]!r}")
            if not self.algorithm.unscorable_rewards:
                raise PrefalignError(f"every reward function returned None for {where}; "
                                     f"{self.config.COMMAND} needs a reward for every sample: "
                                     "return a number (e.g. 0.0) where no function applies")
            warn(f"every reward function returned None for {where}: no reward, advantage 0; "
                 "make sure some function scores every sample")
        if per_term.shape[1] and self.accelerator.num_processes > 1:
            per_term = self.accelerator.gather(per_term.T.contiguous().to(
                self.accelerator.device)).cpu().T
        self.window.add({f"rewards/{name}/{stat}": value
                         for name, scores in zip(terms.names, per_term)
                         for stat, value in (("mean", torch.nanmean(scores).item()),
                                             ("std", nanstd(scores).item()))}, weight=1.0)
        return total

    @torch.no_grad()
    def rollout_logps(self, rollout: Rollout) -> None:
        """The algorithm's pass and the reference's token log-probs (at the sampling
        temperature, or the algorithm's logps_temperature), on the micro-batches of the
        first update: its ratio is exactly 1."""
        c, acc = self.config, self.accelerator
        policy = LogpsModel(self.policy)
        # An algorithm whose loss reads the model's own log-probs (online DPO) sets 1.0.
        temperature = self.algorithm.logps_temperature or c.temperature
        for start in range(0, len(rollout.rows), c.batch_size):
            part = rollout.rows[start : start + c.batch_size]
            batch = self.algorithm.collate(part).to(acc.device)
            with acc.autocast():
                values = self.algorithm.rollout_pass(self.model, batch)
                # No reference (e.g. GRPO with beta 0): its forward would be thrown away.
                if self.algorithm.reference is not None:
                    values["ref_token_logps"] = self.algorithm.reference.score(
                        policy, *batch.inputs(), temperature=temperature).token_logps
            for i, row in enumerate(part):
                n = len(row["input_ids"])
                for key, value in values.items():
                    row[key] = value[i, :n].float().cpu() if value.dim() == 2 else float(value[i])

    def update(self, rows: Features, ids: list[int]) -> dict[str, Any]:
        """`epochs` passes over the rows, each cut into mini-batches of batch_size x
        grad_accum rows per process, one optimizer update each."""
        c, algo = self.config, self.algorithm
        size = c.batch_size * c.grad_accum
        rng = random.Random(c.seed * 7919 + self.global_step + 1)
        for epoch in range(algo.epochs):
            # Epoch 0 keeps the rollout's order: its first micro-batches are exactly those
            # the old log-probs were computed on.
            order = list(range(len(rows))) if epoch == 0 else rng.sample(range(len(rows)), len(rows))
            for start in range(0, len(rows), size):
                chosen = [rows[i] for i in order[start : start + size]]
                shares = [Share(chosen[i : i + c.batch_size], algo.units(chosen[i : i + c.batch_size]))
                          for i in range(0, len(chosen), c.batch_size)]
                self.step(shares, self._global_units(shares), ids)
                if algo.stop_early():
                    return {"policy/early_stop_epoch": epoch}
        return {}

    def _global_units(self, shares: list[Share]) -> float:
        """The update's units over every process (e.g. completion tokens for a token-sum
        loss), so that Trainer.step's weights units / total make accumulation exact."""
        total = torch.tensor(sum(s.units for s in shares), dtype=torch.float64)
        acc = self.accelerator
        if acc.num_processes > 1:
            total = acc.reduce(total.to(acc.device), reduction="sum").cpu()
        return float(total)

    def write_samples(self, rollout: Rollout) -> None:
        """A few samples of every logging_steps-th iteration into samples.jsonl."""
        c = self.config
        if (self.samples_path is None or not self.accelerator.is_main_process
                or self.global_step % c.logging_steps):
            return
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for p, t, s in list(zip(rollout.prompts, rollout.texts, rollout.scores.tolist())
                                )[: c.num_samples]:
                handle.write(json.dumps({"step": self.global_step + 1, "prompt": p["prompt"],
                                         "response": t, "score": s}) + "\n")

    # -- checkpoints: the algorithm's state rides in the trainer state ---------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {**super()._trainer_state(), "algorithm": self.algorithm.state_dict()}

    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        self.algorithm.load_state_dict(state["algorithm"])


def fit_on_policy(run: Run, algorithm: OnPolicyAlgorithm, prompts: Features, *,
                  model: torch.nn.Module, scorer: Callable,
                  extra: Callable[[Path], None] | None = None) -> TrainResult:
    """Run.fit with the on-policy loop over `prompts` (run.model samples), then OUTPUT/final."""
    trainer = partial(OnPolicyTrainer, policy=run.model, tokenizer=run.tokenizer, scorer=scorer,
                      samples_path=run.output_dir / "samples.jsonl")
    return run.fit(algorithm, prompts, [], trainer_cls=trainer, model=model, extra=extra)


def open_on_policy_run(config: Any, accelerator: Any, scorer: Callable | None, name: str
                       ) -> tuple[Run, list[dict]]:
    """What every on-policy trainer does first: check that something scores the rollouts
    (a reward model is checked before the minutes the policy takes to load), open the run,
    load the prompts and the policy; sharded engines are refused."""
    from prefalign.train.distributed import shards_parameters

    if not (scorer or config.reward_model or config.reward_fn):
        raise ConfigError("config key 'reward_model' or 'reward_fn' is required: the reward "
                          "model directory or a scorer spec (module:function, a built-in)")
    check_config_rewards(config, scorer)  # a wrong weight count, before any loading
    if not scorer and config.reward_model:
        from prefalign.models import check_reward_model

        check_reward_model(config.reward_model)
    run = Run.open(config, accelerator)
    prompts, _ = run.load_prompts(config.data)
    run.load_model()
    if shards_parameters(run.accelerator):
        # Sampling runs the unwrapped policy, which under FSDP / ZeRO-3 holds only a shard.
        raise ConfigError(f"{name} does not run under FSDP or DeepSpeed ZeRO-3 yet: sampling "
                          "needs the whole policy on every process. Use DDP or ZeRO-2 (see "
                          "docs/distributed.md)")
    return run, prompts


def train_critic_free(config: Any, accelerator: Any, scorer: Callable | None, name: str,
                      algorithm_cls: Callable, kl_coef: float) -> TrainResult:
    """The whole run of a critic-free algorithm that scores rollouts with the config's
    rewards (GRPO, RLOO, REINFORCE++): open the run, build the reference only when the KL
    coefficient `kl_coef` is > 0, train `algorithm_cls(config, pad id, accelerator,
    reference)` on the model's log-probs, write OUTPUT/final."""
    from prefalign.algorithms.reference import make_reference

    run, prompts = open_on_policy_run(config, accelerator, scorer, name)
    score = rollout_scorer(run, config, scorer)
    reference = make_reference(run, config) if kl_coef > 0 else None
    algorithm = algorithm_cls(config, run.tokenizer.pad_token_id, run.accelerator, reference)
    model = LogpsModel(run.model, chunk_size=config.logps_chunk_size)
    return fit_on_policy(run, algorithm, prompts, model=model, scorer=score)


def rollout_scorer(run: Run, config: Any, scorer: Callable | None) -> Scorer:
    """The scorer of the rollouts: `scorer` (a Python function), else the reward model or
    the reward_fn terms, weighted by reward_weights; chat prompts reach it rendered as text."""
    return TextPrompts(config_rewards(config, scorer), run.tokenizer)


def as_scorer(scorer: Callable) -> Scorer:
    """A Scorer as is; a plain function (a caller's own OnPolicyTrainer) wrapped as one."""
    return scorer if isinstance(scorer, Scorer) else load_scorer(scorer)
