"""The numbers of an evaluation: per-model metrics from the samples, and their intervals.

compute_metrics reads the sample rows `evaluate` collected (reward, score, judge verdicts,
log-probs under the model and the reference, texts) and gives every METRICS entry;
compute_intervals gives the 95% bootstrap interval over prompts of each headline number.
Pure functions of the rows: no model is touched here.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from prefalign.evaluation import metrics as M
from prefalign.evaluation.benchmark import benchmark_values

# name -> (table label, description); the order is the comparison table's.
METRICS: dict[str, tuple[str, str]] = {
    "reward/mean": ("reward", "mean reward-model score"),
    "reward/median": ("reward median", "median reward-model score"),
    "win_rate/reward": ("win rate (RM)", "win rate against the baseline by reward-model "
                        "score, same prompt and sample; ties count 1/2"),
    "score/mean": ("score", "mean scorer value"),
    "score/median": ("score median", "median scorer value"),
    "win_rate/score": ("win rate (scorer)", "win rate against the baseline by scorer value; "
                       "ties count 1/2"),
    "win_rate/judge": ("win rate (judge)", "pairwise judge against the baseline, same prompt "
                       "and sample, both orders asked; a tie or a verdict that flips with the "
                       "order counts 1/2"),
    "win_rate/judge_lc": ("LC win rate (judge)", "length-controlled judge win rate: "
                          "sigmoid(intercept) of a logistic regression of the verdict (a tie "
                          "as 1/2) on the length difference in tokens divided by its std"),
    "judge/flip_rate": ("position flips", "fraction of judged pairs whose verdict flipped "
                        "when the order was swapped"),
    "judge/unjudged": ("unjudged pairs", "pairs left out of the judge's rates: an order whose "
                       "answer never parsed"),
    "benchmark/accuracy": ("accuracy", "fraction of the samples of prompts with a reference "
                           "answer whose final answer (last \\boxed{} or number; text: last "
                           "line) matches it"),
    "benchmark/pass_rate": ("pass rate", "fraction of the samples of prompts with a test "
                            "command for which the command exits 0 on the response's code"),
    "kl": ("KL", "KL(model || reference) in nats per response: mean over the model's samples "
           "of log p_model - log p_ref summed over response tokens (temperature 1)"),
    "length": ("length", "mean response length in tokens, EOS included"),
    "finished_rate": ("finished", "fraction of responses that ended with EOS or a stop string"),
    "distinct_1": ("distinct-1", "distinct words / all words over every response"),
    "distinct_2": ("distinct-2", "distinct word bigrams / all bigrams over every response"),
    "self_bleu": ("self-BLEU", "mean BLEU-4 of each prompt's first response against the other "
                  "prompts' (high = repetitive)"),
    "self_bleu_per_prompt": ("self-BLEU per prompt", "mean BLEU-4 among the samples of one "
                             "prompt, averaged over prompts (n > 1 only)"),
}


def compute_metrics(samples: Mapping[str, list[dict[str, Any]]], baseline: str,
                    ) -> dict[str, dict[str, float | None]]:
    """Per model, every METRICS entry from its samples (see the module docstring).

    A sample dict holds prompt_index, candidate, text, length, finished, logp, ref_logp
    (None: no KL) and optionally reward, score and benchmark_correct / benchmark_passed
    (evaluation.benchmark). Every model has the same (prompt,
    candidate) rows in the same order, the baseline's included.
    """
    base = samples[baseline]
    out = {}
    for name, rows in samples.items():
        m: dict[str, float | None] = dict.fromkeys(METRICS)
        for key in ("reward", "score"):
            if rows and all(key in r for r in rows):
                values = [r[key] for r in rows]
                stats = M.summarize(values)
                m[f"{key}/mean"], m[f"{key}/median"] = stats["mean"], stats["median"]
                m[f"win_rate/{key}"] = M.win_rate(values, [r[key] for r in base])
        if rows and all("judge_verdict" in r for r in rows):
            verdicts, diffs, flips = _judge_rows(rows, base)
            m["judge/unjudged"] = float(len(rows) - len(verdicts))
            if verdicts:
                m["win_rate/judge"] = statistics.fmean(verdicts)
                m["win_rate/judge_lc"] = M.length_controlled_win_rate(verdicts, diffs)
            if flips:
                m["judge/flip_rate"] = statistics.fmean(flips)
        for key, pairs in benchmark_values(rows).items():
            m[key] = statistics.fmean(v for v, _ in pairs)
        if all(r["ref_logp"] is not None for r in rows):
            m["kl"] = M.kl_from_samples([r["logp"] for r in rows], [r["ref_logp"] for r in rows])
        m["length"] = statistics.fmean(r["length"] for r in rows)
        m["finished_rate"] = statistics.fmean(float(r["finished"]) for r in rows)
        texts = [r["text"] for r in rows]
        m["distinct_1"], m["distinct_2"] = M.distinct_n(texts, 1), M.distinct_n(texts, 2)
        m["self_bleu"] = M.self_bleu([r["text"] for r in rows if r["candidate"] == 0])
        groups: dict[int, list[str]] = {}
        for r in rows:
            groups.setdefault(r["prompt_index"], []).append(r["text"])
        if any(len(g) > 1 for g in groups.values()):
            m["self_bleu_per_prompt"] = M.grouped_self_bleu(list(groups.values()))
        out[name] = m
    return out


def _judge_rows(rows: Sequence[dict], base: Sequence[dict], keep: Any = None
                ) -> tuple[list[float], list[float], list[float]]:
    """(verdicts, length differences model - baseline, flips as 0/1) of the judged pairs;
    keep(row) -> bool picks rows (default all)."""
    verdicts, diffs, flips = [], [], []
    for r, b in zip(rows, base):
        if r["judge_verdict"] is None or (keep is not None and not keep(r)):
            continue
        verdicts.append(float(r["judge_verdict"]))
        diffs.append(float(r["length"] - b["length"]))
        if r["judge_flip"] is not None:
            flips.append(float(r["judge_flip"]))
    return verdicts, diffs, flips


def compute_intervals(samples: Mapping[str, list[dict[str, Any]]], baseline: str,
                      resamples: int = 1000, seed: int = 0
                      ) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {metric: {"value", "ci95": [lo, hi]}}}: the 95% bootstrap interval over
    prompts of each headline number compute_metrics gives (reward/mean, score/mean,
    win_rate/*, judge/flip_rate, benchmark/*, kl); {} when resamples is 0 or there are fewer than two
    prompts (one prompt resampled is always itself: a zero-width interval that would
    claim a certainty the data does not have)."""
    base = samples[baseline]
    if resamples <= 0 or len({r["prompt_index"] for r in base}) < 2:
        return {}
    table = compute_metrics(samples, baseline)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, rows in samples.items():
        per: dict[str, list[tuple[float, int]]] = {}  # metric -> (value, prompt) per sample
        for key in ("reward", "score"):
            if rows and all(key in r for r in rows):
                per[f"{key}/mean"] = [(r[key], r["prompt_index"]) for r in rows]
                per[f"win_rate/{key}"] = [
                    (1.0 if r[key] > b[key] else 0.5 if r[key] == b[key] else 0.0,
                     r["prompt_index"]) for r, b in zip(rows, base)]
        per.update(benchmark_values(rows))
        if all(r["ref_logp"] is not None for r in rows):
            per["kl"] = [(r["logp"] - r["ref_logp"], r["prompt_index"]) for r in rows]
        if rows and all("judge_verdict" in r for r in rows):
            judged = [r for r in rows if r["judge_verdict"] is not None]
            if judged:
                per["win_rate/judge"] = [(r["judge_verdict"], r["prompt_index"]) for r in judged]
            flips = [r for r in judged if r["judge_flip"] is not None]
            if flips:
                per["judge/flip_rate"] = [(float(r["judge_flip"]), r["prompt_index"])
                                          for r in flips]
        m: dict[str, dict[str, Any]] = {}
        for key, pairs in per.items():
            if len({p for _, p in pairs}) < 2:
                continue  # see the docstring: one prompt gives no interval
            lo, hi = M.bootstrap_mean_ci([v for v, _ in pairs], [p for _, p in pairs],
                                         resamples, seed)
            m[key] = {"value": table[name][key], "ci95": [lo, hi]}
        if "win_rate/judge" in m:  # judged pairs on two prompts or more
            m["win_rate/judge_lc"] = {"value": table[name]["win_rate/judge_lc"],
                                      "ci95": list(_lc_interval(rows, base, resamples, seed))}
        out[name] = m
    return out


def _lc_interval(rows: Sequence[dict], base: Sequence[dict], resamples: int, seed: int
                 ) -> tuple[float, float]:
    """The length-controlled win rate refitted on each resample of prompts."""
    # Prompts with a judged pair only, as the plain rates' intervals resample.
    prompts = sorted({r["prompt_index"] for r in rows if r["judge_verdict"] is not None})
    by_prompt = {p: _judge_rows(rows, base, lambda r, p=p: r["prompt_index"] == p)[:2]
                 for p in prompts}

    def statistic(drawn: Sequence[int]) -> float:
        verdicts, diffs = [], []
        for k in drawn:
            v, d = by_prompt[prompts[k]]
            verdicts += v
            diffs += d
        return M.length_controlled_win_rate(verdicts, diffs)

    return M.bootstrap_ci(len(prompts), statistic, resamples, seed)
