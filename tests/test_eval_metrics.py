"""Evaluation metrics against values worked out by hand (the arithmetic is in each docstring)."""

import math

import pytest

from prefalign.evaluation.evaluate import compute_metrics
from prefalign.evaluation.metrics import (
    distinct_n,
    grouped_self_bleu,
    kl_from_samples,
    self_bleu,
    sentence_bleu,
    summarize,
    win_rate,
)


def test_distinct_n():
    """["a b a", "b c"]: unigrams a b a b c -> {a, b, c} 3 / 5; bigrams (a b) (b a) (b c),
    not across texts -> 3 / 3. "a a a a": bigrams (a a) x 3 -> 1 / 3."""
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "b c"], 2) == 1.0
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["", "one"], 2) == 0.0  # no bigram at all


def test_sentence_bleu_hand_values():
    """hyp "the cat sat on the mat", ref "the cat sat on a mat" (both 6 words, BP = 1):
    p1 = 5/6 (the x2 clipped to 1), p2 = 3/5 (the cat, cat sat, sat on),
    p3 = 2/4 (the cat sat, cat sat on), p4 = 1/3 (the cat sat on)
    BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4)."""
    assert sentence_bleu("the cat sat on the mat", ["the cat sat on a mat"]) == pytest.approx(
        (1 / 12) ** 0.25)
    assert sentence_bleu("a b c d e", ["a b c d e"]) == pytest.approx(1.0)
    assert sentence_bleu("x y z", ["a b c"]) == 0.0  # no unigram in common


def test_sentence_bleu_smoothing_clipping_and_brevity():
    """Smoothing: "a b c" vs "a b d": p1 2/3, p2 1/2, p3 0 -> 0.1/1, p4 (no 4-gram) 0.1/1
    -> (2/3 * 1/2 * 0.1 * 0.1) ** (1/4) = (1/300) ** (1/4).
    Clipping: "the the the the" vs "the cat": p1 1/4, p2 0.1/3, p3 0.1/2, p4 0.1/1, BP 1
    (4 > 2 words). Brevity: "the cat" vs a 6-word ref: p1 = p2 = 1, p3 = p4 = 0.1,
    BP = exp(1 - 6/2). Closest length: "a b c" vs refs of 2 and 4 words (a tie) takes 2,
    so BP = 1 and BLEU = (1 * 1 * 1 * 0.1) ** (1/4); taking 4 would give exp(1 - 4/3) times that."""
    assert sentence_bleu("a b c", ["a b d"]) == pytest.approx((1 / 300) ** 0.25)
    assert sentence_bleu("the the the the", ["the cat"]) == pytest.approx(
        (1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1) ** 0.25)
    assert sentence_bleu("the cat", ["the cat sat on the mat"]) == pytest.approx(
        math.exp(1 - 3) * 0.1 ** 0.5)
    assert sentence_bleu("a b c", ["a b", "a b c d"]) == pytest.approx(0.1 ** 0.25)


def test_self_bleu_hand_values():
    """Two identical texts and one with no word in common: 1, 1, 0 -> mean 2/3."""
    assert self_bleu(["a b c d", "a b c d", "e f g h"]) == pytest.approx(2 / 3)
    assert self_bleu(["a b c d", "e f g h"]) == 0.0
    assert self_bleu(["only one"]) is None
    assert self_bleu(["", "a b c d", "   "]) is None  # empty texts are left out


def test_self_bleu_equals_mean_of_sentence_bleu():
    """The O(words) implementation (largest and second-largest counts per n-gram) against
    the plain definition, on texts with repeated n-grams, ties and different lengths."""
    texts = ["the cat sat on the mat", "the cat the cat sat", "a dog sat on the mat today",
             "the the the", "mat on sat cat the", "the cat sat on the mat", "dog"]
    expected = sum(sentence_bleu(t, texts[:i] + texts[i + 1:]) for i, t in enumerate(texts))
    assert self_bleu(texts) == pytest.approx(expected / len(texts))


