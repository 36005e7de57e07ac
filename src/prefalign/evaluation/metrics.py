"""Evaluation metrics as pure functions of numbers and strings (no model, no torch).

Words. distinct-n and BLEU count whitespace-separated words (`str.split`), the unit of the
papers that define them, so the numbers do not depend on a model's tokenizer and two
models with different vocabularies compare fairly.

    distinct-n     Li et al. 2016, arXiv:1510.03055, Sec. 4.3: the number of distinct
                   n-grams over all responses divided by the total number of n-grams.
    BLEU           Papineni et al. 2002 (ACL): brevity penalty times the geometric mean
                   of the clipped n-gram precisions p_1..p_N (N = 4, uniform weights).
                   A zero precision with n > 1 becomes epsilon / total (Chen & Cherry 2014,
                   "method 1", epsilon 0.1); no matching unigram gives 0. These are the
                   rules of nltk's sentence_bleu with SmoothingFunction().method1, which
                   Texygen uses, so the numbers compare with published self-BLEU.
    self-BLEU      Zhu et al. 2018 (Texygen), arXiv:1802.01886: the mean over responses of
                   the BLEU of each response against all the others as references. High
                   means the responses repeat each other (low diversity).
    win rate       pairwise on the same prompt and sample index; a tie counts one half.
    KL estimate    mean over samples y ~ policy of log p(y) - log p_ref(y) (Schulman's
                   "k1"): unbiased for KL(policy || ref) when the samples come from exactly
                   the distribution whose log-probs are used; a single estimate can be
                   negative.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence

BLEU_MAX_N = 4
BLEU_EPSILON = 0.1

NgramCounts = list[Counter]  # index n-1 -> Counter of n-gram tuples


def words(text: str) -> list[str]:
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int, tokenize: Callable[[str], list[str]] = words) -> float:
    """Distinct n-grams / all n-grams over every text together; 0.0 when there are none."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        grams.extend(ngrams(tokenize(text), n))
    return len(set(grams)) / len(grams) if grams else 0.0


def _ngram_counts(tokens: Sequence[str], max_n: int) -> NgramCounts:
    return [Counter(ngrams(tokens, n)) for n in range(1, max_n + 1)]


def _closest_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """The reference length closest to the hypothesis; the shorter one on a tie (nltk's rule)."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _bleu(hyp: NgramCounts, max_ref: Callable[[int, tuple], int], hyp_len: int, ref_len: int,
          epsilon: float) -> float:
    """BLEU from the hypothesis counts; max_ref(n, gram) is the largest count of `gram` in
    any one reference (the clipping bound); ref_len the closest reference length."""
    if hyp_len == 0:
        return 0.0
    log_sum = 0.0
    for n, counts in enumerate(hyp, start=1):
        matched = sum(min(c, max_ref(n, g)) for g, c in counts.items())
        total = max(1, sum(counts.values()))  # a hypothesis shorter than n: 0 / 1
        if matched == 0:
            if n == 1:
                return 0.0
            matched = epsilon
        log_sum += math.log(matched / total)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_sum / len(hyp))


def sentence_bleu(hypothesis: str, references: Sequence[str], max_n: int = BLEU_MAX_N,
                  epsilon: float = BLEU_EPSILON,
                  tokenize: Callable[[str], list[str]] = words) -> float:
    """BLEU of one text against references (see the module docstring), in [0, 1]."""
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    hyp_tokens = tokenize(hypothesis)
    refs = [_ngram_counts(tokenize(r), max_n) for r in references]
    ref_lens = [sum(r[0].values()) for r in refs]

    def max_ref(n: int, gram: tuple) -> int:
        return max(r[n - 1][gram] for r in refs)

    return _bleu(_ngram_counts(hyp_tokens, max_n), max_ref, len(hyp_tokens),
                 _closest_length(len(hyp_tokens), ref_lens), epsilon)


def self_bleu(texts: Sequence[str], max_n: int = BLEU_MAX_N, epsilon: float = BLEU_EPSILON,
              tokenize: Callable[[str], list[str]] = words) -> float | None:
    """Mean over texts of sentence_bleu(text, all other texts); None with fewer than two.

    Empty texts are left out (they have no n-grams to compare, and as hypotheses they would
    score 0 and look diverse). Equal to averaging `sentence_bleu` over the texts, in
    O(total words) instead of O(texts^2 * words): for each n-gram the largest count and the
    second largest are kept, so "the largest count among the others" needs no rescan.
    """
    tokens = [t for t in (tokenize(x) for x in texts) if t]
    if len(tokens) < 2:
        return None
    counts = [_ngram_counts(t, max_n) for t in tokens]
    # best[n-1][gram] = [largest count, index of a text holding it, second largest count]
    best: list[dict[tuple, list[int]]] = [{} for _ in range(max_n)]
    for i, per_n in enumerate(counts):
        for table, grams in zip(best, per_n):
            for gram, c in grams.items():
                top = table.get(gram)
                if top is None:
                    table[gram] = [c, i, 0]
                elif c > top[0]:
                    table[gram] = [c, i, top[0]]
                elif c > top[2]:
                    top[2] = c
    lengths = Counter(len(t) for t in tokens)
    scores = []
    for i, per_n in enumerate(counts):
        def max_ref(n: int, gram: tuple, i: int = i) -> int:
            top = best[n - 1][gram]
            return top[2] if top[1] == i else top[0]

        lengths[len(tokens[i])] -= 1  # the others' lengths only
        ref_len = _closest_length(len(tokens[i]), [n for n, k in lengths.items() if k > 0])
        lengths[len(tokens[i])] += 1
        scores.append(_bleu(per_n, max_ref, len(tokens[i]), ref_len, epsilon))
    return sum(scores) / len(scores)


def grouped_self_bleu(groups: Sequence[Sequence[str]], **kwargs) -> float | None:
    """Mean of self_bleu within each group (e.g. the samples of one prompt); groups with
    fewer than two non-empty texts are skipped; None when no group counts."""
    values = [v for v in (self_bleu(g, **kwargs) for g in groups) if v is not None]
    return sum(values) / len(values) if values else None


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of pairs (scores[i], baseline[i]) the first side wins; a tie counts 1/2.

    Pair i must be the same prompt (and sample index) on both sides. A model against itself
    scores exactly 0.5.
    """
    if len(scores) != len(baseline):
        raise ValueError(f"win_rate: {len(scores)} scores but {len(baseline)} baseline scores")
    if not scores:
        raise ValueError("win_rate: no pairs")
    points = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline))
    return points / len(scores)


