"""prefalign data merge: weights in both modes, dedupe, stratified split, round trip."""

import json
from collections import Counter

import pytest

from prefalign.data import load_preferences, load_rows, normalize_rows
from prefalign.errors import ConfigError, DataError
from prefalign.preferences.merge import (
    merge_preferences,
    parse_input_spec,
    val_path,
)


def rows(prefix, n, **extra):
    return [{"prompt": f"{prefix} q{i}:", "chosen": " good", "rejected": " bad", **extra}
            for i in range(n)]


def write(path, data):
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return path


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def key(row):
    return json.dumps([row["prompt"], row["chosen"], row["rejected"]])


def test_column_mode_multiplies_weights_and_fills_source(tmp_path):
    a = write(tmp_path / "a.jsonl", [*rows("a", 1), *rows("a2", 1, weight=0.5),
                                     *rows("a3", 1, source="web", margin=1.5, id=7)])
    b = write(tmp_path / "b.jsonl", rows("b", 2))
    report = merge_preferences([(a, 1), (b, 3)], tmp_path / "out.jsonl")
    out = read(tmp_path / "out.jsonl")
    assert [(r["source"], r["weight"]) for r in out] == [
        ("a", 1.0), ("a", 0.5), ("web", 1.0), ("b", 3.0), ("b", 3.0)]
    assert out[2]["margin"] == 1.5 and out[2]["id"] == 7
    assert set(out[0]) == {"prompt", "chosen", "rejected", "source", "weight"}
    assert report.train_rows == 5 and report.val_output is None
    assert not (tmp_path / "out.val.jsonl").exists()


def test_repeat_mode_writes_each_row_weight_times(tmp_path):
    a = write(tmp_path / "a.jsonl", rows("a", 2, weight=0.5))
    b = write(tmp_path / "b.jsonl", rows("b", 3))
    c = write(tmp_path / "c.jsonl", rows("c", 2))
    report = merge_preferences([(a, 1), (b, 3), (c, 0)], tmp_path / "out.jsonl", mode="repeat")
    out = read(tmp_path / "out.jsonl")
    counts = Counter(key(r) for r in out)
    assert {counts[key(r)] for r in rows("a", 2)} == {1}
    assert {counts[key(r)] for r in rows("b", 3)} == {3}
    assert not any(r["source"] == "c" for r in out)  # weight 0 drops the input
    assert {r["weight"] for r in out if r["source"] == "a"} == {0.5}  # own weight kept
    assert {r["weight"] for r in out if r["source"] == "b"} == {1.0}
    assert report.train_rows == len(out) == 2 + 9
    assert [(i.train, i.val) for i in report.inputs] == [(2, 0), (3, 0), (0, 0)]


def test_repeat_mode_refuses_fractional_weights(tmp_path):
    a = write(tmp_path / "a.jsonl", rows("a", 2))
    with pytest.raises(ConfigError, match=r"a\.jsonl: weight 2\.5 is not a whole number"):
        merge_preferences([(a, 2.5)], tmp_path / "out.jsonl", mode="repeat")
    merge_preferences([(a, 2.0)], tmp_path / "out.jsonl", mode="repeat")  # 2.0 is whole
    assert len(read(tmp_path / "out.jsonl")) == 4


def test_dedupe_keeps_the_heaviest_copy_once_and_counts_removals(tmp_path):
    x = {"prompt": "X:", "chosen": " yes", "rejected": " no"}
    a = write(tmp_path / "a.jsonl", [x, *rows("a", 1), x])
    b = write(tmp_path / "b.jsonl", [{**x, "chosen": " yes!"}, x])  # a near copy stays
    report = merge_preferences([(a, 1), (b, 3)], tmp_path / "out.jsonl")
    out = read(tmp_path / "out.jsonl")
    # A's second X loses to its first; B's X (weight 3) beats it and takes its place.
    assert [(r["chosen"], r["source"], r["weight"]) for r in out] == [
        (" yes", "b", 3.0), (" good", "a", 1.0), (" yes!", "b", 3.0)]
    assert [i.duplicates for i in report.inputs] == [2, 0] and report.duplicates == 2
    merge_preferences([(a, 1), (b, 3)], tmp_path / "all.jsonl", dedupe=False)
    assert len(read(tmp_path / "all.jsonl")) == 5


