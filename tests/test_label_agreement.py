"""prefalign data agreement: Krippendorff's alpha by hand and on the paper's example,
kappa per annotator pair, disputed items, and refusals of files that are not labels."""

import json
import math

import pytest

from prefalign.errors import DataError
from prefalign.preferences.annotate import Item, pair_rows
from prefalign.preferences.krippendorff import coincidences, krippendorff_alpha
from prefalign.preferences.label_agreement import (
    AgreementConfig,
    agreement_report,
    run_agreement,
)
from prefalign.preferences.labels import read_label_files

N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 coders x 12
# units example with missing values; the paper gives 0.743 nominal, 0.815 ordinal,
# 0.849 interval and 0.797 ratio.
PAPER = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
         [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
         [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
         [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]


def paper_units():
    return [[v for v in unit if v is not None] for unit in zip(*PAPER)]


@pytest.mark.parametrize("level, expected", [("nominal", 0.743), ("ordinal", 0.815),
                                             ("interval", 0.849), ("ratio", 0.797)])
def test_alpha_matches_the_papers_worked_example(level, expected):
    assert round(krippendorff_alpha(paper_units(), level), 3) == expected


def test_alpha_by_hand():
    """Two coders, four units: [0, 0], [1, 1], [0, 1], [1, 1].

    Coincidences (each unit has m = 2 values, so each ordered pair weighs 1 / (m - 1) = 1):
    o_00 = 2, o_11 = 2 + 2 = 4, o_01 = o_10 = 1;  n_0 = 3, n_1 = 5, n = 8.
    nominal: D_o term = o_01 + o_10 = 2;  D_e term = n_0 n_1 + n_1 n_0 = 30
    alpha = 1 - (n - 1) * 2 / 30 = 1 - 14/30 = 0.5333...
    """
    units = [[0, 0], [1, 1], [0, 1], [1, 1]]
    assert coincidences(units) == {(0, 0): 2.0, (1, 1): 4.0, (0, 1): 1.0, (1, 0): 1.0}
    assert krippendorff_alpha(units) == pytest.approx(1 - 14 / 30)
    # A third coder on a unit: m = 3, each of its 6 ordered pairs weighs 1/2.
    assert coincidences([[0, 0, 1]]) == {(0, 0): 1.0, (0, 1): 1.0, (1, 0): 1.0}


def test_alpha_by_hand_ordinal_and_interval():
    """Units [1, 3], [3, 3], [2, 2]: o_13 = o_31 = 1, o_33 = 2, o_22 = 2; n_1 = 1, n_2 = 2,
    n_3 = 3, n = 6.
    interval: observed 2 * (3-1)^2 = 8; expected 2 * (n_1 n_2 * 1 + n_1 n_3 * 4 + n_2 n_3 * 1)
              = 2 * (2 + 12 + 6) = 40;  alpha = 1 - 5 * 8 / 40 = 0.
    ordinal:  d2(1,3) = (n_1 + n_2 + n_3 - (n_1 + n_3)/2)^2 = (6 - 2)^2 = 16,
              d2(1,2) = (3 - 1.5)^2 = 2.25, d2(2,3) = (5 - 2.5)^2 = 6.25;
              observed 2 * 16 = 32; expected 2 * (2 * 2.25 + 3 * 16 + 6 * 6.25) = 180;
              alpha = 1 - 5 * 32 / 180 = 1/9.
    """
    units = [[1, 3], [3, 3], [2, 2]]
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.0)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(1 / 9)
    assert krippendorff_alpha(units, "nominal") == pytest.approx(1 - 5 * 2 / 22)


def test_alpha_edge_cases():
    assert krippendorff_alpha([[1, 1], [0, 0], [1]]) == 1.0
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]]))  # one value: no expected disagreement
    assert math.isnan(krippendorff_alpha([[1], [2]]))  # nothing pairable
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha([[1, 2]], "cardinal")
    with pytest.raises(ValueError, match="numeric"):
        krippendorff_alpha([["a", "b"]], "interval")