def kl_from_samples(logps: Sequence[float], ref_logps: Sequence[float]) -> float:
    """Monte Carlo KL(policy || ref) = mean_i (logps[i] - ref_logps[i]).

    logps[i] and ref_logps[i] are the summed log-probs of sample i's response tokens under
    the policy and the reference; the samples must be drawn from the policy.
    """
    if len(logps) != len(ref_logps):
        raise ValueError(f"kl_from_samples: {len(logps)} log-probs but {len(ref_logps)} "
                         "reference log-probs")
    if not logps:
        raise ValueError("kl_from_samples: no samples")
    return sum(a - b for a, b in zip(logps, ref_logps)) / len(logps)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, median, std (population) and count of a list of numbers."""
    if not values:
        raise ValueError("summarize: no values")
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "std": statistics.pstdev(values), "count": len(values)}


# -- intervals and the judge's win rates ----------------------------------------------------
#
#    bootstrap      Efron & Tibshirani 1993, ch. 13: the percentile interval. The unit
#                   resampled is the prompt: all samples of a prompt move together, since
#                   samples of one prompt are not independent of each other. Resample b
#                   draws P prompt indices uniformly with replacement from
#                   numpy.random.default_rng(seed).integers(0, P, size=(B, P)) (one draw
#                   for all B resamples); the interval is numpy.percentile of the B
#                   statistics at (1 - level) / 2 and (1 + level) / 2 (linear interpolation).
#    length-controlled win rate   Dubois et al. 2024 (AlpacaEval 2), arXiv:2404.04475: a
#                   logistic regression of the verdict on the length difference, read at a
#                   zero difference: sigmoid(intercept). Here with one regressor,
#                   z = (len_model - len_baseline) / std(len_model - len_baseline) (scaled,
#                   not centred, so that z = 0 still means equal lengths), and a tie as the
#                   target 1/2, which is the same loss as a win and a loss of weight 1/2 each.

BOOTSTRAP_LEVEL = 0.95
# A weak L2 penalty on (intercept, slope): without it a verdict set the length separates
# perfectly (every longer response wins) has no finite maximum-likelihood fit.
LOGISTIC_RIDGE = 1e-3


def bootstrap_indices(num_groups: int, resamples: int, seed: int):
    """(resamples, num_groups) group indices drawn with replacement (see the comment above)."""
    import numpy as np

    if num_groups < 1 or resamples < 1:
        raise ValueError(f"bootstrap: need >= 1 group and >= 1 resample, got {num_groups}, "
                         f"{resamples}")
    return np.random.default_rng(seed).integers(0, num_groups, size=(resamples, num_groups))


def percentile_interval(stats: Sequence[float], level: float = BOOTSTRAP_LEVEL
                        ) -> tuple[float, float]:
    import numpy as np

    lo, hi = np.percentile(np.asarray(stats, dtype=float),
                           [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean_ci(values: Sequence[float], groups: Sequence[int], resamples: int = 1000,
                      seed: int = 0, level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """Percentile interval of mean(values) when whole groups (prompts) are resampled.

    values[i] belongs to group groups[i]. A resample's mean is the sum of the drawn groups'
    values over their count, so groups of different sizes weigh as their samples do.
    """
    import numpy as np

    if len(values) != len(groups) or not values:
        raise ValueError(f"bootstrap_mean_ci: {len(values)} values, {len(groups)} groups")
    labels, index = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(index, weights=np.asarray(values, dtype=float), minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(float)
    draw = bootstrap_indices(len(labels), resamples, seed)
    return percentile_interval(sums[draw].sum(1) / counts[draw].sum(1), level)


def bootstrap_ci(num_groups: int, statistic: Callable[[Sequence[int]], float],
                 resamples: int = 1000, seed: int = 0, level: float = BOOTSTRAP_LEVEL
                 ) -> tuple[float, float]:
    """Percentile interval of statistic(drawn group indices) over the resamples; for a
    statistic that is not a plain mean (the length-controlled win rate refits per resample)."""
    draw = bootstrap_indices(num_groups, resamples, seed)
    return percentile_interval([statistic(row.tolist()) for row in draw], level)


def pair_verdict(model_first: bool, model_second: bool) -> float:
    """One pair asked in both orders -> the model's points: 1 or 0 when both orders agree,
    1/2 when the verdict flips with the order (the position decided, not the content).

    model_first: the judge preferred the model's response when it was shown first;
    model_second: when it was shown second.
    """
    return 0.5 if model_first != model_second else float(model_first)


def logistic_fit(x: Sequence[float], y: Sequence[float], weights: Sequence[float] | None = None,
                 ridge: float = LOGISTIC_RIDGE, iterations: int = 100) -> tuple[float, float]:
    """(intercept, slope) of P(y=1) = sigmoid(a + b x) by Newton's method.

    y may be fractional (a tie = 1/2). Minimises the weighted cross-entropy plus
    ridge / 2 * (a^2 + b^2); the penalised loss is strictly convex, and each Newton step is
    halved until the loss does not increase, so the iteration converges.
    """
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    if not (len(x) == len(y) == len(w)) or not len(x):
        raise ValueError(f"logistic_fit: {len(x)} x, {len(y)} y, {len(w)} weights")
    design = np.stack([np.ones_like(x), x], axis=1)

    def loss(theta):
        t = design @ theta
        return float(np.sum(w * (np.logaddexp(0, t) - y * t)) + ridge / 2 * theta @ theta)

    theta = np.zeros(2)
    current = loss(theta)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(design @ theta)))
        grad = design.T @ (w * (p - y)) + ridge * theta
        hess = (design.T * (w * p * (1 - p))) @ design + ridge * np.eye(2)
        # Least squares: with ridge 0 and a constant x the Hessian is singular; the
        # minimum-norm step leaves the slope at 0.
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        scale = 1.0
        while scale > 1e-8 and loss(theta - scale * step) > current:
            scale /= 2
        theta = theta - scale * step
        new = loss(theta)
        if current - new < 1e-12 and np.max(np.abs(scale * step)) < 1e-10:
            break
        current = new
    return float(theta[0]), float(theta[1])


def length_controlled_win_rate(verdicts: Sequence[float], length_diffs: Sequence[float]
                               ) -> float:
    """sigmoid(intercept) of the logistic regression of verdicts (1 win, 0 loss, 1/2 tie)
    on the standardised length difference (model minus baseline, in tokens): the win rate
    the fit expects at equal lengths. See the comment above for the scaling."""
    import numpy as np

    d = np.asarray(length_diffs, dtype=float)
    std = float(d.std())
    z = d / std if std > 0 else np.zeros_like(d)
    intercept, _ = logistic_fit(z, verdicts)
    return 1 / (1 + math.exp(-intercept))
