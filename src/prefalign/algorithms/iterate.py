"""Iterative DPO: rounds of sampling from the current policy, scoring, and DPO on the pairs.

    prefalign iterate --model runs/sft/final --data prompts.jsonl --scorer runs/rm/final \\
        --rounds 3 --num-candidates 4 --output-dir runs/iter
    prefalign iterate --config configs/dpo.yaml --model M --data P --scorer S   # a DPO YAML

Round r starts from the policy that round r - 1 trained (round 1 from --model). It samples
num_candidates responses per prompt from that policy (preferences.best_of_n), scores them,
pairs them, and runs DPO starting from that policy, which is also the round's reference: each
round moves a bounded step from where it began. An adapter directory is merged into its base
when loaded (models.load_causal_lm), so round r's `dpo/final` is a valid model for round r + 1.
With LoRA each round's `dpo/final` is one adapter over the true base holding every round so
far (lora.save_adapter stacks them: rank r * lora_r after round r), which PEFT loads alone.

Every DPO option but ref_model is an iterate option (a DPO YAML without it works as
--config as it is); `data` holds the prompts. OUTPUT/round-R/ holds pairs.jsonl,
pairs.candidates.jsonl (every sample with its score and log-probs) and dpo/ (a DPO run).
OUTPUT/rounds.jsonl gets one record per round, printed as well, to show when gains level
off:
  mean_score    mean score of the round's samples, i.e. of the policy the round starts from
  score_gain    mean_score minus the previous record's: what the previous round's DPO gained
  kl_to_start   mean over samples of sum_t (log pi_round - log pi_start), a sample estimate of
                KL(pi_round || pi_start) against the --model policy (both at the sampling
                temperature; 0 in round 1)
  pairs, dpo_loss_first, dpo_loss_last, dpo_accuracy_last
With evaluate_final a last record (stage "final") samples the last round's output, so the
last DPO's gain shows too. A stopped run continues with the same command plus --resume
(its settings must be the saved config.yaml's): finished rounds are skipped, generation
resumes per batch, a round whose DPO has a final/ keeps it, and one without continues from
its newest checkpoint, if any. Without --resume or --overwrite a non-empty OUTPUT is refused.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefalign.algorithms.dpo import DPOConfig, DPOOptions, run_dpo
from prefalign.config import Section, option, option_like, require, save_config
from prefalign.errors import PrefalignError
from prefalign.generation import SamplingOptions
from prefalign.preferences.best_of_n import PAIRINGS, generate_preferences
from prefalign.preferences.journal import sidecar
from prefalign.train.config import TrainConfig
from prefalign.train.output_dir import prepare_output_dir
from prefalign.train.sections import PromptDataOptions


@dataclass(frozen=True)
class IterateOptions(Section):
    """The iterate section: rounds, the scorer, and how samples become pairs."""

    SECTION = "iterate"

    rounds: int = option(2, "rounds of generate -> score -> DPO")
    scorer: str = option("", "what scores samples: a reward-model directory or a scorer spec "
                         "(see prefalign generate --help)")
    num_candidates: int = option(4, "samples per prompt per round")
    prompts_per_round: int | None = option(
        None, "prompts per round, taken in turn through the data; none = every prompt")
    generation_batch_size: int = option(8, "prompts per generation batch")
    pairing: str = option("extremes", "how samples are paired (see prefalign generate)",
                          choices=PAIRINGS)
    min_gap: float = option(0.0, "smallest score gap of a pair")
    evaluate_final: bool = option(True, "after the last round, sample and score its model once")

    def validate(self) -> None:
        require(bool(self.scorer), "scorer", "is required: a reward-model directory or a spec")
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.num_candidates >= 2, "num_candidates", "must be >= 2 to make pairs")
        require(self.prompts_per_round is None or self.prompts_per_round >= 1,
                "prompts_per_round", "must be >= 1")
        require(self.generation_batch_size >= 1, "generation_batch_size", "must be >= 1")
        require(self.min_gap >= 0, "min_gap", "must be >= 0")
        super().validate()


@dataclass(frozen=True)
class IterateConfig(TrainConfig, SamplingOptions, DPOOptions, IterateOptions):
    """`prefalign iterate`: every section of a DPO run but the reference model (each round's
    reference is the model the round starts from), plus sampling (how each round's
    candidates are drawn) and the iterate section."""

    COMMAND = "iterate"

    data: str = option_like(PromptDataOptions, "data", "",
                            "prompts to sample from each round (rows with prompt or messages, "
                            "or preference rows, whose prompts are used)")
    temperature: float = option_like(SamplingOptions, "temperature", 1.0,
                                     "sampling temperature (> 0: greedy samples are all alike)")

    def validate(self) -> None:
        super().validate()
        require(bool(self.data), "data", "is required (--data PROMPTS)")
        require(self.temperature > 0, "temperature", "must be > 0: greedy samples are all alike")
        require(not self.reference_free, "loss_type", f"{self.loss_type} has no reference; "
                "iterate's rounds are defined by theirs")


def round_prompts(prompts: list[dict], config: IterateConfig, round_number: int) -> list[dict]:
    """The prompts of round r (from 1): all, or the next prompts_per_round in turn."""
    k = config.prompts_per_round
    if k is None:
        return prompts
    start = (round_number - 1) * k
    return [prompts[(start + i) % len(prompts)] for i in range(k)]


def logp_fields(policy: torch.nn.Module, start: torch.nn.Module, pad_token_id: int,
                temperature: float, per_prompt: int, batch_rows: int):
    """candidate_fields for generate_preferences: each sample's summed log-prob under the
    policy that drew it and under the start model, recomputed by the one log-prob routine
    at the sampling temperature (what KL(pi_T || pi_start,T) needs)."""
    from prefalign.generation import collate_generations
    from prefalign.logprobs import completion_logps

    device = next(policy.parameters()).device

    @torch.no_grad()
    def fields(generations: list[Any]) -> list[dict]:
        sums: dict[str, list[float]] = {"logp_policy": [], "logp_start": []}
        for lo in range(0, len(generations), batch_rows):
            batch = collate_generations(generations[lo:lo + batch_rows], pad_token_id)
            inputs = [batch[k].to(device) for k in
                      ("input_ids", "attention_mask", "completion_mask")]
            for name, model in (("logp_policy", policy), ("logp_start", start)):
                out = completion_logps(model, *inputs, temperature=temperature)
                sums[name] += out.logps.float().cpu().tolist()
        n = per_prompt
        return [{k: v[i * n:(i + 1) * n] for k, v in sums.items()}
                for i in range(len(generations) // n)]

    return fields


def round_stats(pairs_path: Path) -> dict[str, Any]:
    """mean_score, kl_to_start, samples and pairs, read back from a round's files."""
    scores, kls = [], []
    for line in sidecar(pairs_path, ".candidates.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        scores += row["scores"]
        kls += [p - s for p, s in zip(row["logp_policy"], row["logp_start"])]
    with open(pairs_path, encoding="utf-8") as handle:
        pairs = sum(1 for line in handle if line.strip())
    mean = sum(scores) / max(len(scores), 1)
    return {"samples": len(scores), "mean_score": mean,
            "score_std": (sum((s - mean) ** 2 for s in scores) / max(len(scores), 1)) ** 0.5,
            "kl_to_start": sum(kls) / max(len(kls), 1), "pairs": pairs}


def dpo_stats(dpo_dir: Path) -> dict[str, Any]:
    from prefalign.train.metrics import read_metrics

    path = dpo_dir / "metrics.jsonl"
    logged = [m for m in read_metrics(path) if "loss" in m] if path.exists() else []
    if not logged:
        return {"dpo_loss_first": None, "dpo_loss_last": None, "dpo_accuracy_last": None}
    return {"dpo_loss_first": logged[0]["loss"], "dpo_loss_last": logged[-1]["loss"],
            "dpo_accuracy_last": logged[-1].get("rewards/accuracies")}


def format_record(record: dict[str, Any], rounds: int) -> str:
    """'round 2/3: mean score 0.4210 (+0.1032), KL to start 1.234, 24 pairs, DPO loss ...'"""
    name = "final" if record["stage"] == "final" else f"round {record['round']}/{rounds}"
    gain = record.get("score_gain")
    text = (f"{name}: mean score {record['mean_score']:.4f}"
            + (f" ({gain:+.4f})" if gain is not None else "")
            + f", KL to start {record['kl_to_start']:.3f} over {record['samples']} samples")
    if record["stage"] == "round":
        text += f", {record['pairs']} pairs"
        if record.get("dpo_loss_first") is not None:
            text += (f", DPO loss {record['dpo_loss_first']:.4f} -> "
                     f"{record['dpo_loss_last']:.4f}")
    return text


def _final_exists(final: Path) -> bool:
    return (final / "adapter_config.json").is_file() or (final / "config.json").is_file()


def _append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text("utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a record cut by a crash is written again
            break
    return records


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_iterate(config: IterateConfig, accelerator: Any = None) -> list[dict[str, Any]]:
    """`prefalign iterate`: run the rounds (see the module docstring); returns the records."""
    rounds = Rounds.open(config, accelerator)
    stages = [("round", r) for r in range(1, config.rounds + 1)]
    stages += [("final", config.rounds + 1)] if config.evaluate_final else []
    done = {(r["stage"], r["round"]) for r in rounds.records}
    for stage, r in stages:
        if (stage, r) not in done:
            rounds.run_stage(stage, r)
    return rounds.records


@dataclass
class Rounds:
    """What every round shares: the settings, the prompts, the scorer, the start model and
    the records so far (OUTPUT/rounds.jsonl)."""

    config: IterateConfig
    accelerator: Any
    out: Path
    records: list[dict[str, Any]]
    prompts: list[dict]
    scorer: Any
    tokenizer: Any
    start: torch.nn.Module
    device: str

    @classmethod
    def open(cls, config: IterateConfig, accelerator: Any = None) -> Rounds:
        """Check and create OUTPUT, write config.yaml, read back the finished rounds, load
        the prompts, the scorer and the start model (--model)."""
        from prefalign.data.prompts import load_prompts
        from prefalign.models import load_causal_lm, load_tokenizer
        from prefalign.scoring import load_scorer

        out = Path(config.output_dir)
        prepare_output_dir(config)  # no overlap with --model/--data/--scorer, no earlier run
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        log = out / "rounds.jsonl"
        records = _read_records(log)
        log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        rows = load_prompts(config.data, config.split, config.columns,
                            log=lambda line: print(f"data: {line}", flush=True))
        prompts = [{k: p[k] for k in ("prompt", "id") if k in p} for p in rows]
        scorer = load_scorer(config.scorer)  # a bad scorer is refused before the model loads
        tokenizer = load_tokenizer(config.model, config.trust_remote_code, config.chat_template,
                                   config.text_as_chat)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        start = load_causal_lm(config.model, config.trust_remote_code).to(device).eval()
        return cls(config, accelerator, out, records, prompts, scorer,
                   tokenizer, start, device)

    def run_stage(self, stage: str, r: int) -> dict[str, Any]:
        """Sample and score with round r's policy; a "round" stage then trains DPO on the
        pairs. Appends the stage's record (printed too)."""
        from prefalign.models import model_reference

        c = self.config
        policy_path = c.model if r == 1 else str(self.out / f"round-{r - 1}" / "dpo" / "final")
        round_dir = self.out / (f"round-{r}" if stage == "round" else "final-eval")
        pairs_path = self.sample(r, policy_path, round_dir / "pairs.jsonl")
        record = {"stage": stage, "round": r, "policy": model_reference(policy_path),
                  **round_stats(pairs_path)}
        previous = self.records[-1]["mean_score"] if self.records else None
        record["score_gain"] = None if previous is None else record["mean_score"] - previous
        if stage == "round":
            if record["pairs"] == 0:
                raise PrefalignError(f"round {r}: no preference pairs in {pairs_path} (every "
                                     "candidate tied or was identical); use more candidates, "
                                     "a higher temperature or a finer-grained scorer")
            record.update(self.train(policy_path, pairs_path, round_dir / "dpo"))
        _append_record(self.out / "rounds.jsonl", record)
        self.records.append(record)
        print(format_record(record, c.rounds), flush=True)
        return record

    def sample(self, r: int, policy_path: str, pairs_path: Path) -> Path:
        """Round r's pairs (and candidates with their log-probs) from its policy."""
        from prefalign.models import load_causal_lm

        c = self.config
        policy = self.start if r == 1 else load_causal_lm(policy_path, c.trust_remote_code)
        policy.to(self.device).eval()
        generate_preferences(
            policy, round_prompts(self.prompts, c, r), pairs_path, self.scorer,
            num_candidates=c.num_candidates, sampling=c, seed=c.seed + r,
            batch_size=c.generation_batch_size, pairing=c.pairing,
            min_gap=c.min_gap, keep_candidates=True, tokenizer=self.tokenizer,
            candidate_fields=logp_fields(policy, self.start, self.tokenizer.pad_token_id,
                                         c.temperature, c.num_candidates,
                                         c.generation_batch_size * c.num_candidates))
        policy = None  # only the start model stays loaded while DPO trains
        _release_memory()
        return pairs_path

    def train(self, policy_path: str, pairs_path: Path, dpo_dir: Path) -> dict[str, Any]:
        """DPO from the round's policy on its pairs (kept if a final/ is there already)."""
        if not _final_exists(dpo_dir / "final"):
            names = [f.name for f in dataclasses.fields(DPOConfig)
                     if f.init and hasattr(self.config, f.name)]  # all but ref_model
            values = {name: getattr(self.config, name) for name in names}
            values.update(model=policy_path, data=str(pairs_path), output_dir=str(dpo_dir))
            # columns and split describe the user's prompt file, not the pairs written here.
            values.update(columns={}, split=None)
            dpo_config = DPOConfig(**values)
            dpo_config.validate()
            run_dpo(dpo_config, self.accelerator)
        return {"dpo_output": str(dpo_dir / "final"), **dpo_stats(dpo_dir)}
