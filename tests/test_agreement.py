"""Judge-human agreement: kappa and its bootstrap interval worked by hand, and the
`prefalign judge agreement` command end to end next to plain `prefalign judge`."""

import json
import math

import pytest

from helpers import ScriptedServer, write_jsonl
from prefalign.cli import main
from prefalign.preferences.agreement import (
    accuracy_by_confidence,
    bootstrap_kappa,
    cohen_kappa,
    percentile,
    suggest_threshold,
)


def table(n11, n10, n01, n00):
    """Labels of (judge, human) from a 2x2 table: n11 both say 1, n10 judge 1 / human 0..."""
    pairs = [(1, 1)] * n11 + [(1, 0)] * n10 + [(0, 1)] * n01 + [(0, 0)] * n00
    return [a for a, _ in pairs], [b for _, b in pairs]


def test_kappa_by_hand():
    # The module docstring's table: p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5 -> 0.4.
    assert cohen_kappa(*table(4, 1, 2, 3)) == pytest.approx(0.4)
    assert cohen_kappa(*table(5, 0, 0, 5)) == 1.0
    assert cohen_kappa(*table(0, 5, 5, 0)) == -1.0   # p_o = 0, p_e = 0.5
    # 9 of 10 agree, but the human says 1 throughout: p_e = 0.9 * 1 -> kappa 0.
    assert cohen_kappa(*table(9, 0, 1, 0)) == pytest.approx(0.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))   # one label throughout: undefined
    assert percentile([4, 1, 3, 2], 0.5) == 2.5 and percentile([1, 2, 3], 0.975) == 2.95


def test_bootstrap_interval_by_hand():
    """Prompts A (agree on both labels) and B (disagree on both). Four draws with k copies of
    A: p_o = k/4, p_e = 0.5, kappa = k/2 - 1. With 3 A's and 1 B, k ~ Binomial(4, 3/4):
    P(k = 0) = 1/256 < 2.5% <= P(k <= 1) = 13/256, and P(k = 4) = 81/256 > 2.5%, so the
    interval is kappa(k=1) to kappa(k=4): -0.5 to 1.0, around kappa 0.5."""
    agree, disagree = [(1, 1), (0, 0)], [(1, 0), (0, 1)]
    groups = [agree, agree, agree, disagree]
    j = [a for g in groups for a, _ in g]
    h = [b for g in groups for _, b in g]
    assert cohen_kappa(j, h) == pytest.approx(0.5)
    assert bootstrap_kappa(groups, seed=0) == pytest.approx((-0.5, 1.0))
    assert bootstrap_kappa(groups, seed=3) == bootstrap_kappa(groups, seed=3)
    assert bootstrap_kappa([agree, agree], seed=1) == (1.0, 1.0)
    assert bootstrap_kappa([[(1, 1)]], seed=0) is None  # every resample undefined


def test_accuracy_by_confidence_and_the_suggested_threshold():
    confidences = [0.55, 0.65, 0.75, 0.95]
    judge, human = [1, 0, 1, 0], [0, 1, 1, 0]
    correct = [a == b for a, b in zip(judge, human)]
    assert accuracy_by_confidence(confidences, correct) == [
        (0.5, 0.6, 1, 0.0), (0.6, 0.7, 1, 0.0), (0.7, 0.8, 1, 1.0), (0.9, 1.0, 1, 1.0)]
    assert accuracy_by_confidence([1.0], [True]) == [(0.9, 1.0, 1, 1.0)]
    # >= 0.55: kappa 0; >= 0.65: p_o 2/3, p_e 4/9 -> 0.4; >= 0.75: kappa 1.
    assert suggest_threshold(confidences, judge, human, 0.6) == (0.75, 1.0, 2)
    assert suggest_threshold(confidences, judge, human, 0.35) == (0.65, pytest.approx(0.4), 3)
    assert suggest_threshold([0.9, 0.9], [1, 0], [0, 1], 0.1) is None


# ---- the command --------------------------------------------------------------------------