def test_dedupe_sees_messages_with_reordered_keys_as_equal(tmp_path):
    one = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go"}
    two = {"prompt": [{"content": "hi", "role": "user"}], "chosen": "hello", "rejected": "go"}
    a = write(tmp_path / "a.jsonl", [one, two])
    report = merge_preferences([(a, 1)], tmp_path / "out.jsonl")
    assert report.duplicates == 1 and report.train_rows == 1


def test_split_is_stratified_per_source_and_deterministic(tmp_path):
    a = write(tmp_path / "a.jsonl", rows("a", 100))
    b = write(tmp_path / "b.jsonl", rows("b", 40))
    c = write(tmp_path / "c.jsonl", rows("c", 1))  # too small to give a validation row
    report = merge_preferences([(a, 1), (b, 1), (c, 1)], tmp_path / "m.jsonl", val_fraction=0.1)
    train, val = read(tmp_path / "m.jsonl"), read(tmp_path / "m.val.jsonl")
    assert Counter(r["source"] for r in val) == {"a": 10, "b": 4}
    assert Counter(r["source"] for r in train) == {"a": 90, "b": 36, "c": 1}
    assert [(i.train, i.val) for i in report.inputs] == [(90, 10), (36, 4), (1, 0)]
    assert {key(r) for r in train}.isdisjoint(key(r) for r in val)
    assert report.val_output == str(tmp_path / "m.val.jsonl") and report.val_rows == 14

    merge_preferences([(a, 1), (b, 1), (c, 1)], tmp_path / "again.jsonl", val_fraction=0.1)
    assert read(tmp_path / "again.val.jsonl") == val
    merge_preferences([(a, 1), (b, 1)], tmp_path / "seed1.jsonl", val_fraction=0.1, seed=1)
    assert {key(r) for r in read(tmp_path / "seed1.val.jsonl")} != {key(r) for r in val}
    # Each source draws on its own: leaving out b and c does not change a's draw.
    merge_preferences([(a, 1)], tmp_path / "only_a.jsonl", val_fraction=0.1)
    a_val = [r for r in val if r["source"] == "a"]
    assert read(tmp_path / "only_a.val.jsonl") == a_val


def test_split_in_repeat_mode_keeps_all_copies_on_one_side(tmp_path):
    b = write(tmp_path / "b.jsonl", rows("b", 20))
    merge_preferences([(b, 3)], tmp_path / "m.jsonl", mode="repeat", val_fraction=0.25,
                      val_output=tmp_path / "held.jsonl")
    train, val = read(tmp_path / "m.jsonl"), read(tmp_path / "held.jsonl")
    assert len(train) == 15 * 3 and len(val) == 5 * 3
    assert set(Counter(key(r) for r in val).values()) == {3}
    assert {key(r) for r in train}.isdisjoint(key(r) for r in val)


def test_stratify_by_another_column_or_none(tmp_path):
    data = [*rows("x", 30, source="s1"), *rows("y", 10, source="s2")]
    a = write(tmp_path / "a.jsonl", data)
    merge_preferences([(a, 1)], tmp_path / "m.jsonl", val_fraction=0.5)
    assert Counter(r["source"] for r in read(tmp_path / "m.val.jsonl")) == {"s1": 15, "s2": 5}
    merge_preferences([(a, 1)], tmp_path / "n.jsonl", val_fraction=0.5, stratify_by=None)
    assert len(read(tmp_path / "n.val.jsonl")) == 20


def test_split_counts_round_half_up_and_keep_a_training_row(tmp_path):
    a = write(tmp_path / "a.jsonl", [*rows("x", 25, source="s1"), *rows("y", 1, source="s2")])
    # s1: 25 * 0.1 = 2.5 -> 3; s2: 1 * 0.1 -> 0.
    merge_preferences([(a, 1)], tmp_path / "m.jsonl", val_fraction=0.1)
    assert Counter(r["source"] for r in read(tmp_path / "m.val.jsonl")) == {"s1": 3}
    # s2: 1 * 0.5 = 0.5 -> 1, but the stratum keeps its only row for training.
    merge_preferences([(a, 1)], tmp_path / "n.jsonl", val_fraction=0.5)
    assert Counter(r["source"] for r in read(tmp_path / "n.val.jsonl")) == {"s1": 13}


