"""`prefalign judge agreement`: how well a judge's pairs agree with a human's.

    prefalign judge agreement --judged judged.jsonl --human human.jsonl --target-kappa 0.6

JUDGED holds pairs `prefalign judge` wrote (with `confidence` in pairwise mode), HUMAN pairs
`prefalign annotate` wrote. A pair matches when both files hold the same prompt and the same
two texts, in either order; it agrees when both chose the same text. On the matched pairs
the report gives accuracy, Cohen's kappa with a seeded bootstrap 95% interval over prompts,
the judge run's position-flip rate (from JUDGED's .judgments.jsonl, when it is there),
accuracy by confidence, and the lowest --min-confidence whose kept pairs reach the target
kappa (math in agreement.py). A pair that one file labels both ways is left out and counted.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.config import Section, option, require
from prefalign.errors import ConfigError, DataError
from prefalign.preferences.agreement import (
    accuracy_by_confidence,
    bootstrap_kappa,
    cohen_kappa,
    suggest_threshold,
)
from prefalign.preferences.journal import sidecar
from prefalign.text import printable

DESCRIPTION = ("Compare a judge's preference pairs with a human's on the pairs both labelled: "
               "accuracy, Cohen's kappa with a bootstrap interval, position-flip rate, "
               "accuracy by confidence, and the --min-confidence that reaches a target kappa.")


def read_labels(path: Any) -> tuple[dict[tuple, tuple[int, float | None]], int]:
    """(prompt, sorted texts) -> (label, confidence), label 1 when the first of the sorted
    texts was chosen; and how many pairs were left out for being labelled both ways."""
    from prefalign.data.sources import load_rows

    labels: dict[tuple, tuple[int, float | None]] = {}
    conflicted: set[tuple] = set()
    for data, origin in load_rows(path):
        prompt, chosen, rejected = data.get("prompt"), data.get("chosen"), data.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str) or prompt is None:
            raise DataError(f"{origin}: a pair needs prompt, chosen and rejected (text); is "
                            "this a file of preference pairs?")
        confidence = data.get("confidence")
        if confidence is not None and (isinstance(confidence, bool) or not isinstance(
                confidence, (int, float)) or not 0.0 <= confidence <= 1.0):
            raise DataError(f"{origin}: field 'confidence' must be a number in [0, 1] or "
                            f"absent, got {printable(repr(confidence))[:60]}")
        if chosen == rejected:
            continue
        texts = tuple(sorted((chosen, rejected)))
        key = (json.dumps(prompt, sort_keys=True), texts)
        label = int(chosen == texts[0])
        if key in labels and labels[key][0] != label:
            conflicted.add(key)
        labels[key] = (label, confidence)
    for key in conflicted:
        del labels[key]
    return labels, len(conflicted)


def flip_rate_of(judged: Path) -> float | None:
    """The position-flip rate of the pairwise run that wrote `judged`, if its judgments are
    next to it."""
    path = sidecar(judged, ".judgments.jsonl")
    if not path.is_file():
        return None
    asked = flipped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash; the judge's own resume reports it
        for pair in record.get("pairs") or []:
            if isinstance(pair, dict) and pair.get("consistent") is not None:
                asked += 1
                flipped += pair["consistent"] is False
    return flipped / asked if asked else None


def compare(judged: Any, human: Any, target_kappa: float = 0.6, seed: int = 0,
            rounds: int = 1000) -> dict:
    """The agreement report as a dict (see the module docstring)."""
    if not -1.0 <= target_kappa <= 1.0 or rounds < 1:
        raise ConfigError(f"need --target-kappa in [-1, 1] and --bootstrap >= 1, got "
                          f"{target_kappa}, {rounds}")
    judge_labels, judge_conflicts = read_labels(judged)
    human_labels, human_conflicts = read_labels(human)
    keys = [k for k in judge_labels if k in human_labels]
    if not keys:
        raise DataError(f"{judged} and {human}: no pair is in both files (same prompt and the "
                        "same two texts); judge and annotate the same candidates file")
    j = [judge_labels[k][0] for k in keys]
    h = [human_labels[k][0] for k in keys]
    by_prompt: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for k, a, b in zip(keys, j, h):
        by_prompt[k[0]].append((a, b))
    report = {"pairs": len(keys), "prompts": len(by_prompt),
              "left_out_conflicting": judge_conflicts + human_conflicts,
              "accuracy": sum(a == b for a, b in zip(j, h)) / len(keys),
              "kappa": cohen_kappa(j, h),
              "kappa_interval": bootstrap_kappa(list(by_prompt.values()), seed, rounds),
              "bootstrap": {"rounds": rounds, "seed": seed},
              "flip_rate": flip_rate_of(Path(judged)) if isinstance(judged, (str, Path))
              else None,
              "target_kappa": target_kappa, "by_confidence": [], "suggested": None}
    scored = [(judge_labels[k][1], a, b) for k, a, b in zip(keys, j, h)
              if judge_labels[k][1] is not None]
    if scored:
        confidences = [c for c, _, _ in scored]
        report["by_confidence"] = accuracy_by_confidence(confidences,
                                                         [a == b for _, a, b in scored])
        report["suggested"] = suggest_threshold(confidences, [a for _, a, _ in scored],
                                                [b for _, _, b in scored], target_kappa)
        report["with_confidence"] = len(scored)
    return report


def format_report(r: dict) -> str:
    def num(x: float | None) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"

    interval = r["kappa_interval"]
    lines = [f"{r['pairs']} pairs over {r['prompts']} prompts labelled by both "
             f"({r['left_out_conflicting']} left out: labelled both ways in one file)",
             f"accuracy {num(r['accuracy'])}; Cohen's kappa {num(r['kappa'])} (95% bootstrap "
             f"interval over prompts: " + (f"{num(interval[0])} to {num(interval[1])}"
                                           if interval else "n/a") +
             f"; {r['bootstrap']['rounds']} rounds, seed {r['bootstrap']['seed']})",
             f"position-flip rate of the judge run: {num(r['flip_rate'])}"
             + ("" if r["flip_rate"] is not None else " (no pairwise judgments next to "
                "the judged file)")]
    if r["by_confidence"]:
        lines.append("accuracy by judge confidence:")
        lines += [f"  [{lo:.1f}, {hi:.1f}{']' if hi == 1.0 else ')'}: {n} pairs, accuracy "
                  f"{acc:.3f}" for lo, hi, n, acc in r["by_confidence"]]
        s = r["suggested"]
        lines.append(f"suggested --min-confidence {s[0]:.3f}: kappa {s[1]:.3f} on {s[2]} of "
                     f"{r['with_confidence']} pairs (target {r['target_kappa']})" if s else
                     f"no --min-confidence reaches kappa {r['target_kappa']} on these pairs")
    else:
        lines.append("the judged pairs carry no confidence (judge --mode pairwise writes it): "
                     "no --min-confidence to suggest")
    return "\n".join(lines)


@dataclass(frozen=True)
class JudgeAgreementConfig(Section):
    COMMAND = "judge agreement"

    judged: str = option("", "pairs written by prefalign judge")
    human: str = option("", "pairs written by prefalign annotate")
    target_kappa: float = option(0.6, "agreement the suggested --min-confidence should reach")
    bootstrap: int = option(1000, "resamples of the kappa interval")
    seed: int = option(0, "seed of the bootstrap")

    def validate(self) -> None:
        require(bool(self.judged), "judged", "is required (--judged FILE)")
        require(bool(self.human), "human", "is required (--human FILE)")
        super().validate()


def run(config: JudgeAgreementConfig) -> int:
    report = compare(config.judged, config.human, config.target_kappa, config.seed,
                     config.bootstrap)
    print(printable(format_report(report), keep="\n"))
    return 0
