"""How far a judge agrees with humans on the same pairs: accuracy, Cohen's kappa with a
bootstrap interval, accuracy by confidence, and the confidence threshold that reaches a
target kappa (pure; no I/O).

Each compared pair is one label per rater: which of its two texts is preferred. Cohen's
kappa corrects the observed agreement p_o for the agreement p_e two raters with the same
label frequencies would reach by chance:

    kappa = (p_o - p_e) / (1 - p_e),    p_e = sum over labels c of p_judge(c) * p_human(c)

Worked by hand, 10 pairs (label 1: the first text preferred):

                  human 1   human 0
        judge 1      4         1        judge: 5 of 10 say 1
        judge 0      2         3        human: 6 of 10 say 1

    p_o = (4 + 3) / 10 = 0.7;  p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5;  kappa = 0.2 / 0.5 = 0.4

Kappa is undefined (nan) when p_e = 1: both raters gave one and the same label throughout.
The interval resamples items (a prompt's pairs stay together, since they share a judgment)
with replacement, `rounds` times from a seeded generator, and takes the 2.5th and 97.5th
percentiles of the kappas (linear interpolation between order statistics); resamples whose
kappa is undefined are left out.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence

BIN_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels for the same items; nan when undefined."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty label lists, got {len(a)}, {len(b)}")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    chance = sum(ca[c] * cb[c] for c in ca) / (n * n)
    if chance == 1.0:
        return math.nan
    return (observed - chance) / (1.0 - chance)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1), linear between order statistics: [1, 2, 3, 4], 0.5 -> 2.5."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bootstrap_kappa(groups: Sequence[Sequence[tuple[Hashable, Hashable]]], seed: int = 0,
                    rounds: int = 1000, level: float = 0.95) -> tuple[float, float] | None:
    """A percentile interval of kappa, resampling `groups` (an item's (judge, human) label
    pairs) with replacement; None when no resample has a defined kappa."""
    rng = random.Random(seed)
    kappas = []
    for _ in range(rounds):
        drawn = [pair for _ in groups for pair in groups[rng.randrange(len(groups))]]
        if drawn:
            k = cohen_kappa([p[0] for p in drawn], [p[1] for p in drawn])
            if not math.isnan(k):
                kappas.append(k)
    if not kappas:
        return None
    tail = (1.0 - level) / 2
    return percentile(kappas, tail), percentile(kappas, 1.0 - tail)


def accuracy_by_confidence(confidences: Sequence[float], correct: Sequence[bool],
                           edges: Sequence[float] = BIN_EDGES) -> list[tuple[float, float, int,
                                                                                   float]]:
    """(low, high, pairs, accuracy) per bin [low, high), the last bin including 1.0; empty
    bins are left out."""
    rows = []
    for k, (lo, hi) in enumerate(zip(edges, edges[1:])):
        last = k == len(edges) - 2
        hits = [c for p, c in zip(confidences, correct) if lo <= p < hi or (last and p == hi)]
        if hits:
            rows.append((lo, hi, len(hits), sum(hits) / len(hits)))
    return rows


def suggest_threshold(confidences: Sequence[float], judge: Sequence[Hashable],
                      human: Sequence[Hashable], target: float
                      ) -> tuple[float, float, int] | None:
    """The lowest confidence threshold whose kept pairs (confidence >= it) reach kappa >=
    target: (threshold, kappa, pairs kept); None when no threshold does."""
    for t in sorted(set(confidences)):
        kept = [k for k, p in enumerate(confidences) if p >= t]
        kappa = cohen_kappa([judge[k] for k in kept], [human[k] for k in kept])
        if not math.isnan(kappa) and kappa >= target:
            return t, kappa, len(kept)
    return None