def test_equal_strata_are_drawn_independently(tmp_path):
    a = write(tmp_path / "a.jsonl", rows("same", 50, source="s1") + rows("q", 50, source="s2"))
    merge_preferences([(a, 1)], tmp_path / "m.jsonl", val_fraction=0.2)
    val = read(tmp_path / "m.val.jsonl")
    positions = [{int(r["prompt"].split("q")[-1][:-1]) for r in val if r["source"] == s}
                 for s in ("s1", "s2")]
    assert len(positions[0]) == len(positions[1]) == 10
    assert positions[0] != positions[1]  # one shared seed would pick the same positions


def test_merged_file_loads_with_weights_intact(tmp_path, tokenizer):
    conversation = {"prompt": [{"role": "user", "content": "Hi?"}],
                    "chosen": [{"role": "assistant", "content": "Hello!"}],
                    "rejected": [{"role": "assistant", "content": "Go away."}]}
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!",
          "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    a = write(tmp_path / "a.jsonl", [*rows("a", 2, weight=2.0), conversation])
    b = write(tmp_path / "b.jsonl", [hh])
    merge_preferences([(a, 0.5), (b, 4)], tmp_path / "m.jsonl")
    features, report = load_preferences(tmp_path / "m.jsonl", tokenizer)
    assert report.normalize.n_dropped == 0
    assert [f["weight"] for f in features] == [1.0, 1.0, 0.5, 4.0]
    assert [f["source"] for f in features] == ["a", "a", "a", "b"]
    # Normalising the merged rows again gives the same examples as the originals.
    merged, _ = normalize_rows(load_rows(tmp_path / "m.jsonl"))
    original, _ = normalize_rows(load_rows(a) + load_rows(b))
    fields = ("prompt", "chosen", "rejected")
    assert [[m[k] for k in fields] for m in merged] == [[o[k] for k in fields] for o in original]
    assert merged[2]["format"] == "conversational"


def test_report_counts_dropped_rows_and_formats(tmp_path):
    same = {"prompt": "p", "chosen": " x", "rejected": " x"}
    a = write(tmp_path / "a.jsonl", [*rows("a", 3), same])
    report = merge_preferences([(a, 2)], tmp_path / "m.jsonl", val_fraction=0.34)
    info = report.inputs[0]
    assert (info.rows, info.dropped, info.train, info.val) == (4, 1, 2, 1)
    text = report.format()
    assert str(a) in text and "duplicates removed: 0" in text
    assert f"val:   1 rows -> {tmp_path / 'm.val.jsonl'}" in text


def test_parse_input_spec():
    assert parse_input_spec("B.jsonl:5") == ("B.jsonl", 5.0)
    assert parse_input_spec("A.jsonl") == ("A.jsonl", 1.0)
    assert parse_input_spec("x.jsonl:0.25") == ("x.jsonl", 0.25)
    assert parse_input_spec("data:v2.jsonl") == ("data:v2.jsonl", 1.0)  # not a number
    assert parse_input_spec("odd:5:1") == ("odd:5", 1.0)
    assert val_path("out/merged.jsonl").as_posix() == "out/merged.val.jsonl"


def test_argument_and_data_errors(tmp_path):
    a = write(tmp_path / "a.jsonl", rows("a", 3))
    out = tmp_path / "m.jsonl"
    cases = [
        (dict(inputs=[(a, 1)], mode="stack"), "mode must be one of column, repeat"),
        (dict(inputs=[(a, 1)], val_fraction=1.0), "val_fraction must be in [0, 1)"),
        (dict(inputs=[(a, -1)]), "weight must be a finite number >= 0"),
        (dict(inputs=[(a, float("nan"))]), "weight must be a finite number >= 0"),
        (dict(inputs=[]), "no input files"),
        (dict(inputs=[(a, 1)], output=tmp_path / "m.parquet"), "name it *.jsonl"),
        (dict(inputs=[(a, 1)], output=a), "is also an input"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("output", out)
        with pytest.raises(ConfigError) as err:
            merge_preferences(**kwargs)
        assert message in str(err.value), kwargs
    same = write(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": " x", "rejected": " x"}])
    with pytest.raises(DataError, match="no rows to write"):
        merge_preferences([(same, 1)], out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows("a", 1)[0]) + '\n{"prompt": "p", "chosen": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        merge_preferences([(bad, 1)], out)
    assert not out.exists()  # nothing is written when an input fails


def test_cli_data_merge_weights_split_and_errors(tmp_path, capsys):
    from prefalign import cli

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"a{i}:", "chosen": " x", "rejected": " y"})
                         + "\n" for i in range(10)))
    b.write_text(json.dumps({"prompt": "b:", "chosen": " x", "rejected": " y"}) + "\n")
    out = tmp_path / "m.jsonl"
    code = cli.main(["data", "merge", str(a), f"{b}:3", "--output", str(out),
                     "--mode", "repeat", "--val-fraction", "0.2"])
    assert code == 0 and "duplicates removed: 0" in capsys.readouterr().out
    train = [json.loads(line) for line in out.read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "m.val.jsonl").read_text().splitlines()]
    assert [r["source"] for r in train].count("b") == 3 and len(train) == 8 + 3
    assert [r["source"] for r in val] == ["a", "a"]
    code = cli.main(["data", "merge", f"{b}:2.5", "-o", str(out), "--mode", "repeat"])
    assert code == 2 and "not a whole number" in capsys.readouterr().err


