"""Normalising every row format to prompt/chosen/rejected, validation messages and drops."""

import pytest

from prefalign.data.formats import (
    DROP_EMPTY,
    DROP_NO_PROMPT,
    DROP_PROMPTS_DIFFER,
    DROP_SAME,
    implicit_prompt_length,
    normalize_rows,
)
from prefalign.data.sources import Row
from prefalign.errors import DataError


def rows_of(*items):
    return [Row(item, f"prefs.jsonl:{i + 1}") for i, item in enumerate(items)]


def one(item):
    examples, report = normalize_rows(rows_of(item))
    assert report.n_dropped == 0, report.dropped
    return examples[0]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_explicit_with_kept_columns():
    ex = one(
        {
            "prompt": "Q?",
            "chosen": " A",
            "rejected": " B",
            "margin": 2,
            "weight": 0.5,
            "source": "gpt",
            "id": 17,
            "extra": "ignored",
        }
    )
    assert ex == {
        "prompt": "Q?",
        "chosen": " A",
        "rejected": " B",
        "format": "explicit",
        "origin": "prefs.jsonl:1",
        "margin": 2.0,
        "weight": 0.5,
        "source": "gpt",
        "id": 17,
    }
    assert isinstance(ex["margin"], float)


def test_null_kept_columns_are_absent():
    ex = one({"prompt": "Q?", "chosen": " A", "rejected": " B", "margin": None, "id": None})
    assert "margin" not in ex and "id" not in ex


@pytest.mark.parametrize(
    "chosen, rejected, prompt",
    [
        # Cut before the differing word; the space goes with the completions (like TRL).
        ("The answer is 4.", "The answer is 42.", "The answer is"),
        # The common prefix "I like c" ends mid-word: cut back to "I like".
        ("I like cats", "I like cows", "I like"),
        # chosen is a prefix of rejected: chosen keeps at least its last word.
        ("The answer is", "The answer is 4", "The answer"),
        # A turn marker wins over a later word boundary: both replies start "I think".
        (
            "User: hi?\n\nAssistant: I think yes",
            "User: hi?\n\nAssistant: I think no",
            "User: hi?\n\nAssistant:",
        ),
        # A newline is a boundary and stays with the prompt.
        ("Poem:\nRoses are red", "Poem:\nViolets are blue", "Poem:\n"),
        # Punctuation next to a letter is a word boundary.
        ("Answer: yes", "Answer: no", "Answer:"),
    ],
)
def test_implicit_prompt_boundaries(chosen, rejected, prompt):
    ex = one({"chosen": chosen, "rejected": rejected})
    assert ex["format"] == "implicit"
    assert ex["prompt"] == prompt
    assert ex["prompt"] + ex["chosen"] == chosen and ex["prompt"] + ex["rejected"] == rejected
    for completion in (ex["chosen"], ex["rejected"]):
        assert completion, "completions are never empty"
        assert not (prompt[-1:].isalnum() and completion[0].isalnum()), "cut mid-word"


def test_implicit_prompt_length_without_shared_prefix():
    assert implicit_prompt_length("abc", "xyz") == 0
    assert implicit_prompt_length("abc", "abd") == 0  # only a mid-word prefix is shared
    examples, report = normalize_rows(rows_of({"chosen": "abc", "rejected": "abd"}))
    assert examples == [] and report.dropped == {DROP_NO_PROMPT: 1}


def test_hh_single_and_multi_turn():
    single = one(
        {
            "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!",
            "rejected": "\n\nHuman: Hi?\n\nAssistant: Go.",
        }
    )
    assert single["format"] == "hh"
    assert single["prompt"] == "\n\nHuman: Hi?\n\nAssistant:"
    assert (single["chosen"], single["rejected"]) == (" Hello!", " Go.")

    history = "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: And the sea?\n\nAssistant:"
    multi = one(
        {"chosen": history + " The sea is wide.", "rejected": history + " The sea is wide?"}
    )
    # The replies share "The sea is wide": the prompt still ends at the last assistant turn.
    assert multi["prompt"] == history
    assert (multi["chosen"], multi["rejected"]) == (" The sea is wide.", " The sea is wide?")


