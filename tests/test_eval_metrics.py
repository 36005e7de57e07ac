"""Evaluation metrics against values worked out by hand (the arithmetic is in each docstring)."""

import math

import numpy as np
import pytest

from prefalign.evaluation.metrics import (
    bootstrap_mean_ci,
    distinct_n,
    grouped_self_bleu,
    kl_from_samples,
    length_controlled_win_rate,
    logistic_fit,
    pair_verdict,
    self_bleu,
    sentence_bleu,
    summarize,
    win_rate,
)
from prefalign.evaluation.summary import compute_intervals, compute_metrics


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


# -- intervals and the judge's win rates --------------------------------------------------


def test_bootstrap_resamples_prompts_by_hand():
    """Three prompts of two samples: prompt sums 1+2=3, 3+4=7, 5+6=11. Resample b draws
    prompts idx[b] (numpy's default_rng(7), one (5, 3) draw), so its mean is
    (sum of the drawn prompts' sums) / 6; the interval is numpy's 2.5 and 97.5 percentiles."""
    idx = np.random.default_rng(7).integers(0, 3, size=(5, 3))
    stats = np.array([3.0, 7.0, 11.0])[idx].sum(1) / 6
    expected = np.percentile(stats, [2.5, 97.5])
    lo, hi = bootstrap_mean_ci([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 2, 2], resamples=5, seed=7)
    assert (lo, hi) == pytest.approx(tuple(expected))
    assert lo < hi  # these five draws are not all alike
    # Uneven prompts: prompt 0 holds one sample (0), prompt 1 three (10 each). Whole prompts
    # move, so a resample's mean is 0 (prompt 0 twice), 10 (prompt 1 twice) or 30/4 = 7.5.
    draws = np.random.default_rng(1).integers(0, 2, size=(1000, 2))
    means = np.array([0.0, 30.0])[draws].sum(1) / np.array([1.0, 3.0])[draws].sum(1)
    assert set(means.tolist()) == {0.0, 7.5, 10.0}
    assert bootstrap_mean_ci([0, 10, 10, 10], [0, 1, 1, 1], 1000, seed=1) == pytest.approx(
        tuple(np.percentile(means, [2.5, 97.5])))


def test_bootstrap_constant_is_zero_width_and_shrinks_with_prompts():
    assert bootstrap_mean_ci([0.5] * 8, [0, 0, 1, 1, 2, 2, 3, 3], 200, seed=0) == (0.5, 0.5)
    rng = np.random.default_rng(0)
    widths = []
    for prompts in (20, 500):
        values = rng.normal(size=prompts * 2)
        lo, hi = bootstrap_mean_ci(values.tolist(), [i // 2 for i in range(prompts * 2)], 500)
        assert lo <= values.mean() <= hi
        widths.append(hi - lo)
    # The width scales as 1 / sqrt(prompts): 25 times the prompts, about a fifth the width.
    assert widths[1] < widths[0] / 3


def test_pair_verdict():
    """Both orders prefer the model -> 1, neither -> 0; the same position both times
    (the verdict flips with the order) -> 1/2."""
    assert pair_verdict(True, True) == 1.0 and pair_verdict(False, False) == 0.0
    assert pair_verdict(True, False) == 0.5 and pair_verdict(False, True) == 0.5


def test_logistic_fit_by_hand():
    """x = -1: y 1,0,0,0 (rate 1/4); x = 1: y 1,1,1,0 (rate 3/4). The MLE fits each rate:
    a - b = logit(1/4) = -ln 3, a + b = ln 3 -> a = 0, b = ln 3. With x = 0 everywhere
    and rate 3/4 (a tie as 1/2: targets 1, 1, 1/2, 1/2), a = logit(3/4) = ln 3."""
    x = [-1] * 4 + [1] * 4
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    assert logistic_fit(x, y, ridge=0.0) == pytest.approx((0.0, math.log(3)), abs=1e-9)
    a, b = logistic_fit([0.0] * 4, [1, 1, 0.5, 0.5], ridge=0.0)
    assert a == pytest.approx(math.log(3)) and b == 0.0
    # Separable data (every longer response wins) still gives a finite fit.
    a, b = logistic_fit([-2, -1, 1, 2], [0, 0, 1, 1])
    assert math.isfinite(a) and abs(a) < 1e-6 and b > 3


def _judged(diffs, verdicts, flips=None):
    """Baseline and model rows (one sample per prompt) whose judge verdicts are given."""
    base = [{"prompt_index": i, "candidate": 0, "text": "b", "length": 50, "finished": True,
             "logp": 0.0, "ref_logp": 0.0, "judge_verdict": 0.5, "judge_flip": None}
            for i in range(len(diffs))]
    model = [{**b, "text": "m", "length": 50 + d, "judge_verdict": v,
              "judge_flip": None if flips is None else flips[i]}
             for i, (b, d, v) in enumerate(zip(base, diffs, verdicts))]
    return {"base": base, "model": model}


def test_length_only_judge_has_lc_win_rate_one_half():
    """Verdicts that depend on the length difference alone, P(win) = sigmoid(1.5 z), with
    the model mostly longer: the raw win rate is well above 1/2 and its interval excludes
    1/2; the length-controlled one contains 1/2."""
    rng = np.random.default_rng(0)
    diffs = np.round(rng.normal(4, 6, size=400)).astype(int)
    z = diffs / diffs.std()
    verdicts = (rng.random(400) < 1 / (1 + np.exp(-1.5 * z))).astype(float)
    samples = _judged(diffs.tolist(), verdicts.tolist())
    m = compute_metrics(samples, "base")["model"]
    ci = compute_intervals(samples, "base", resamples=300, seed=0)["model"]
    assert m["win_rate/judge"] > 0.6 and ci["win_rate/judge"]["ci95"][0] > 0.5
    lo, hi = ci["win_rate/judge_lc"]["ci95"]
    assert lo < 0.5 < hi and abs(m["win_rate/judge_lc"] - 0.5) < 0.08
    assert ci["win_rate/judge_lc"]["value"] == m["win_rate/judge_lc"]
    assert length_controlled_win_rate([0.5] * 4, [1, 2, 3, 4]) == pytest.approx(0.5)


def test_intervals_cover_headline_numbers_and_turn_off():
    samples = _judged([1, -1, 2, 0], [1.0, 0.5, None, 0.0], flips=[False, True, None, False])
    for rows in samples.values():
        for i, r in enumerate(rows):
            r["reward"] = float(i) if r["text"] == "m" else 1.0
    m = compute_metrics(samples, "base")["model"]
    assert m["judge/unjudged"] == 1.0 and m["win_rate/judge"] == pytest.approx(0.5)
    assert m["judge/flip_rate"] == pytest.approx(1 / 3)
    ci = compute_intervals(samples, "base", resamples=100, seed=0)["model"]
    assert set(ci) == {"reward/mean", "win_rate/reward", "kl", "win_rate/judge",
                       "judge/flip_rate", "win_rate/judge_lc"}
    for key, entry in ci.items():
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1], key
    assert ci["kl"]["ci95"] == [0.0, 0.0]
    assert compute_intervals(samples, "base", resamples=0) == {}
    one_prompt = {k: v[:1] for k, v in samples.items()}
    assert compute_intervals(one_prompt, "base", resamples=100) == {}