ITEMS = [Item("Name a colour.", ("a red", "b blue", "c green"), "c.jsonl:1"),
         Item("Name a fruit.", ("a apple", "b pear", "c plum"), "c.jsonl:2", id=7)]


def write_labels(path, rankings, annotator=None):
    """Label rows as annotate writes them; rankings: one list of indices per item."""
    rows = [row for item, ranking in zip(ITEMS, rankings) if ranking
            for row in pair_rows(item, ranking)]
    if annotator:
        rows = [{**row, "annotator": annotator} for row in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_two_annotators_by_hand(tmp_path):
    """alice ranks a > b > c on both items; bob agrees on item 1 and reverses item 2.

    Pairs are labelled 0 when the alphabetically first text wins: alice 0,0,0,0,0,0 and
    bob 0,0,0,1,1,1.  agreement = 3/6;  kappa: p_o = 0.5, p_e = 1 * 0.5 = 0.5 -> 0.
    alpha: o_00 = 6, o_01 = o_10 = 3, n_0 = 9, n_1 = 3, n = 12;
           1 - 11 * 6 / (2 * 9 * 3) = -2/9.
    """
    alice = write_labels(tmp_path / "alice.jsonl", [[0, 1, 2], [0, 1, 2]])
    bob = write_labels(tmp_path / "bob.jsonl", [[0, 1, 2], [2, 1, 0]])
    report = agreement_report(read_label_files([alice, bob]), rounds=200)
    (pair,) = report["pairwise"]
    assert (pair["a"], pair["b"], pair["pairs"], pair["items"]) == ("alice", "bob", 6, 2)
    assert pair["agreement"] == 0.5 and pair["kappa"] == pytest.approx(0.0)
    lo, hi = pair["kappa_interval"]
    assert -1.0 <= lo <= 0.0 <= hi <= 1.0
    assert report["alpha"]["nominal"] == pytest.approx(-2 / 9)
    (disputed,) = report["disagreements"]
    assert disputed["prompt"] == "Name a fruit." and disputed["id"] == 7
    assert disputed["disputed_pairs"] == disputed["shared_pairs"] == 3
    assert {tuple(p["votes"].values()) for p in disputed["pairs"]} == {("a", "b")}


def test_kappa_interval_equals_the_bootstrap_computed_pair_by_pair():
    """The table-based interval gives what resampling the items and computing each kappa
    from its pairs gives, on the same draws (metrics.bootstrap_indices)."""
    import random

    from prefalign.evaluation.metrics import bootstrap_indices, percentile_interval
    from prefalign.preferences.agreement import cohen_kappa
    from prefalign.preferences.label_agreement import kappa_interval

    rng = random.Random(1)
    groups = [[(rng.choice([0, 1, "tie"]), rng.choice([0, 1])) for _ in range(rng.randint(1, 4))]
              for _ in range(40)]
    kappas = []
    for row in bootstrap_indices(len(groups), 300, 5):
        pairs = [pair for g in row for pair in groups[g]]
        k = cohen_kappa([p[0] for p in pairs], [p[1] for p in pairs])
        if not math.isnan(k):
            kappas.append(k)
    assert kappa_interval(groups, 5, 300) == pytest.approx(percentile_interval(kappas))
    assert kappa_interval([[(1, 1)], [(1, 1)]], 0, 50) is None  # one label: never defined


def test_ordinal_alpha_on_ranks_and_partial_overlap(tmp_path):
    """carol ranks only item 1; the ordinal alpha compares the rank each gave each candidate."""
    alice = write_labels(tmp_path / "alice.jsonl", [[0, 1, 2], [0, 1, 2]])
    bob = write_labels(tmp_path / "bob.jsonl", [[0, 1, 2], [2, 1, 0]])
    carol = write_labels(tmp_path / "carol.jsonl", [[0, 2, 1], None])
    report = agreement_report(read_label_files([alice, bob, carol]), "ordinal", rounds=0)
    # Ranks by candidate: item 1 a: 1,1,1  b: 2,2,3  c: 3,3,2;  item 2 a: 1,3  b: 2,2  c: 3,1
    expected = krippendorff_alpha([[1, 1, 1], [2, 2, 3], [3, 3, 2], [1, 3], [2, 2], [3, 1]],
                                  "ordinal")
    assert report["alpha"]["ordinal"] == pytest.approx(expected)
    by_pair = {(p["a"], p["b"]): p for p in report["pairwise"]}
    assert by_pair[("alice", "carol")]["pairs"] == 3
    assert by_pair[("alice", "carol")]["agreement"] == pytest.approx(2 / 3)
    assert by_pair[("alice", "carol")]["kappa_interval"] is None  # --bootstrap 0
    assert [d["prompt"] for d in report["disagreements"]] == ["Name a fruit.", "Name a colour."]


def test_one_file_with_an_annotator_column_and_conflicts(tmp_path):
    both = tmp_path / "team.jsonl"
    rows = [*(dict(r, annotator="ann") for r in pair_rows(ITEMS[0], [0, 1, 2])),
            *(dict(r, annotator="ben") for r in pair_rows(ITEMS[0], [0, 1, 2])),
            dict(pair_rows(ITEMS[0], [1, 0, 2])[0], annotator="ben")]  # ben: b > a, too
    both.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    labels = read_label_files([both])
    assert labels.annotators == ["ann", "ben"] and labels.conflicting == 1
    (pair,) = agreement_report(labels, rounds=0)["pairwise"]
    assert pair["pairs"] == 2 and pair["agreement"] == 1.0


def test_ties_from_the_web_page_count_as_votes(tmp_path):
    """`annotate --serve` writes no row between tied candidates, but gives them one rank:
    alice ranks red = blue > green (ranks 1, 1, 3), bob red > blue > green. On (blue, red)
    alice's vote is a tie, bob's "a red" (text a of the pair): one disputed pair of three."""
    alice = tmp_path / "human.alice.jsonl"
    rows = pair_rows(ITEMS[0], [[0, 1], [2]], annotator="alice")
    alice.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    bob = write_labels(tmp_path / "human.bob.jsonl", [[0, 1, 2], None], annotator="bob")
    report = agreement_report(read_label_files([alice, bob]), "ordinal", rounds=0)
    (pair,) = report["pairwise"]
    assert (pair["a"], pair["b"], pair["pairs"]) == ("alice", "bob", 3)
    assert pair["agreement"] == pytest.approx(2 / 3)
    (disputed,) = report["disagreements"]
    assert disputed["pairs"] == [{"a": "a red", "b": "b blue",
                                  "votes": {"alice": "tie", "bob": "a"}}]
    # Ranks by candidate: red 1, 1; blue 1, 2; green 3, 3.
    assert report["alpha"]["ordinal"] == pytest.approx(
        krippendorff_alpha([[1, 1], [1, 2], [3, 3]], "ordinal"))


def test_command_writes_disagreements_and_json(tmp_path, capsys):
    from prefalign.cli import main

    alice = write_labels(tmp_path / "alice.jsonl", [[0, 1, 2], [0, 1, 2]])
    bob = write_labels(tmp_path / "bob.jsonl", [[0, 1, 2], [2, 1, 0]])
    out = tmp_path / "disputed.jsonl"
    assert main(["data", "agreement", str(alice), str(bob), "--disagreements", str(out),
                 "--bootstrap", "100"]) == 0
    text = capsys.readouterr().out
    assert "alice & bob" in text and "Krippendorff's alpha: -0.222 (nominal, pairs)" in text
    assert "items with disagreement: 1 of 2" in text and "3/3 pairs  Name a fruit." in text
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == "Name a fruit." and row["disagreement"] == 1.0
    assert main(["data", "agreement", str(alice), str(bob), "--json", "--bootstrap", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairwise"][0]["kappa"] == 0.0 and report["alpha"]["nominal"] < 0


def test_run_agreement_with_a_config(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = write_labels(tmp_path / "a" / "labels.jsonl", [[0, 1, 2], [0, 1, 2]])
    two = write_labels(tmp_path / "b" / "labels.jsonl", [[0, 1, 2], [0, 1, 2]])
    report = run_agreement(AgreementConfig(labels=[str(one), str(two)], bootstrap=0))
    # Two files of the same name: each annotator is named by its path.
    assert [a["name"] for a in report["annotators"]] == [str(one), str(two)]
    assert report["pairwise"][0]["agreement"] == 1.0 and report["disagreements"] == []
    assert "2 annotators" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "p", "chosen": "a"}\n', "f.jsonl:1: no rejected field"),
    ('{"prompt": "p", "chosen": "a", "rejected": 3}\n', "f.jsonl:1: chosen and rejected"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "annotator": ""}\n', "'annotator'"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "rank_chosen": 2, "rank_rejected": 1}\n',
     "rank_chosen 2 is not better"),
    ('{"data": {"text1": "a"}, "annotations": []}\n', "prefalign data import --format "
     "label-studio"),
    ('{"fields": {"prompt": "p"}, "responses": {}}\n', "data import --format argilla"),
    ('{"format": "prefalign-annotate/1", "decisions": []}\n', "progress record"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n', "f.jsonl:2"),
])
def test_files_that_are_not_labels_exit_2_with_one_line(tmp_path, capsys, content, message):
    from prefalign.cli import main

    path = tmp_path / "f.jsonl"
    path.write_text(content, encoding="utf-8")
    assert main(["data", "agreement", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_disagreements_never_overwrite_an_input(tmp_path, capsys):
    from prefalign.cli import main

    alice = write_labels(tmp_path / "alice.jsonl", [[0, 1, 2], [0, 1, 2]])
    before = alice.read_text()
    assert main(["data", "agreement", str(alice), "--disagreements", str(alice)]) == 2
    assert "is also an input" in capsys.readouterr().err and alice.read_text() == before


def test_labels_of_unknown_items_are_refused(tmp_path, capsys):
    from prefalign.cli import main

    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(json.dumps({"prompt": "Name a colour.", "candidates":
                                      list(ITEMS[0].candidates)}) + "\n", encoding="utf-8")
    alice = write_labels(tmp_path / "alice.jsonl", [[0, 1, 2], [0, 1, 2]])
    assert main(["data", "agreement", str(alice), "--items", str(candidates)]) == 2
    err = capsys.readouterr().err
    assert "alice.jsonl:4: labels prompt 'Name a fruit.'" in err and "--items" in err
    only_first = write_labels(tmp_path / "one.jsonl", [[0, 1, 2], None])
    assert main(["data", "agreement", str(only_first), "--items", str(candidates),
                 "--bootstrap", "0"]) == 0


def test_rank_levels_need_ranks(tmp_path):
    from prefalign.errors import ConfigError

    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    labels = read_label_files([path])
    with pytest.raises(ConfigError, match="plain.jsonl:1 has no rank_chosen"):
        agreement_report(labels, "ordinal")
    with pytest.raises(DataError, match="no labelled pair"):
        path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
        read_label_files([path])


def test_files_written_by_the_web_page(tmp_path):
    """Two annotators label every item on `annotate --serve` (its Team, overlap 1), one with
    a tie; agreement reads their per-annotator files as they are written."""
    from prefalign.preferences.annotate.team import Team

    team = Team(list(ITEMS), tmp_path / "human.jsonl", "c.jsonl", overlap=1.0)
    plans = {"alice": [["A=B", "C"], ["C", "A", "B"]], "bob": [["A", "B", "C"], ["C", "A", "B"]]}
    for name, plan in plans.items():
        for ranking in plan:
            team.decide(name, team.next(name)["item"]["key"], ranking=ranking)
    files = [tmp_path / "human.alice.jsonl", tmp_path / "human.bob.jsonl"]
    report = agreement_report(read_label_files(files), rounds=0)
    (pair,) = report["pairwise"]
    assert (pair["a"], pair["b"], pair["pairs"]) == ("alice", "bob", 6)
    assert pair["agreement"] == pytest.approx(5 / 6)  # only alice's tie of a and b differs
    assert [d["prompt"] for d in report["disagreements"]] == ["Name a colour."]
