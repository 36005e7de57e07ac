"""`prefalign demo --task hybrid`: the simulated annotator, the judge's training rows, and
the whole loop end to end with a real local judge model."""

import json

import pytest

from prefalign.demo.hybrid import (
    HybridSettings,
    judge_rows,
    run_hybrid,
    simulated_annotator,
    truth_accuracy,
)
from prefalign.demo.pipeline import DemoSettings
from prefalign.preferences.annotate import Item

GOOD, OK, BAD = "it was great and lovely.", "it was great.", "it was awful."
ALSO_OK = "the cast was superb."  # one positive word: scores as OK does


def test_the_simulated_annotator_ranks_by_the_noiseless_scorer_and_ties_equal_scores():
    item = Item("p", (BAD, OK, GOOD, ALSO_OK), "f:1")
    rows = simulated_annotator([item], noise=0.0, seed=0)
    pairs = {(r["chosen"], r["rejected"]) for r in rows}
    assert pairs == {(GOOD, OK), (GOOD, ALSO_OK), (GOOD, BAD), (OK, BAD), (ALSO_OK, BAD)}
    assert all(r["source"] == "human" for r in rows)
    assert truth_accuracy(rows) == 1.0


def test_the_simulated_annotators_noise_flips_that_share_of_pairs_the_same_way_each_run():
    items = [Item(f"p{i}", (f"it was great {'and fun ' * i}.", f"it was awful {'x ' * i}."),
                  f"f:{i}") for i in range(400)]
    rows = simulated_annotator(items, noise=0.1, seed=0)
    assert truth_accuracy(rows) == pytest.approx(0.9, abs=0.04)
    assert rows == simulated_annotator(items, noise=0.1, seed=0)
    assert truth_accuracy(simulated_annotator(items, noise=1.0, seed=0)) == 0.0


def test_the_judge_learns_from_both_orders_of_every_pair_so_position_cannot_help():
    rows = judge_rows(HybridSettings(judge_pairs=50, judge_noise=0.2))
    assert len(rows) == 100
    verdicts = [r["completion"][0]["content"] for r in rows]
    assert verdicts.count("0") == verdicts.count("1") == 50
    for first, second in zip(rows[0::2], rows[1::2]):
        a, b = first["prompt"][0]["content"].split(" | ")
        assert second["prompt"][0]["content"] == f"{b} | {a}"
        assert {first["completion"][0]["content"], second["completion"][0]["content"]} == {"0",
                                                                                         "1"}


@pytest.mark.slow
def test_hybrid_loop_end_to_end_with_a_real_local_judge(tmp_path, capsys):
    settings = HybridSettings(demo=DemoSettings(sft_steps=100), prompts=40, human_items=20,
                              target_kappa=0.5)
    run_hybrid(str(tmp_path), settings=settings)
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "hybrid-report" / "report.json").read_text())
    loop = report["hybrid"]
    assert "Judge-human Cohen's kappa" in printed and report["findings"][0] in printed
    # a judge that learned the verdict, not its position
    assert loop["flip_rate"] <= 0.3
    assert loop["truth_accuracy"]["judge (all pairs)"] >= 0.75
    # kappa before and after, each with its interval, on the check half
    for key in ("before", "after", "calibration"):
        lo, hi = loop[key]["kappa_interval"]
        assert -1 <= lo <= hi <= 1, key
    table = report["metrics"]["judge, calibrated"]
    assert (table["kappa"], table["pairs"]) == (loop["after"]["kappa"], loop["after"]["pairs"])
    assert report["intervals"]["judge, calibrated"]["kappa"]["ci95"] == loop["after"][
        "kappa_interval"]
    threshold = loop["threshold"]
    assert threshold is not None and loop["after"]["pairs"] <= loop["before"]["pairs"]
    judged = [json.loads(line) for line in
              (tmp_path / "hybrid-loop" / "judge-rest.jsonl").read_text().splitlines()]
    assert judged and all(r["confidence"] >= threshold for r in judged)
    merged = [json.loads(line) for line in open(loop["merged"])]
    sources = [r["source"] for r in merged]
    assert loop["pairs"] == {"human": sources.count("human"),
                             "judge": len(sources) - sources.count("human")}
    assert loop["pairs"]["human"] > 0 and loop["pairs"]["judge"] > 0

    run_hybrid(str(tmp_path), settings=settings)
    assert capsys.readouterr().out.count(": reused ") == 5