# ---- several annotators' labels: --agreement agreed | weight --------------------------------


def votes(*pairs, annotator=None):
    """Label rows: each (prompt, chosen, rejected)."""
    extra = {"annotator": annotator} if annotator else {}
    return [{"prompt": p, "chosen": c, "rejected": r, "source": "human", **extra}
            for p, c, r in pairs]


def three_annotators(tmp_path):
    """q1: all three say x > y; q2: alice and bob say x > y, carol y > x; q3: alice only."""
    alice = write(tmp_path / "alice.jsonl", votes(("q1", "x", "y"), ("q2", "x", "y"),
                                                  ("q3", "x", "y")))
    bob = write(tmp_path / "bob.jsonl", votes(("q1", "x", "y"), ("q2", "x", "y")))
    carol = write(tmp_path / "carol.jsonl", votes(("q2", "y", "x"), ("q1", "x", "y")))
    return [(alice, 1), (bob, 1), (carol, 1)]


def test_agreement_agreed_keeps_only_unanimous_pairs(tmp_path):
    report = merge_preferences(three_annotators(tmp_path), tmp_path / "out.jsonl",
                               agreement="agreed")
    out = read(tmp_path / "out.jsonl")
    assert [(r["prompt"], r["chosen"], r["weight"]) for r in out] == [("q1", "x", 1.0),
                                                                      ("q3", "x", 1.0)]
    counts = report.agreement
    assert (counts.pairs, counts.kept, counts.disputed, counts.too_few) == (3, 2, 1, 0)
    # q1's copies from bob and carol are duplicates; q2's three rows were dropped.
    assert [(i.duplicates, i.disputed, i.train) for i in report.inputs] == [
        (0, 1, 2), (1, 1, 0), (1, 1, 0)]
    assert "disputed" in report.format() and "1 dropped for disagreement" in report.format()
    report = merge_preferences(three_annotators(tmp_path), tmp_path / "two.jsonl",
                               agreement="agreed", min_annotators=2)
    assert [r["prompt"] for r in read(tmp_path / "two.jsonl")] == ["q1"]
    assert report.agreement.too_few == 1


def test_agreement_weight_is_the_fraction_of_annotators(tmp_path):
    inputs = three_annotators(tmp_path)
    merge_preferences(inputs, tmp_path / "out.jsonl", agreement="weight")
    out = read(tmp_path / "out.jsonl")
    got = [(r["prompt"], r["chosen"], r["rejected"], r["weight"]) for r in out]
    assert got == [("q1", "x", "y", 1.0), ("q2", "x", "y", pytest.approx(2 / 3)),
                   ("q2", "y", "x", pytest.approx(1 / 3)), ("q3", "x", "y", 1.0)]
    # An input weight still scales its rows: the kept copy's weight times the share.
    merge_preferences([(inputs[0][0], 3), *inputs[1:]], tmp_path / "w.jsonl",
                      agreement="weight")
    assert read(tmp_path / "w.jsonl")[1]["weight"] == pytest.approx(3 * 2 / 3)


