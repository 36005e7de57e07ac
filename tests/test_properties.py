"""Property tests (hypothesis) of the normalisers, tokenization and the collators.

On random rows: nothing escapes but DataError (a clean, one-line user error); every row is
kept or dropped with a counted reason, never silently lost; a valid row is always kept with
its text intact. On random features: collated shapes and masks agree with the inputs.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefalign.data.collate import collate_preferences
from prefalign.data.formats import FORMATS, KEPT_COLUMNS, ROLES, normalize_row, normalize_rows
from prefalign.data.sources import Row
from prefalign.data.tokenize import tokenize_preferences
from prefalign.data.unpaired import collate_unpaired, normalize_unpaired
from prefalign.errors import DataError

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that exercises the format detectors: HH markers, spaces, EOS, non-ASCII.
text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "Same.", " A", "\n\nHuman: Hi\n\nAssistant:", "</s>", "é ✓"]),
)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text)
json_value = st.recursive(
    scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
role = st.one_of(st.sampled_from(ROLES), st.sampled_from(["human", "", "USER"]), json_value)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text}),
    st.fixed_dictionaries({"role": role, "content": st.one_of(text, json_value)}),
    json_value,
)
messages = st.lists(message, max_size=4)
field_value = st.one_of(text, messages, json_value)
word = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
content = word.filter(lambda s: s.strip())


@st.composite
def explicit_row(draw):
    chosen, rejected = draw(content), draw(content)
    if chosen == rejected:
        rejected += " no"
    row = {"prompt": draw(word), "chosen": chosen, "rejected": rejected}
    row.update(draw(st.dictionaries(st.sampled_from(["margin", "weight"]),
                                    st.floats(0, 10), max_size=2)))
    return row


@st.composite
def conversational_row(draw):
    history = draw(st.lists(st.builds(lambda r, c: {"role": r, "content": c},
                                      st.sampled_from(["system", "user", "assistant"]), word),
                            max_size=3))
    history.append({"role": "user", "content": draw(content)})
    chosen, rejected = draw(content), draw(content)
    if chosen == rejected:
        rejected += " no"
    return {"chosen": history + [{"role": "assistant", "content": chosen}],
            "rejected": history + [{"role": "assistant", "content": rejected}]}


valid_row = st.one_of(explicit_row(), conversational_row())
KEYS = ["prompt", "chosen", "rejected", *KEPT_COLUMNS, "label", "completion", "other"]
# Near-valid rows find the edge cases: one field of a valid row replaced by anything.
mutated_row = st.builds(lambda row, key, value: {**row, key: value}, valid_row,
                        st.sampled_from(KEYS), field_value)
raw_row = st.one_of(
    valid_row,
    mutated_row,
    st.fixed_dictionaries({"chosen": field_value, "rejected": field_value},
                          optional={"prompt": field_value, "margin": scalar, "weight": scalar,
                                    "source": json_value, "id": json_value}),
    st.dictionaries(st.sampled_from(KEYS), field_value, max_size=7),
    json_value,
)

def rows_of(items):
    return [Row(item, f"p.jsonl:{i + 1}") for i, item in enumerate(items)]


def assert_accounted(rows, examples, report):
    """Every row is kept or dropped with a reason; the report's counts add up."""
    assert report.rows == len(rows)
    assert report.kept == len(examples)
    assert report.kept + report.n_dropped == len(rows)
    assert all(count > 0 for count in report.dropped.values())


@FAST
@given(st.lists(raw_row, min_size=1, max_size=5), st.booleans())
def test_random_rows_are_kept_dropped_or_refused_cleanly(items, strict):
    rows = rows_of(items)
    try:
        examples, report = normalize_rows(rows, strict=strict)
    except DataError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("p.jsonl:")
        return
    assert_accounted(rows, examples, report)
    assert not (strict and report.n_dropped)
    origins = [row.origin for row in rows]
    for example in examples:
        assert example["format"] in FORMATS and example["origin"] in origins
        parts = [example[k] for k in ("prompt", "chosen", "rejected")]
        assert all(isinstance(p, str) for p in parts) or all(isinstance(p, list) for p in parts)
        assert example["chosen"] != example["rejected"]


@FAST
@given(st.lists(raw_row, min_size=1, max_size=5))
def test_rows_are_normalised_independently(items):
    """A row's outcome does not depend on its neighbours (formats may mix in one file)."""
    rows = rows_of(items)
    outcomes = []
    for data, origin in rows:
        try:
            outcomes.append(normalize_rows([Row(data, origin)])[0])
        except DataError:
            with pytest.raises(DataError):
                normalize_rows(rows)
            return
    examples, _ = normalize_rows(rows)
    assert examples == [e for kept in outcomes for e in kept]


@FAST
@given(st.lists(raw_row, min_size=1, max_size=5))
def test_random_unpaired_rows_are_kept_dropped_or_refused_cleanly(items):
    rows = rows_of(items)
    try:
        examples, report, kind = normalize_unpaired(rows)
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    # Paired rows become two examples each; unpaired rows one.
    assert report.rows == len(rows) and report.kept + report.n_dropped == len(rows)
    assert len(examples) == report.kept * (2 if kind == "paired" else 1)


