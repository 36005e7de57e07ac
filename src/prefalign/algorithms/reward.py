"""Reward modelling (`prefalign reward`) and scoring with a reward model (`prefalign score`).

Training: chosen and rejected sequences of B pairs go through one (2B, T) forward; the loss
is `losses.bradley_terry_loss` (Ouyang et al. 2022, arXiv:2203.02155, Eq. 1) with a row's
`margin` when the data has one and optional reward centring, as TRL 1.16's RewardTrainer.
With `prefix_sharing` each pair is one [prompt | chosen | rejected] row instead
(packing.share_prefix), so the prompt goes through the backbone once; same rewards.
LoRA runs train the adapters and the whole `score` head (what PEFT's modules_to_save does);
OUTPUT/final is always a merged HF sequence-classification directory.

Calibration: the expected calibration error (`expected_calibration_error`) is a function of
the whole eval set's bins, and the loop's `evaluate()` can only average per-batch numbers
(the mean of per-batch ECEs is not the ECE), so `run_reward` scores the eval set once more
after training and logs `eval/ece` as its own metrics.jsonl record.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from prefalign.algorithms.runner import (
    FINAL_KEPT,
    Run,
    device_of,
    load_pairs,
    load_policy,
    open_run,
)
from prefalign.config import option, require
from prefalign.data import collate_preferences
from prefalign.data.collate import pad_sequences
from prefalign.data.formats import DroppedRow, normalize_row
from prefalign.data.sources import load_rows
from prefalign.data.tokenize import tokenize_preferences
from prefalign.data.unpaired import normalize_unpaired_row, tokenize_unpaired
from prefalign.errors import DataError, atomic_file, writing
from prefalign.losses import bradley_terry_loss, weighted_mean
from prefalign.packing import fallback_note, packed_kwargs, share_prefix_positions
from prefalign.reward_model import (
    RewardModel,
    check_reward_model,
    init_reward_model,
    last_token_index,
    load_reward_model,
)
from prefalign.train.checkpoint import replaced_whole
from prefalign.train.config import TrainConfig
from prefalign.train.distributed import full_model
from prefalign.train.loop import Trainer, TrainResult
from prefalign.train.metrics import MetricLogger

ECE_BINS = 10
RESPONSE_KEYS = ("response", "completion", "messages")  # single-response rows, in this order


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model options. `merge` has no effect: OUTPUT/final is always merged."""

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
        super().validate()
        require(self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
                "center_rewards_coefficient", "must be >= 0")


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

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_preferences(features, self.pad_token_id)
        if self.prefix_sharing:
            # The plain path's rule for the reward token (HF's: rightmost non-pad id), on
            # right-padded rows, where a column is the position in its own sequence.
            last = last_token_index(batch["input_ids"], batch["attention_mask"],
                                    self.pad_token_id)
            batch.update(share_prefix_positions(features, self.pad_token_id, last))
        return batch

    def units(self, features: list[dict[str, Any]]) -> float:
        # The loss is a weighted mean over pairs: weight 2 counts like the pair repeated.
        return float(sum(f.get("weight", 1.0) for f in features))

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict]:
        rewards = model(batch["input_ids"], batch["attention_mask"],
                        **packed_kwargs(batch)).float()  # (2B,)
        half = rewards.shape[0] // 2
        chosen, rejected = rewards[:half], rewards[half:]
        margin = batch.get("margin")
        losses = bradley_terry_loss(chosen, rejected, None if margin is None else margin.to(rewards),
                                    self.center_coef)
        loss = weighted_mean(losses, batch.get("weight"))
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {
            "accuracy": (chosen > rejected).float().mean(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "margin": (chosen - rejected).mean(),
        }


def expected_calibration_error(chosen: Tensor, rejected: Tensor, bins: int = ECE_BINS) -> float:
    """ECE of the preference probabilities p_i = sigmoid(r_c,i - r_r,i) over a whole set.

    The model predicts "chosen is preferred" when p_i > 1/2, with confidence
    c_i = max(p_i, 1 - p_i) in [1/2, 1]; the prediction is correct when r_c,i > r_r,i (the
    `accuracy` metric's rule; a tie is wrong). [1/2, 1] is cut into `bins` equal-width bins
    B_k = [1/2 + k w, 1/2 + (k+1) w), w = 1 / (2 bins), the last one closed. Then

        ECE = sum_k (|B_k| / N) * | mean_{i in B_k} correct_i - mean_{i in B_k} c_i |

    (Guo et al. 2017, arXiv:1706.04599, Eq. 3, over the binary prediction's confidence.)
    chosen, rejected (N,); every pair counts once (row weights are ignored).
    """
    diff = chosen.double() - rejected.double()
    p = torch.sigmoid(diff)
    confidence = torch.maximum(p, 1 - p)
    correct = (diff > 0).double()
    width = 0.5 / bins
    index = ((confidence - 0.5) / width).floor().long().clamp(0, bins - 1)
    n = diff.numel()
    gaps = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct - confidence)
    return float(gaps.abs().sum() / max(n, 1))  # sum_k |sum_{B_k} (correct - c)| / N