def test_grouped_self_bleu():
    """Groups score 1 (identical pair) and 0 (disjoint pair); a single text is skipped."""
    groups = [["a b c d", "a b c d"], ["x y"], ["e f g h", "i j k l"]]
    assert grouped_self_bleu(groups) == pytest.approx(0.5)
    assert grouped_self_bleu([["x"], []]) is None


def test_win_rate_with_ties():
    """[3, 2, 1, 5] vs [1, 2, 2, 4]: win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4."""
    a, b = [3.0, 2.0, 1.0, 5.0], [1.0, 2.0, 2.0, 4.0]
    assert win_rate(a, b) == pytest.approx(0.625)
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    assert win_rate(a, a) == 0.5
    with pytest.raises(ValueError):
        win_rate(a, b[:2])


def test_kl_estimator_on_a_categorical():
    """One-token responses, policy p = (1/2, 1/4, 1/4), reference q = (1/4, 1/2, 1/4).
    KL(p || q) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln(2) / 4. Samples drawn in exact
    proportion to p: tokens 0, 0, 1, 2; the estimate is
    (ln 2 + ln 2 + ln(1/2) + 0) / 4 = ln(2) / 4, the exact KL."""
    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    samples = [0, 0, 1, 2]
    estimate = kl_from_samples([math.log(p[s]) for s in samples], [math.log(q[s]) for s in samples])
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert estimate == pytest.approx(exact) == pytest.approx(math.log(2) / 4)
    assert kl_from_samples([-1.5, -2.0], [-1.5, -2.0]) == 0.0


def test_summarize():
    assert summarize([1.0, 2.0, 3.0, 10.0]) == {"mean": 4.0, "median": 2.5,
                                                "std": pytest.approx(math.sqrt(12.5)), "count": 4}


def _rows(texts, rewards, logps, ref_logps, finished):
    return [{"prompt_index": i // 2, "candidate": i % 2, "text": t, "length": len(t.split()) + 1,
             "finished": f, "reward": r, "logp": lp, "ref_logp": rl}
            for i, (t, r, lp, rl, f) in enumerate(zip(texts, rewards, logps, ref_logps, finished))]


def test_compute_metrics_by_hand():
    """Two prompts x two samples. base rewards [1, 2, 3, 4]; tuned [2, 2, 5, 0]:
    tuned vs base win, tie, win, loss -> 2.5 / 4. tuned KL: logp - ref_logp = 1, 2, 0, 1
    -> 1. Lengths (words + 1) 5, 5, 5, 2 -> 4.25. Two of four finished -> 0.5.
    self_bleu uses the first sample of each prompt ("a b c d", "a b c d" identical -> 1);
    per prompt: prompt 0 "a b c d" vs "x y z w" -> 0, prompt 1 "a b c d" vs "q" -> 0."""
    base = _rows(["a b", "c d", "e", "f g h"], [1, 2, 3, 4], [-1] * 4, [-1] * 4, [1, 1, 0, 0])
    tuned = _rows(["a b c d", "x y z w", "a b c d", "q"], [2, 2, 5, 0], [-1, -1, -2, -3],
                  [-2, -3, -2, -4], [True, False, True, False])
    m = compute_metrics({"base": base, "tuned": tuned}, baseline="base")
    assert m["base"]["win_rate/reward"] == 0.5 and m["base"]["kl"] == 0.0
    t = m["tuned"]
    assert t["win_rate/reward"] == pytest.approx(0.625)
    assert t["reward/mean"] == pytest.approx(2.25) and t["reward/median"] == pytest.approx(2.0)
    assert t["kl"] == pytest.approx(1.0)
    assert t["length"] == pytest.approx(4.25) and t["finished_rate"] == 0.5
    assert t["distinct_1"] == pytest.approx(9 / 13)  # a b c d x y z w q: 9 of 13 words
    assert t["self_bleu"] == pytest.approx(1.0)
    assert t["self_bleu_per_prompt"] == 0.0
    assert t["score/mean"] is None and t["win_rate/score"] is None  # no scorer given