def test_agreement_reads_an_annotator_column_and_leaves_out_self_contradiction(tmp_path):
    team = write(tmp_path / "team.jsonl", [
        *votes(("q", "x", "y"), annotator="ann"), *votes(("q", "x", "y"), annotator="ben"),
        *votes(("q", "y", "x"), annotator="ben"),  # ben labelled q both ways: no vote
        *votes(("r", "x", "y"), annotator="ann"), *votes(("r", "y", "x"), annotator="ben")])
    report = merge_preferences([(team, 1)], tmp_path / "out.jsonl", agreement="agreed")
    assert [(r["prompt"], r["chosen"]) for r in read(tmp_path / "out.jsonl")] == [("q", "x")]
    assert report.agreement.conflicting == 1 and report.agreement.disputed == 1
    bad = write(tmp_path / "bad.jsonl", [{**votes(("q", "x", "y"))[0], "annotator": ""}])
    with pytest.raises(DataError, match="bad.jsonl:1: field 'annotator'"):
        merge_preferences([(bad, 1)], tmp_path / "o.jsonl", agreement="agreed")


def test_agreement_argument_errors(tmp_path):
    inputs = three_annotators(tmp_path)
    out = tmp_path / "out.jsonl"
    for kwargs, message in [({"agreement": "majority"}, "agreement must be one of"),
                            ({"agreement": "weight", "mode": "repeat"}, "--mode column"),
                            ({"agreement": "agreed", "dedupe": False}, "--no-dedupe"),
                            ({"agreement": "agreed", "min_annotators": 0}, ">= 1"),
                            ({"min_annotators": 2}, "needs --agreement")]:
        with pytest.raises(ConfigError, match=message):
            merge_preferences(inputs, out, **kwargs)
    assert not out.exists()


def test_cli_data_merge_agreement(tmp_path, capsys):
    from prefalign import cli

    (alice, _), (bob, _), (carol, _) = three_annotators(tmp_path)
    out = tmp_path / "out.jsonl"
    assert cli.main(["data", "merge", str(alice), str(bob), str(carol), "-o", str(out),
                     "--agreement", "weight", "--min-annotators", "2"]) == 0
    text = capsys.readouterr().out
    assert "agreement (weight): 2 of 3 pairs kept" in text
    assert [r["prompt"] for r in read(out)] == ["q1", "q2", "q2"]
    assert cli.main(["data", "merge", str(alice), "-o", str(out), "--agreement", "most"]) == 2
    assert "agreement" in capsys.readouterr().err


def test_agreement_counts_ties_from_the_web_page(tmp_path):
    """`annotate --serve` writes no row between tied candidates but gives them one rank:
    alice ranks a = b > c, bob a > b > c. On (a, b) alice's tie agrees with neither text."""
    from prefalign.preferences.annotate import Item, pair_rows

    item = Item("q", ("a", "b", "c"), "c.jsonl:1")
    alice = write(tmp_path / "h.alice.jsonl", pair_rows(item, [[0, 1], [2]], annotator="alice"))
    bob = write(tmp_path / "h.bob.jsonl", pair_rows(item, [0, 1, 2], annotator="bob"))
    report = merge_preferences([(alice, 1), (bob, 1)], tmp_path / "out.jsonl",
                               agreement="agreed")
    assert [(r["chosen"], r["rejected"]) for r in read(tmp_path / "out.jsonl")] == [
        ("a", "c"), ("b", "c")]
    assert report.agreement.disputed == 1
    merge_preferences([(alice, 1), (bob, 1)], tmp_path / "w.jsonl", agreement="weight")
    assert [(r["chosen"], r["rejected"], r["weight"]) for r in read(tmp_path / "w.jsonl")] == [
        ("a", "c", 1.0), ("b", "c", 1.0), ("a", "b", 0.5)]  # where each pair first appears


def test_agreement_weight_keeps_both_orders_of_a_pair_on_one_side_of_the_split(tmp_path):
    """Each of 20 pairs is split 2 to 1 by three annotators: both text orders are written,
    and a validation pair's reverse is never trained on; the fraction counts pairs."""
    def annotator(name, flip):
        return write(tmp_path / f"{name}.jsonl", votes(*[
            (f"q{i}", "y", "x") if flip else (f"q{i}", "x", "y") for i in range(20)]))

    inputs = [(annotator("a", False), 1), (annotator("b", False), 1), (annotator("c", True), 1)]
    merge_preferences(inputs, tmp_path / "out.jsonl", agreement="weight", val_fraction=0.25,
                      seed=3)
    train, val = read(tmp_path / "out.jsonl"), read(tmp_path / "out.val.jsonl")
    assert len(val) == 2 * 5 and len(train) == 2 * 15
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