@torch.no_grad()
def score_sequences(model: RewardModel, sequences: list[list[int]], batch_size: int = 8,
                    autocast=None) -> list[float]:
    """Rewards of token-id sequences, right-padded in batches of similar length.

    Rows are sorted by length so a batch holds little padding; results come back in the
    order given. autocast: a context factory (the accelerator's) for mixed precision.
    """
    if not sequences:
        return []
    was_training = model.training
    model.eval()
    device = device_of(model)
    pad = model.pad_token_id if model.pad_token_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = pad_sequences([list(sequences[i]) for i in rows], pad, "right", None)
            with autocast() if autocast else nullcontext():
                rewards = model(ids.to(device), mask.to(device))
            for i, r in zip(rows, rewards.float().cpu().tolist()):
                out[i] = r
    finally:
        model.train(was_training)
    return out


def pair_sequences(features: list[dict[str, Any]]) -> list[list[int]]:
    """[prompt+chosen for every pair] + [prompt+rejected for every pair], as training sees them."""
    return ([list(f["prompt_input_ids"]) + list(f["chosen_input_ids"]) for f in features]
            + [list(f["prompt_input_ids"]) + list(f["rejected_input_ids"]) for f in features])


class RewardScorer:
    """Batched, gradient-free scores of (prompt, response) pairs for other stages (PPO,
    best-of-N, evaluation). Responses are rendered exactly as in reward training: text
    gets EOS appended once, messages go through the chat template.

        scorer = RewardScorer("outputs/rm/final")
        scorer.score(["2 + 2 ="], [" 4"])  # -> [1.73]
    """

    def __init__(self, model: RewardModel | str | Path, tokenizer=None, batch_size: int = 8,
                 max_length: int | None = 1024, max_prompt_length: int | None = 512,
                 device: str | torch.device | None = None, trust_remote_code: bool = False,
                 chat_template: str | None = None, text_as_chat: bool = False):
        from prefalign.models import load_tokenizer

        if not isinstance(model, RewardModel):
            # Refused before anything loads: a causal LM here would score with a random head.
            local = check_reward_model(model)
            tokenizer = tokenizer or load_tokenizer(str(local), trust_remote_code,
                                                    chat_template, text_as_chat)
            model = load_reward_model(model, tokenizer, trust_remote_code)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if tokenizer is None:
            raise ValueError("RewardScorer needs the tokenizer of an in-memory model")
        self.model = model if device is None else model.to(device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def tokenize(self, examples: list[dict]) -> list[list[int]]:
        """Normalised single-response examples (prompt, completion, origin) -> full ids."""
        features, _ = tokenize_unpaired(examples, self.tokenizer, self.max_length,
                                        self.max_prompt_length)
        return [f["prompt_input_ids"] + f["completion_input_ids"] for f in features]

    def score(self, prompts: list[str | list[dict]], responses: list[str | list[dict]]
              ) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        examples = [normalize_unpaired_row({"prompt": p, "completion": r, "label": True},
                                           f"<scorer> row {i}")
                    for i, (p, r) in enumerate(zip(prompts, responses))]
        return self.score_ids(self.tokenize(examples))

    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        return score_sequences(self.model, sequences, self.batch_size)


# -- prefalign score --------------------------------------------------------------------


def _default_output(data: Any) -> Path:
    path = Path(str(data))
    if path.is_file():
        return path.with_name(path.stem + ".scored.jsonl")
    return Path(path.name + ".scored.jsonl")


def _single_example(data: dict, origin: str) -> dict:
    key = next((k for k in RESPONSE_KEYS if data.get(k) is not None), None)
    if key is None:
        raise DataError(f"{origin}: nothing to score: give chosen/rejected, or a response "
                        f"({', '.join(RESPONSE_KEYS)}) with its prompt")
    return normalize_unpaired_row({"prompt": data.get("prompt"), "completion": data[key],
                                   "label": True}, origin)


SCORE_KEYS = ("score_chosen", "score_rejected", "score")


def score_file(reward_model_dir: str | Path, data: Any, output: str | Path | None = None,
               batch_size: int = 8, max_length: int | None = 1024,
               max_prompt_length: int | None = 512, trust_remote_code: bool = False,
               chat_template: str | None = None, text_as_chat: bool = False) -> Path:
    """Score every row of `data` and write the rows with their scores as JSONL -> the path.

    Preference rows (chosen/rejected, any format data.formats reads) get `score_chosen` and
    `score_rejected`; rows with a prompt and a `response` (or `completion`), or a whole
    conversation in `messages`, get `score`. Ids are rendered and truncated as in training
    (same max_length / max_prompt_length), so a pair's score_chosen is its training-time
    r_c. A pair that training would drop (e.g. chosen == rejected) is written with null
    scores and counted. output defaults to DATA.scored.jsonl beside the data file.
    chat_template, text_as_chat: as in training (data.chat).
    """
    from prefalign.data.chat import tokens_line

    scorer = RewardScorer(reward_model_dir, batch_size=batch_size, max_length=max_length,
                          max_prompt_length=max_prompt_length, trust_remote_code=trust_remote_code,
                          chat_template=chat_template, text_as_chat=text_as_chat)
    print(tokens_line(scorer.tokenizer))
    rows = load_rows(data)
    out_rows = [dict(r.data) if isinstance(r.data, dict) else r.data for r in rows]
    pairs, singles, dropped = [], [], Counter()
    for i, (row, origin) in enumerate(rows):
        if isinstance(row, dict) and "chosen" in row and "rejected" in row:
            try:
                pairs.append((i, normalize_row(row, origin)))
            except DroppedRow as drop:
                dropped[drop.reason] += 1
                out_rows[i].update(score_chosen=None, score_rejected=None)
        elif isinstance(row, dict):
            singles.append((i, _single_example(row, origin)))
        else:
            raise DataError(f"{origin}: expected an object, got {type(row).__name__}")
    sequences = []
    if pairs:
        features, _ = tokenize_preferences([e for _, e in pairs], scorer.tokenizer, max_length,
                                           max_prompt_length)
        sequences += pair_sequences(features)
    sequences += scorer.tokenize([e for _, e in singles]) if singles else []
    scores = scorer.score_ids(sequences)
    n = len(pairs)
    for k, (i, _) in enumerate(pairs):
        out_rows[i].update(score_chosen=scores[k], score_rejected=scores[n + k])
    for k, (i, _) in enumerate(singles):
        out_rows[i]["score"] = scores[2 * n + k]
    path = Path(output) if output else _default_output(data)
    with writing(path, flag="--output"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", flag="--output") as handle:  # whole file or none
        for row, (_, origin) in zip(out_rows, rows):
            try:  # allow_nan=False: NaN and Infinity are not JSON; no reader takes them
                line = json.dumps(row, ensure_ascii=False, default=str, allow_nan=False)
            except ValueError:
                raise DataError(f"{origin}: a score or value is NaN or infinite, which JSON "
                                "cannot hold; check the row and the reward model's weights "
                                f"(scores: {[row.get(k) for k in SCORE_KEYS if k in row]})"
                                ) from None
            handle.write(line + "\n")
    note = f", {sum(dropped.values())} pairs not scored ({dict(dropped)})" if dropped else ""
    print(f"scored {len(rows)} rows ({n} pairs, {len(singles)} responses){note} -> {path}")
    return path


# -- prefalign reward -------------------------------------------------------------------


def load_reward_policy(run: Run) -> Run:
    """runner.load_policy with a RewardModel in place of the causal LM."""
    from prefalign.models import check_vocabulary, prepare_for_training

    config = run.config

    def load_model(tokenizer) -> RewardModel:
        model = init_reward_model(config.model, tokenizer, config.trust_remote_code)
        check_vocabulary(tokenizer, model.backbone, config.model)
        prepare_for_training(model.backbone, config)
        model.score.requires_grad_(True)  # LoRA freezes the backbone; the head always trains
        return model

    return load_policy(run, load_model)


def log_calibration(run: Run, evals: list[dict], result: TrainResult,
                    model: RewardModel | None = None) -> dict[str, Any]:
    """Score the whole eval set, log eval/ece (+ the pair count) to metrics.jsonl, print it.

    model: the reward model with whole weights (default run.model; see train.distributed).
    """
    model = model if model is not None else run.model
    scores = torch.tensor(score_sequences(model, pair_sequences(evals), run.config.batch_size,
                                          run.accelerator.autocast))
    chosen, rejected = scores[: len(evals)], scores[len(evals) :]
    record = {"eval/ece": expected_calibration_error(chosen, rejected),
              "eval/ece_pairs": len(evals)}
    logger = MetricLogger(run.output_dir, True, "none", resume_step=result.step)
    logger.log(result.step, record)
    logger.close()
    result.history.append({"step": result.step, **record})
    accuracy = (chosen > rejected).double().mean().item()
    run.print(f"eval: accuracy {accuracy:.4f}, expected calibration error "
              f"{record['eval/ece']:.4f} ({len(evals)} pairs, {ECE_BINS} bins)")
    return record


def finish_reward_run(run: Run) -> Path:
    """OUTPUT/final: LoRA merged into the backbone (in place: training is over), saved as an
    HF sequence-classification directory with the tokenizer."""
    from prefalign.lora import has_lora, unload_lora

    final = run.output_dir / "final"
    run.accelerator.wait_for_everyone()
    with full_model(run.model, run.accelerator) as model:  # whole weights under FSDP / ZeRO-3
        if run.accelerator.is_main_process:
            if has_lora(model.backbone):
                unload_lora(model.backbone, merge=True)
            with writing(final, FINAL_KEPT), replaced_whole(final) as tmp:
                model.save_pretrained(tmp, run.tokenizer)
            run.print(f"saved {final}")
    run.accelerator.wait_for_everyone()
    return final


def run_reward(config: RewardConfig, accelerator: Accelerator | None = None) -> TrainResult:
    """`prefalign reward`: train, then write OUTPUT/final, metrics.jsonl and config.yaml."""
    run = open_run(config, accelerator)
    train = load_pairs(config.data, run, "data")
    evals = load_pairs(config.eval_data, run, "eval_data") if config.eval_data else []
    load_reward_policy(run)
    sharing = config.prefix_sharing
    if sharing:
        note = fallback_note(run.model, "prefix_sharing")
        if note:
            run.print(note)
            sharing = False
    algorithm = BradleyTerry(run.model.pad_token_id, config.center_rewards_coefficient, sharing)
    trainer = Trainer(config, run.model, algorithm, train, evals, run.accelerator)
    result = trainer.train()
    if evals:
        with full_model(run.model, run.accelerator) as model:  # every process gathers
            if run.accelerator.is_main_process:
                log_calibration(run, evals, result, model)
    finish_reward_run(run)
    return result
