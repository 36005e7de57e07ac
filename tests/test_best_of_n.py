"""Best-of-N preference generation: pairing rules, output rows, exactly-once resume."""

import argparse
import json
from collections import Counter

import pytest

from helpers import write_jsonl
from prefalign.config import add_config_arguments, config_from_args
from prefalign.data import load_preferences
from prefalign.errors import ConfigError, DataError
from prefalign.generation import SamplingOptions
from prefalign.preferences import best_of_n
from prefalign.preferences.annotate import read_items
from prefalign.preferences.best_of_n import generate_preferences, select_pairs
from prefalign.preferences.journal import sidecar
from prefalign.scoring import Scorer

SETTINGS = dict(num_candidates=4, sampling=SamplingOptions(max_new_tokens=8, temperature=1.0),
                seed=3, progress=False)


class LengthScorer(Scorer):
    """Shorter is better, in steps of 0.001: a rule that rarely ties. fail_after: raise on
    that call, as a scorer that crashes mid-run would."""

    name = "shorter"

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def _score(self, prompts, responses):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("scorer died")
        return [1.0 - len(r) / 1000 for r in responses]


@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": f"The film {i}:"} for i in range(5)]
    rows.append({"prompt": [{"role": "user", "content": "Say something kind."}], "id": "chat-1"})
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


# ---- pairing ------------------------------------------------------------------------------


def test_extremes_pairs_best_with_worst_then_inwards():
    """scores [0.1, 0.9, 0.5, 0.3] -> order by score [1, 2, 3, 0] -> (1, 0), (2, 3)."""
    pairs, skipped = select_pairs(["a", "b", "c", "d"], [0.1, 0.9, 0.5, 0.3])
    assert pairs == [(1, 0), (2, 3)] and not skipped


def test_all_pairs_respect_min_gap_ties_identical_and_empty():
    """order [0 (0.9), 1 (0.5), 3 (0.5), 2 (0.45)]; the empty text 4 is never paired.
    0>1 gap .4 kept, 0>3 gap .4 kept, 0>2 repeats (best, same), 1>3 tie, 1>2 gap .05 < .1,
    3>2 identical text."""
    texts = ["best", "mid", "same", "same", "  "]
    pairs, skipped = select_pairs(texts, [0.9, 0.5, 0.45, 0.5, 5.0], "all", min_gap=0.1)
    assert pairs == [(0, 1), (0, 3)]
    assert skipped == Counter({"duplicate pair": 1, "tied score": 1, "gap below min_gap": 1,
                               "identical text": 1})


def test_duplicate_texts_do_not_make_the_same_pair_twice():
    pairs, skipped = select_pairs(["a", "a", "b"], [0.9, 0.9, 0.1], "all")
    assert pairs == [(0, 2)] and skipped == Counter({"identical text": 1, "duplicate pair": 1})


def test_unknown_pairing_and_sidecar_names():
    with pytest.raises(ConfigError, match="pairing 'best'"):
        select_pairs(["a", "b"], [1.0, 0.0], "best")
    assert sidecar("out/pairs.jsonl", ".candidates.jsonl").name == "pairs.candidates.jsonl"
    assert sidecar("pairs", ".candidates.jsonl").name == "pairs.candidates.jsonl"


# ---- generation ---------------------------------------------------------------------------


def test_rows_load_unchanged_and_candidates_feed_annotate(tmp_path, tiny_model_dir, prompts,
                                                          tokenizer):
    out = tmp_path / "pairs.jsonl"
    report = generate_preferences(str(tiny_model_dir), prompts, out, "length(max=1,falloff=1000)",
                                  keep_candidates=True, batch_size=4, **SETTINGS)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.pairs == len(rows) > 0 and report.prompts == 6
    for row in rows:
        assert row["score_chosen"] > row["score_rejected"] and row["chosen"] != row["rejected"]
        assert row["source"] == "best_of_n:length(max=1,falloff=1000)"
        assert {k: row[k] for k in ("temperature", "top_p", "max_new_tokens", "seed",
                                    "num_candidates")} == {"temperature": 1.0, "top_p": 1.0,
                                                           "max_new_tokens": 8, "seed": 3,
                                                           "num_candidates": 4}
        assert row["model"] == str(tiny_model_dir.resolve())
    assert [r["id"] for r in rows if isinstance(r["prompt"], list)] == ["chat-1"] * 2
    features, data_report = load_preferences(str(out), tokenizer)
    assert len(features) == len(rows) and data_report.normalize.n_dropped == 0
    items = read_items(sidecar(out, ".candidates.jsonl"))
    assert len(items) == 6 and all(len(item.candidates) == 4 for item in items)
    candidates = [json.loads(line) for line in sidecar(out, ".candidates.jsonl").open()]
    assert [c["prompt_index"] for c in candidates] == list(range(6))
    texts, scores = candidates[0]["candidates"], candidates[0]["scores"]
    best = max((i for i, t in enumerate(texts) if t.strip()), key=lambda i: scores[i])
    assert rows[0]["chosen"] == texts[best]  # an empty candidate (EOS at once) is never paired