def pair(prompt, chosen, rejected, **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def test_judge_agreement_command_end_to_end(tmp_path, capsys):
    human = write_jsonl(tmp_path / "human.jsonl", [
        pair("p1", "a", "b", source="human"), pair("p2", "c", "d", source="human"),
        pair("p3", "e", "f", source="human"), pair("p4", "g", "h", source="human"),
        pair("p5", "x", "y", source="human")])
    judged = write_jsonl(tmp_path / "judged.jsonl", [
        pair("p1", "a", "b", confidence=0.95), pair("p2", "d", "c", confidence=0.55),
        pair("p3", "e", "f", confidence=0.75), pair("p4", "h", "g", confidence=0.65),
        pair("p9", "u", "v", confidence=0.9)])  # p5 and p9: in one file only
    (tmp_path / "judged.judgments.jsonl").write_text(
        json.dumps({"pairs": [{"consistent": True}, {"consistent": False}]}) + "\n"
        + json.dumps({"pairs": [{"consistent": True}, {"consistent": None}]}) + "\n")
    assert main(["judge", "agreement", "--judged", judged, "--human", human,
                 "--target-kappa", "0.6", "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    # Labels (1: the first of the two sorted texts chosen): judge 1 0 1 0, human 1 1 1 1.
    assert "4 pairs over 4 prompts labelled by both" in out
    assert "accuracy 0.500; Cohen's kappa 0.000" in out
    assert "position-flip rate of the judge run: 0.333" in out
    assert "[0.5, 0.6): 1 pairs, accuracy 0.000" in out
    assert "[0.9, 1.0]: 1 pairs, accuracy 1.000" in out
    assert "no --min-confidence reaches kappa 0.6" in out  # the human says 1 throughout


def test_judge_agreement_refuses_files_with_nothing_in_common(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [pair("p1", "a", "b")])
    b = write_jsonl(tmp_path / "b.jsonl", [pair("p2", "a", "b")])
    assert main(["judge", "agreement", "--judged", a, "--human", b]) == 2
    assert "no pair is in both files" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair("p1", "a", "b", confidence="high")])
    assert main(["judge", "agreement", "--judged", bad, "--human", a]) == 2
    assert "bad.jsonl:1: field 'confidence'" in capsys.readouterr().err


def test_plain_judge_command_still_parses(tmp_path, monkeypatch, capsys):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = ScriptedServer({}, default=(200, "0"))
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "P", "candidates": ["a1", "b1"]}])
    out = tmp_path / "pairs.jsonl"
    try:
        assert main(["judge", "--input", data, "--output", str(out), "--judge-url", server.url,
                     "--judge-model", "m", "--mode", "pairwise", "--network-retries",
                     "0"]) == 0
    finally:
        server.close()
    assert out.read_text() == "" and len(server.requests) == 2  # "0" both ways: a flip
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("pairwise, this run: 1 pairs asked in both orders, "
                                  "position-flip rate 1.000")


def test_judge_agreement_suggests_a_threshold_and_has_its_own_help(tmp_path, capsys):
    # Sorted-text labels: human 1 0 1 0; judge 0 1 1 0 with confidences 0.55 0.65 0.75 0.95,
    # as in test_accuracy_by_confidence_and_the_suggested_threshold: >= 0.75 reaches kappa 1.
    human = write_jsonl(tmp_path / "h.jsonl", [
        pair("p1", "a", "b"), pair("p2", "d", "c"), pair("p3", "e", "f"), pair("p4", "h", "g")])
    judged = write_jsonl(tmp_path / "j.jsonl", [
        pair("p1", "b", "a", confidence=0.55), pair("p2", "c", "d", confidence=0.65),
        pair("p3", "e", "f", confidence=0.75), pair("p4", "h", "g", confidence=0.95)])
    assert main(["judge", "agreement", "--judged", judged, "--human", human]) == 0
    out = capsys.readouterr().out
    assert "suggested --min-confidence 0.750: kappa 1.000 on 2 of 4 pairs (target 0.6)" in out
    assert "position-flip rate of the judge run: n/a" in out
    with pytest.raises(SystemExit) as done:
        main(["judge", "agreement", "--help"])
    assert done.value.code == 0 and "--target-kappa" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "judge-agreement" not in capsys.readouterr().out