def test_hh_transcripts_with_different_histories_are_dropped():
    row = {
        "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!",
        "rejected": "\n\nHuman: Hey?\n\nAssistant: Hello!",
    }
    examples, report = normalize_rows(rows_of(row))
    assert examples == [] and report.dropped == {DROP_PROMPTS_DIFFER: 1}
    with pytest.raises(DataError, match=r"^prefs\.jsonl:1: chosen and rejected prompts differ"):
        normalize_rows(rows_of(row), strict=True)


def test_conversational_whole_conversations_multi_turn():
    history = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        assistant("Hello"),
        user("Sea?"),
    ]
    ex = one({"chosen": history + [assistant("Wide.")], "rejected": history + [assistant("Wet.")]})
    assert ex["format"] == "conversational"
    assert ex["prompt"] == history
    assert ex["chosen"] == [assistant("Wide.")] and ex["rejected"] == [assistant("Wet.")]


def test_conversational_prompt_column_beside_whole_conversations_is_not_used():
    ex = one(
        {
            "prompt": "Hi",
            "chosen": [user("Hi"), assistant("Hello")],
            "rejected": [user("Hi"), assistant("Go")],
        }
    )
    assert ex["prompt"] == [user("Hi")] and ex["chosen"] == [assistant("Hello")]


@pytest.mark.parametrize(
    "prompt, completions",
    [
        ([user("Hi")], ("Hello", "Go")),
        ([user("Hi")], ([assistant("Hello")], [assistant("Go")])),
        ("Hi", ([assistant("Hello")], [assistant("Go")])),
        ("Hi", ("Hello", [assistant("Go")])),
    ],
)
def test_conversational_prompt_plus_replies(prompt, completions):
    """A prompt (messages or string) with assistant replies (messages or strings)."""
    ex = one({"prompt": prompt, "chosen": completions[0], "rejected": completions[1]})
    assert ex["format"] == "conversational"
    assert ex["prompt"] == [user("Hi")]
    assert ex["chosen"] == [assistant("Hello")] and ex["rejected"] == [assistant("Go")]


def test_conversational_prompts_that_differ_are_dropped():
    row = {"chosen": [user("Hi"), assistant("A")], "rejected": [user("Hey"), assistant("B")]}
    examples, report = normalize_rows(rows_of(row))
    assert examples == [] and report.dropped == {DROP_PROMPTS_DIFFER: 1}


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "Q", "rejected": "B"},
            "prefs.jsonl:1: missing field 'chosen' (the row has 'prompt', 'rejected')",
        ),
        (
            {"prompt": "Q", "chosen": "A", "rejected": None},
            "prefs.jsonl:1: missing field 'rejected'",
        ),
        (
            {"prompt": "Q", "chosen": 3, "rejected": "B"},
            "prefs.jsonl:1: field 'chosen' must be a string or a list of messages, got int",
        ),
        (
            {"prompt": {"text": "Q"}, "chosen": "A", "rejected": "B"},
            "prefs.jsonl:1: field 'prompt' must be a string or a list of messages, got dict",
        ),
        (
            {
                "chosen": [user("Q"), {"role": "bot", "content": "A"}],
                "rejected": [user("Q"), assistant("B")],
            },
            "prefs.jsonl:1: field 'chosen' message 1 has role 'bot'; use one of system, user, assistant, tool",
        ),
        (
            {"chosen": [user("Q"), {"role": "assistant"}], "rejected": [user("Q"), assistant("B")]},
            "prefs.jsonl:1: field 'chosen' message 1 must be an object with 'role' and 'content'",
        ),
        (
            {
                "chosen": [user("Q"), {"role": "assistant", "content": 5}],
                "rejected": [user("Q"), assistant("B")],
            },
            "prefs.jsonl:1: field 'chosen' message 1: 'content' must be a string, got int",
        ),
        (
            {
                "chosen": [user("Q"), assistant("A")],
                "rejected": [user("Q"), assistant("B"), user("C")],
            },
            "prefs.jsonl:1: field 'rejected' must end with an assistant turn, but its last message has role 'user'",
        ),
        (
            {"chosen": [assistant("A")], "rejected": [assistant("B")]},
            "prefs.jsonl:1: field 'chosen' holds only assistant turns and the row has no 'prompt'",
        ),
        (
            {"prompt": [user("Q"), assistant("A")], "chosen": "A", "rejected": "B"},
            "prefs.jsonl:1: field 'prompt' ends with an assistant turn",
        ),
        (
            {"chosen": [user("Q"), assistant("A")], "rejected": "B"},
            "prefs.jsonl:1: field 'rejected' is a string but the other completion is a whole conversation",
        ),
        (
            {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "big"},
            "prefs.jsonl:1: field 'margin' must be a number, got str",
        ),
        (
            {"prompt": "Q", "chosen": "A", "rejected": "B", "weight": -1},
            "prefs.jsonl:1: field 'weight' must be >= 0, got -1",
        ),
        (
            {"prompt": "Q", "chosen": "A", "rejected": "B", "weight": True},
            "prefs.jsonl:1: field 'weight' must be a number, got bool",
        ),
        (
            {"prompt": "Q", "chosen": "A", "rejected": "B", "id": 1.5},
            "prefs.jsonl:1: field 'id' must be a string or an integer, got float",
        ),
        (
            {"prompt": "Q", "chosen": "A", "rejected": "B", "source": ["x"]},
            "prefs.jsonl:1: field 'source' must be a string or an integer, got list",
        ),
        (
            ["Q", "A", "B"],
            "prefs.jsonl:1: expected an object with prompt/chosen/rejected, got list",
        ),
    ],
)
def test_errors_name_origin_and_field(row, message):
    # Malformed rows raise even without strict: they are bugs in the data, not noise.
    with pytest.raises(DataError) as err:
        normalize_rows(rows_of(row))
    assert str(err.value).startswith(message)


