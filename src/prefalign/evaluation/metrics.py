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
