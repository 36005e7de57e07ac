"""Reward modelling (`prefalign reward`); scoring with the trained model is scoring.reward_model.

Training: chosen and rejected sequences of B pairs go through one (2B, T) forward; the loss
is `losses.bradley_terry_loss` (Ouyang et al. 2022, arXiv:2203.02155, Eq. 1) with a row's
`margin` when the data has one and optional reward centring, as TRL 1.16's RewardTrainer.
With `prefix_sharing` each pair is one [prompt | chosen | rejected] row instead
(packing.share_prefix), so the prompt goes through the backbone once; same rewards.
LoRA runs train the adapters and the whole `score` head (what PEFT's modules_to_save does);
OUTPUT/final is always a merged HF sequence-classification directory.

Calibration: the expected calibration error (evaluation.calibration) is a function of
the whole eval set's bins, and the loop's `evaluate()` can only average per-batch numbers
(the mean of per-batch ECEs is not the ECE), so `run_reward` scores the eval set once more
after training and logs `eval/ece` as its own metrics.jsonl record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from prefalign.batches import PreferenceBatch
from prefalign.config import Section, option, require
from prefalign.data import collate_preferences
from prefalign.evaluation.calibration import ECE_BINS, expected_calibration_error
from prefalign.losses import bradley_terry_loss, weighted_mean
from prefalign.models import RewardModel, init_reward_model, reward_token_index
from prefalign.packing import PackedInputs, fallback_note, share_prefix_positions
from prefalign.scoring.reward_model import pair_sequences, score_sequences
from prefalign.train.distributed import full_model
from prefalign.train.loop import Trainer, TrainResult
from prefalign.train.metrics import MetricLogger
from prefalign.train.run import Run
from prefalign.train.sections import (
    DataOptions,
    EvalOptions,
    ModelOptions,
    OptimOptions,
    RunOptions,
)


@dataclass(frozen=True)
class RewardOptions(Section):
    """The reward section: reward centring, prefix sharing, dropout."""

    SECTION = "reward"

    center_rewards_coefficient: float | None = option(
        None, "weight of mean((r_chosen + r_rejected)^2), keeping rewards near zero "
        "(arXiv:2312.09244; TRL suggests 0.01); none = 0")
    prefix_sharing: bool = option(
        False, "one row per pair, [prompt | chosen | rejected], so the prompt is computed "
        "once (rejected tokens do not attend to chosen ones); the same rewards")
    disable_dropout: bool = option(
        True, "switch off every dropout (the model's and LoRA's), so that the chosen and "
        "rejected scores differ by the inputs only, as TRL's RewardTrainer does by default")

    def validate(self) -> None:
        require(self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
                "center_rewards_coefficient", "must be >= 0")
        super().validate()


@dataclass(frozen=True)
class RewardConfig(ModelOptions, DataOptions, EvalOptions, OptimOptions, RunOptions,
                   RewardOptions):
    """`prefalign reward`: the shared trainer sections but `merge` (OUTPUT/final is always a
    merged model), and the reward section."""

    COMMAND = "reward"


class BradleyTerry:
    """compute_loss for reward modelling; the model maps (ids, mask) (2B, T) to rewards (2B,).

    prefix_sharing: batches also carry [prompt | chosen | rejected] rows, which the model
    (RewardModel.forward's `packed`) reads instead.
    """

    progress_keys = ("accuracy", "margin")

    def __init__(self, pad_token_id: int, center_coef: float | None = None,
                 prefix_sharing: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.center_coef = center_coef or 0.0
        self.prefix_sharing = prefix_sharing

    def collate(self, features: list[dict[str, Any]]) -> PreferenceBatch:
        batch = collate_preferences(features, self.pad_token_id)
        if self.prefix_sharing:
            # The plain path's rule for the reward token (HF's: rightmost non-pad id), on
            # right-padded rows, where a column is the position in its own sequence.
            last = reward_token_index(batch.input_ids, batch.attention_mask, self.pad_token_id)
            batch.packed = PackedInputs.from_keys(
                share_prefix_positions(features, self.pad_token_id, last))
        return batch

    def units(self, features: list[dict[str, Any]]) -> float:
        # The loss is a weighted mean over pairs: weight 2 counts like the pair repeated.
        return float(sum(f.get("weight", 1.0) for f in features))

    def compute_loss(self, model: torch.nn.Module, batch: PreferenceBatch
                     ) -> tuple[Tensor, dict]:
        rewards = model(batch.input_ids, batch.attention_mask,
                        **batch.packed_kwargs()).float()  # (2B,)
        chosen, rejected = rewards[: batch.pairs], rewards[batch.pairs :]
        margin = None if batch.margin is None else batch.margin.to(rewards)
        losses = bradley_terry_loss(chosen, rejected, margin, self.center_coef)
        loss = weighted_mean(losses, batch.weight)
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {
            "accuracy": (chosen > rejected).float().mean(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "margin": (chosen - rejected).mean(),
        }


# -- prefalign reward -------------------------------------------------------------------


def reward_model_builder(config: RewardConfig):
    """Run.load_model's `build`: a RewardModel in place of the causal LM."""
    from prefalign.models import check_vocabulary, prepare_for_training

    def build(tokenizer) -> RewardModel:
        model = init_reward_model(config.model, tokenizer, config.trust_remote_code)
        check_vocabulary(tokenizer, model.backbone, config.model)
        prepare_for_training(model.backbone, config)
        model.score.requires_grad_(True)  # LoRA freezes the backbone; the head always trains
        return model

    return build


class RewardTrainer(Trainer):
    """The loop, then `eval/ece` over the whole eval set (see the module docstring)."""

    def __init__(self, config: RewardConfig, model: RewardModel, *args: Any, **kwargs: Any):
        super().__init__(config, model, *args, **kwargs)
        self.reward_model = model  # unwrapped: full_model finds its gathered weights by it

    def train(self) -> TrainResult:
        result = super().train()
        if self.eval_features:
            with full_model(self.reward_model, self.accelerator) as model:  # all gather
                if self.accelerator.is_main_process:
                    self.log_calibration(model, result)
        return result

    def log_calibration(self, model: RewardModel, result: TrainResult) -> dict[str, Any]:
        """Score the whole eval set with `model` (whole weights), log eval/ece (+ the pair
        count) to metrics.jsonl, print it."""
        evals = self.eval_features
        scores = torch.tensor(score_sequences(model, pair_sequences(evals),
                                              self.config.batch_size, self.accelerator.autocast))
        chosen, rejected = scores[: len(evals)], scores[len(evals) :]
        record = {"eval/ece": expected_calibration_error(chosen, rejected),
                  "eval/ece_pairs": len(evals)}
        logger = MetricLogger(self.output_dir, True, "none", resume_step=result.step)
        logger.log(result.step, record)
        logger.close()
        result.history.append({"step": result.step, **record})
        accuracy = (chosen > rejected).double().mean().item()
        self.accelerator.print(f"eval: accuracy {accuracy:.4f}, expected calibration error "
                               f"{record['eval/ece']:.4f} ({len(evals)} pairs, {ECE_BINS} bins)")
        return record


def run_reward(config: RewardConfig, accelerator: Accelerator | None = None) -> TrainResult:
    """`prefalign reward`: train, then write OUTPUT/final, metrics.jsonl and config.yaml."""
    run = Run.open(config, accelerator)
    train, _ = run.load("preferences", config.data)
    evals, _ = run.load("preferences", config.eval_data, "eval_data")
    model = run.load_model(reward_model_builder(config))
    # A model that cannot take the shared-prefix mask trains on padded rows, logged.
    note = fallback_note(model, "prefix_sharing") if config.prefix_sharing else None
    if note:
        run.note(note)
    algorithm = BradleyTerry(model.pad_token_id, config.center_rewards_coefficient,
                             prefix_sharing=config.prefix_sharing and not note)
    return run.fit(algorithm, train, evals, trainer_cls=RewardTrainer, model=model)