def test_interrupted_run_resumes_to_the_uninterrupted_output(tmp_path, tiny_model_dir, prompts):
    """Reference: one run, batches of 3. Interrupted: batches of 1, the scorer dies on its
    3rd call (2 prompts committed), a torn half row and half progress line are left behind;
    the rerun (batches of 2) writes exactly the reference bytes: candidates do not depend on
    the batching, nothing is lost or written twice."""
    model = str(tiny_model_dir)
    ref = tmp_path / "ref.jsonl"
    generate_preferences(model, prompts, ref, LengthScorer(), keep_candidates=True,
                         batch_size=3, **SETTINGS)
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="scorer died"):
        generate_preferences(model, prompts, out, LengthScorer(fail_after=2),
                             keep_candidates=True, batch_size=1, **SETTINGS)
    progress = tmp_path / "out.jsonl.progress.jsonl"
    assert len(progress.read_text().splitlines()) == 3  # header + 2 prompts
    with open(out, "a") as f:
        f.write('{"prompt": "The film 2:", "chos')
    with open(progress, "a") as f:
        f.write('{"index": 2, "ke')
    report = generate_preferences(model, prompts, out, LengthScorer(), keep_candidates=True,
                                  batch_size=2, **SETTINGS)
    assert report.prompts_done_before == 2
    assert out.read_bytes() == ref.read_bytes()
    assert sidecar(out, ".candidates.jsonl").read_bytes() == \
        sidecar(ref, ".candidates.jsonl").read_bytes()
    again = generate_preferences(model, prompts, out, LengthScorer(), keep_candidates=True,
                                 **SETTINGS)
    assert again.prompts_done_before == 6 and again.pairs == 0
    assert out.read_bytes() == ref.read_bytes()


def test_restart_with_other_settings_or_a_foreign_file_is_refused(tmp_path, tiny_model_dir,
                                                                 prompts):
    out = tmp_path / "out.jsonl"
    generate_preferences(str(tiny_model_dir), prompts, out, LengthScorer(), **SETTINGS)
    with pytest.raises(ConfigError, match="started with seed=3, now seed=4"):
        generate_preferences(str(tiny_model_dir), prompts, out, LengthScorer(),
                             **{**SETTINGS, "seed": 4})
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match="has no foreign.jsonl.progress.jsonl beside it"):
        generate_preferences(str(tiny_model_dir), prompts, foreign, LengthScorer(), **SETTINGS)
    with pytest.raises(ConfigError, match="num_candidates must be >= 2"):
        generate_preferences(str(tiny_model_dir), prompts, tmp_path / "x.jsonl", LengthScorer(),
                             **{**SETTINGS, "num_candidates": 1})


def test_changed_input_is_reported(tmp_path, tiny_model_dir, prompts):
    out = tmp_path / "out.jsonl"
    generate_preferences(str(tiny_model_dir), prompts, out, LengthScorer(), **SETTINGS)
    edited = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Another prompt"}])
    with pytest.raises(DataError, match="prompts.jsonl:1: not the item recorded at index 0"):
        generate_preferences(str(tiny_model_dir), edited, out, LengthScorer(), **SETTINGS)


def test_command_line(tmp_path, tiny_model_dir, prompts, capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, best_of_n.GenerateConfig)
    out = tmp_path / "cli.jsonl"
    args = config_from_args(best_of_n.GenerateConfig, parser.parse_args([
        "--model", str(tiny_model_dir), "--data", prompts, "--scorer", "length(max=5,falloff=50)",
        "--output", str(out), "--num-candidates", "3", "--max-new-tokens", "6",
        "--pairing", "all", "--min-gap", "0.01", "--seed", "1", "--batch-size", "6",
        "--top-p", "0.9", "--temperature", "0.8", "--keep-candidates", "--source", "synthetic"]))
    assert best_of_n.run(args) == 0
    printed = capsys.readouterr().out
    assert "6 prompts (6 generated now, 0 before)" in printed and str(out) in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["source"] for r in rows} == {"synthetic"}
    assert all(r["score_chosen"] - r["score_rejected"] >= 0.01 for r in rows)
    assert {(r["top_p"], r["temperature"], r["num_candidates"]) for r in rows} == {(0.9, 0.8, 3)}