def test_drops_are_counted_by_reason_with_origins():
    rows = rows_of(
        {"prompt": "Q", "chosen": " A", "rejected": " B"},
        {"prompt": "Q", "chosen": "", "rejected": " B"},
        {"prompt": "Q", "chosen": " A", "rejected": "  \n"},
        {"prompt": "Q", "chosen": " A", "rejected": " A"},
        {"chosen": "same text", "rejected": "same text"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"},
        {"prompt": "Q", "chosen": [assistant("")], "rejected": [assistant("B")]},
        {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("A")]},
    )
    examples, report = normalize_rows(rows)
    assert len(examples) == 1 and report.kept == 1
    assert report.dropped == {DROP_EMPTY: 4, DROP_SAME: 3}
    assert report.dropped_origins[DROP_EMPTY] == [f"prefs.jsonl:{i}" for i in (2, 3, 6, 7)]
    assert report.dropped_origins[DROP_SAME] == [f"prefs.jsonl:{i}" for i in (4, 5, 8)]
    assert len(examples) + report.n_dropped == len(rows) == report.rows


def test_strict_mode_raises_on_the_first_drop():
    rows = rows_of(
        {"prompt": "Q", "chosen": " A", "rejected": " B"},
        {"prompt": "Q", "chosen": " A", "rejected": " A"},
    )
    with pytest.raises(
        DataError, match=r"^prefs\.jsonl:2: chosen equals rejected; strict mode drops nothing$"
    ):
        normalize_rows(rows, strict=True)
    with pytest.raises(DataError, match=r"^prefs\.jsonl:1: empty completion \(chosen is empty\)"):
        normalize_rows(rows_of({"prompt": "Q", "chosen": "", "rejected": " B"}), strict=True)


def test_only_the_first_few_origins_are_kept_per_reason():
    rows = rows_of(*[{"prompt": "Q", "chosen": "", "rejected": "B"}] * 9)
    _, report = normalize_rows(rows)
    assert report.dropped[DROP_EMPTY] == 9
    assert report.dropped_origins[DROP_EMPTY] == [f"prefs.jsonl:{i}" for i in range(1, 6)]


def test_mixed_formats_in_one_file_are_counted_per_format():
    rows = rows_of(
        {"prompt": "Q", "chosen": " A", "rejected": " B"},
        {"prompt": "Q", "chosen": " C", "rejected": " D"},
        {"chosen": "Say: yes", "rejected": "Say: no"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: No"},
        {"prompt": [user("Q")], "chosen": "A", "rejected": "B"},
    )
    examples, report = normalize_rows(rows)
    assert [e["format"] for e in examples] == [
        "explicit",
        "explicit",
        "implicit",
        "hh",
        "conversational",
    ]
    assert report.formats == {"explicit": 2, "implicit": 1, "hh": 1, "conversational": 1}
    assert [e["origin"] for e in examples] == [r.origin for r in rows]
