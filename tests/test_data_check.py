"""check_file summaries and load_preferences, the two entry points over the whole path."""

import json
import re

import pytest

from prefalign.data import DataReport, check_file, load_preferences
from prefalign.data.check import percentile
from prefalign.errors import DataError

ROWS = [
    {"prompt": "Say it.", "chosen": " Good.", "rejected": " Bad.", "margin": 1.0, "source": "a"},
    {"prompt": "Say more.", "chosen": " Good great.", "rejected": " Bad.", "source": "b"},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."},
    {"prompt": "Say it.", "chosen": " Same.", "rejected": " Same."},
    {"prompt": "Say it.", "chosen": "", "rejected": " Bad."},
    {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "Go"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_percentile_nearest_rank_hand_checked():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert [percentile([7, 3, 5], q) for q in (50, 90, 100)] == [5, 7, 7]  # ranks 2, 3, 3
    assert percentile([4], 50) == 4


def test_check_without_tokenizer_counts_characters(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    summary = check_file(path)
    assert summary.ok
    text = summary.format()
    lines = text.splitlines()
    assert lines[0] == f"{path}: OK"
    assert lines[1] == "rows read: 6, kept: 4, dropped: 2"
    assert lines[2] == "formats: explicit 2, conversational 1, hh 1"
    assert f"dropped (chosen equals rejected): 1 (first: {path}:4)" in lines
    assert f"dropped (empty completion): 1 (first: {path}:5)" in lines
    assert "kept columns: margin (1 rows), source (2 rows)" in lines
    assert "lengths in characters" in text and "tokens" not in text
    # Prompt characters: "Say it." 7, "Say more." 9, "\n\nHuman: Hi\n\nAssistant:" 23, "Hi" 2
    assert summary.lengths["prompt"] == {50: 7, 90: 23, 99: 23, 100: 23}
    prompt_line = next(line for line in lines if line.strip().startswith("prompt"))
    assert prompt_line.split()[1:] == ["7", "23", "23", "23"]


def test_check_with_tokenizer_counts_tokens_and_truncation(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    summary = check_file(path, tokenizer, max_length=8, max_prompt_length=4)
    text = summary.format()
    assert "lengths in tokens" in text and "characters" not in text

    # The same lengths counted here straight from the tokenizer (no boundary merges in ROWS).
    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    chat_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    prompts = [n("Say it."), n("Say more."), n("\n\nHuman: Hi\n\nAssistant:"), n(chat_prompt)]
    chosen = [n(" Good.</s>"), n(" Good great.</s>"), n(" Hello!</s>"), n("Hello</s>\n")]
    rejected = [n(" Bad.</s>"), n(" Bad.</s>"), n(" Go.</s>"), n("Go</s>\n")]
    for name, values in (("prompt", prompts), ("chosen", chosen), ("rejected", rejected)):
        ordered = sorted(values)  # nearest rank of 4 values: p50 is the 2nd, p90/p99/max the 4th
        assert summary.lengths[name] == {
            50: ordered[1],
            90: ordered[3],
            99: ordered[3],
            100: ordered[3],
        }
    # Prompts are cut to 4 tokens at most, then completions to 8 - len(prompt).
    room = [8 - min(p, 4) for p in prompts]
    t = summary.truncation
    assert t.prompt == sum(p > 4 for p in prompts) >= 1
    assert t.chosen == sum(c > r for c, r in zip(chosen, room)) >= 1
    assert t.rejected == sum(c > r for c, r in zip(rejected, room))
    assert (
        f"truncated (max_length=8, max_prompt_length=4): prompt {t.prompt}, chosen {t.chosen}, "
        f"rejected {t.rejected} of 4 rows"
    ) in text


def test_check_reports_not_ok_when_every_row_is_dropped(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS[3:5])
    summary = check_file(path)
    assert not summary.ok
    assert summary.format().splitlines()[0] == f"{path}: NOT OK: no usable rows"


def test_check_strict_and_malformed_rows_raise(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: chosen equals rejected"):
        check_file(path, strict=True)
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "x", "chosen": 1, "rejected": "y"}]
    )
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(bad))}:2: field 'chosen' must be a string or a list of messages, got int",
    ):
        check_file(bad)


def test_load_preferences_end_to_end(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    features, report = load_preferences(path, tokenizer, max_length=64, max_prompt_length=32)
    assert isinstance(report, DataReport)
    assert report.rows == 6 and report.normalize.kept == len(features) == 4
    assert report.normalize.dropped == {"chosen equals rejected": 1, "empty completion": 1}
    assert features[0]["margin"] == 1.0 and features[0]["source"] == "a"
    assert all(f["chosen_input_ids"][-1] == tokenizer.eos_token_id for f in features[:3])
    with pytest.raises(
        DataError,
        match=r"all 2 rows were dropped \(chosen equals rejected: 1, empty completion: 1\)",
    ):
        load_preferences(ROWS[3:5], tokenizer)
