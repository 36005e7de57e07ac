"""`prefalign demo --task arithmetic`: the problems and their split, exact match by hand,
the paired gain, and the pipeline end to end at test size (the learning figure is measured
by running the command, see the README)."""

import json

import pytest
import torch

from helpers import run_cli
from prefalign.demo.arithmetic import (
    ArithmeticSettings,
    accuracy_figures,
    exact_match,
    exact_matches,
    make_problems,
    run_arithmetic,
)


def test_problems_are_exact_sums_split_without_overlap_and_seeded():
    s = ArithmeticSettings(min_operand=10, max_operand=29, heldout=50)
    train, heldout = make_problems(s)
    assert len(train) == 400 - 50 and len(heldout) == 50
    prompts = [r["prompt"] for r in train + heldout]
    assert len(set(prompts)) == 400  # every pair once, in one split only
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in heldout)
    for r in train + heldout:
        a, b = r["prompt"].removesuffix("=").split("+")
        assert len(r["prompt"]) == 6 and 10 <= int(a) <= 29 and 10 <= int(b) <= 29
        assert r["answer"] == str(int(a) + int(b))
    assert make_problems(s) == (train, heldout)
    assert make_problems(ArithmeticSettings(min_operand=10, max_operand=29, heldout=50,
                                            seed=1))[1] != heldout
    with pytest.raises(ValueError, match="heldout"):
        make_problems(ArithmeticSettings(min_operand=10, max_operand=29, heldout=400))


@pytest.mark.parametrize("response, right", [
    ("71", True), (" 71\n", True),  # surrounding whitespace does not count
    ("710", False), ("7 1", False), ("071", False), ("17", False), ("", False),
    ("71+1", False), ("23+48=71", False),  # the answer alone, not a last number in text
])
def test_exact_match_is_the_stripped_answer_and_nothing_else(response, right):
    assert exact_match(response, "71") is right


def test_exact_matches_reads_each_problems_greedy_answer_in_problem_order():
    samples = [{"prompt_index": 1, "candidate": 0, "text": "5"},
               {"prompt_index": 0, "candidate": 0, "text": "30 "},
               {"prompt_index": 2, "candidate": 0, "text": "118"},
               {"prompt_index": 2, "candidate": 1, "text": "117"}]  # not the first answer
    assert exact_matches(samples, ["30", "6", "117"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="one answer to each of the 4 problems"):
        exact_matches(samples, ["30", "6", "117", "1"])


def test_accuracy_figures_pair_the_problems():
    """sft right on 2 of 4, grpo on all 4: accuracies 0.5 and 1.0, gain 0.5. Paired, the
    per-problem differences are (1, 0, 1, 0): a resample's gain is the share of drawn
    problems with difference 1, so the interval lies in [0, 1]; where both models differ by
    the same on every problem the paired interval has no width."""
    f = accuracy_figures([0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], resamples=500, seed=0)
    assert f["problems"] == 4
    assert f["sft"]["value"] == 0.5 and f["grpo"]["value"] == 1.0
    assert f["gain"]["value"] == 0.5
    lo, hi = f["gain"]["ci95"]
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert f["grpo"]["ci95"] == [1.0, 1.0]
    same = accuracy_figures([0.0, 1.0, 0.0], [1.0, 1.0, 1.0][:3], resamples=200, seed=0)
    assert same["gain"]["value"] == pytest.approx(2 / 3)
    shifted = accuracy_figures([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], resamples=200, seed=0)
    assert shifted["gain"]["ci95"] == [1.0, 1.0]


def test_the_pipeline_end_to_end_and_the_command_reuses_its_stages(tmp_path, capsys):
    threads = torch.get_num_threads()
    figures = run_arithmetic(str(tmp_path), settings=ArithmeticSettings.quick())
    assert torch.get_num_threads() == threads  # its one thread is given back
    folder = tmp_path / "arithmetic"
    report = json.loads((folder / "report" / "report.json").read_text("utf-8"))
    # exact match recomputed by hand from the written samples and held-out answers
    answers = [json.loads(line)["answer"] for line in
               (folder / "base" / "heldout.jsonl").read_text("utf-8").splitlines()]
    samples = [json.loads(line) for line in
               (folder / "report" / "samples.jsonl").read_text("utf-8").splitlines()]
    for name in ("sft", "grpo"):
        texts = {r["prompt_index"]: r["text"] for r in samples if r["model"] == name}
        right = sum(texts[i].strip() == a for i, a in enumerate(answers))
        assert figures[name]["value"] == pytest.approx(right / len(answers))
        assert report["metrics"][name]["exact_match"] == figures[name]["value"]
    assert figures["gain"]["value"] == pytest.approx(figures["grpo"]["value"]
                                                     - figures["sft"]["value"])
    assert list(report["metric_info"])[0] == "exact_match"
    assert "benchmark/accuracy" in report["metrics"]["grpo"]
    assert report["findings"][1].startswith("GRPO gain:")
    assert (folder / "report" / "report.html").is_file()
    assert (folder / "grpo" / "final").is_dir()
    # the command: the same settings (--quick, seed 0) reuse every stage
    code, out, _ = run_cli(capsys, ["demo", "--task", "arithmetic", "--quick",
                                    "--output-dir", tmp_path])
    assert code == 0
    assert out.count("reused") == 3 and "GRPO gain:" in out