@FAST
@given(st.lists(valid_row, min_size=1, max_size=6))
def test_valid_rows_are_all_kept_with_their_text(items):
    examples, report = normalize_rows(rows_of(items))
    assert report.n_dropped == 0 and len(examples) == len(items)
    for row, example in zip(items, examples):
        if "prompt" in row:
            assert (example["prompt"], example["chosen"], example["rejected"]) == (
                row["prompt"], row["chosen"], row["rejected"])
        else:
            assert example["prompt"] + example["chosen"] == row["chosen"]
            assert example["prompt"] + example["rejected"] == row["rejected"]
        for key in ("margin", "weight"):
            assert example.get(key) == row.get(key)


@FAST
@given(explicit_row())
def test_a_valid_row_survives_any_bad_neighbour(row):
    """A bad row is refused by name, never by dropping the good one beside it."""
    for bad in ({"chosen": 1, "rejected": "x"}, {"prompt": "p", "chosen": "a", "rejected": "a"}):
        try:
            examples, report = normalize_rows(rows_of([row, bad]))
        except DataError as exc:
            assert str(exc).startswith("p.jsonl:2:")
            continue
        assert examples[0] == normalize_row(row, "p.jsonl:1") and report.n_dropped == 1


# -- tokenization and collation ----------------------------------------------------------


@SLOW
@given(st.lists(valid_row, min_size=1, max_size=4),
       st.integers(2, 24), st.integers(1, 23))
def test_tokenized_rows_fit_and_keep_a_completion_token(tokenizer, items, max_length,
                                                         max_prompt_length):
    examples, _ = normalize_rows(rows_of(items))
    features, report = tokenize_preferences(examples, tokenizer, max_length, max_prompt_length)
    assert len(features) == len(items) == report.rows
    for f in features:
        assert len(f["prompt_input_ids"]) <= min(max_prompt_length, max_length - 1)
        for key in ("chosen_input_ids", "rejected_input_ids"):
            assert 1 <= len(f[key]) <= max_length - len(f["prompt_input_ids"])
    batch = collate_preferences(features, tokenizer.pad_token_id)
    assert batch["completion_mask"].sum(-1).min() >= 1  # every sequence scores some token


ids = st.lists(st.integers(1, 50), max_size=6)
feature = st.fixed_dictionaries(
    {"prompt_input_ids": ids, "chosen_input_ids": ids, "rejected_input_ids": ids},
    optional={"margin": st.floats(-5, 5), "weight": st.floats(0, 5), "source": text},
)


@FAST
@given(st.lists(feature, min_size=1, max_size=5), st.sampled_from(["left", "right"]),
       st.sampled_from([None, 1, 4]))
def test_collated_shapes_and_masks_match_the_features(features, side, multiple):
    batch = collate_preferences(features, pad_token_id=0, padding_side=side,
                                pad_to_multiple_of=multiple)
    n = len(features)
    ids_, attention, completion = (batch[k] for k in ("input_ids", "attention_mask",
                                                      "completion_mask"))
    assert ids_.shape == attention.shape == completion.shape and ids_.shape[0] == 2 * n
    assert ids_.shape[1] % (multiple or 1) == 0
    assert not (completion & ~attention.bool()).any()  # completions are real tokens
    halves = [(f["prompt_input_ids"], f[key]) for key in ("chosen_input_ids",
                                                          "rejected_input_ids") for f in features]
    for row, (prompt, reply) in enumerate(halves):
        real = attention[row].bool()
        assert ids_[row][real].tolist() == prompt + reply  # order and content survive padding
        assert ids_[row][completion[row]].tolist() == reply
        assert (ids_[row][~real] == 0).all()
    for key in ("margin", "weight"):
        if key in batch:
            assert batch[key].shape == (n,) and torch.isfinite(batch[key]).all()


unpaired_feature = st.fixed_dictionaries(
    {"prompt_input_ids": ids, "completion_input_ids": ids, "label": st.booleans()})


@FAST
@given(st.lists(unpaired_feature, min_size=1, max_size=5), st.one_of(st.none(),
                                                                      st.integers(1, 12)))
def test_collated_unpaired_batches_keep_every_row(features, max_length):
    batch = collate_unpaired(features, pad_token_id=0, max_length=max_length)
    n = len(features)
    assert batch["input_ids"].shape[0] == batch["kl_input_ids"].shape[0] == n
    assert batch["label"].tolist() == [f["label"] for f in features]
    for row, f in enumerate(features):
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == (f["prompt_input_ids"]
                                                          + f["completion_input_ids"])
        assert batch["completion_mask"][row].sum() == len(f["completion_input_ids"])
    assert not (batch["kl_completion_mask"] & ~batch["kl_attention_mask"].bool()).any()
