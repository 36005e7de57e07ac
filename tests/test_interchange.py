"""data export / data import: Argilla and Label Studio fixtures written by hand, round trips
through both formats, TRL rows, and refusals of malformed files."""

import json
from pathlib import Path

import pytest

from prefalign.data.sources import load_rows
from prefalign.errors import DataError
from prefalign.preferences.annotate import Item, pair_rows
from prefalign.preferences.interchange import (
    ExportConfig,
    ImportConfig,
    run_export,
    run_import,
    tasks_from_rows,
)

FIXTURES = Path(__file__).parent / "data" / "annotation"
CHAT = [{"role": "user", "content": "Name a fruit."}]
ITEMS = [Item("Name a colour.", ("red", "blue", "green"), "c.jsonl:1", id=7),
         Item(CHAT, ("apple", "pear", "plum"), "c.jsonl:2")]


def read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def labels(annotator, rankings):
    return [{**row, "annotator": annotator} for item, ranking in zip(ITEMS, rankings)
            for row in pair_rows(item, ranking)]


def facts(rows):
    """What a label row says, order-free: who, prompt, chosen over rejected, places, id."""
    return sorted(json.dumps([r["annotator"], r["prompt"], r["chosen"], r["rejected"],
                              r.get("rank_chosen"), r.get("rank_rejected"), r.get("id")])
                  for r in rows)


def test_import_argilla_fixture(tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    run_import(ImportConfig(input=str(FIXTURES / "argilla_records.json"), output=str(out),
                            format="argilla"))
    rows = read(out)
    colour = [(r["annotator"], r["chosen"], r["rejected"]) for r in rows
              if r["prompt"] == "Name a colour."]
    assert colour == [("alice", "blue", "red"), ("alice", "blue", "green"),
                      ("alice", "red", "green"), ("bob", "blue", "green"),
                      ("bob", "blue", "red"), ("bob", "green", "red")]
    assert {r["id"] for r in rows if r["prompt"] == "Name a colour."} == {7}  # metadata
    # The server's [{value, rank}] form with a tie: apple and pear share place 2, no pair.
    fruit = [(r["chosen"], r["rejected"], r["rank_chosen"], r["rank_rejected"], r["id"])
             for r in rows if r["prompt"] == CHAT]
    assert fruit == [("plum", "apple", 1, 2, "8"), ("plum", "pear", 1, 2, "8")]
    assert all(r["source"] == "human" for r in rows) and len(rows) == 8
    assert "1 left out" in capsys.readouterr().out  # carol's draft


def test_import_label_studio_fixtures(tmp_path, capsys):
    out = tmp_path / "ranker.jsonl"
    run_import(ImportConfig(input=str(FIXTURES / "label_studio_ranker.json"),
                            output=str(out), format="label-studio"))
    rows = read(out)
    assert [(r["annotator"], r["chosen"], r["rejected"], r["id"]) for r in rows][:3] == [
        ("2", "blue", "red", 7), ("2", "blue", "green", 7), ("2", "red", "green", 7)]
    assert {r["annotator"] for r in rows} == {"2", "bob@example.com"} and len(rows) == 6
    assert "1 left out" in capsys.readouterr().out  # the cancelled annotation
    run_import(ImportConfig(input=str(FIXTURES / "label_studio_pairwise.json"),
                            output=str(out), format="label-studio"))
    assert [(r["annotator"], r["chosen"], r["rejected"]) for r in read(out)] == [
        ("2", "hello", "hi"), ("3", "hi", "hello")]


@pytest.mark.parametrize("fmt", ["argilla", "label-studio"])
def test_labels_round_trip(tmp_path, fmt, capsys):
    rows = labels("alice", [[1, 0, 2], [2, 0, 1]]) + labels("bob", [[0, 1, 2], [2, 1, 0]])
    source = write(tmp_path / "labels.jsonl", rows)
    exported, back = tmp_path / "export.json", tmp_path / "back.jsonl"
    run_export(ExportConfig(input=str(source), output=str(exported), format=fmt))
    assert "2 items, 4 annotations" in capsys.readouterr().out
    run_import(ImportConfig(input=str(exported), output=str(back), format=fmt))
    assert facts(read(back)) == facts(rows)


def test_partial_labels_export_as_pairs_and_round_trip(tmp_path):
    """bob labelled one pair of the colour item only: no full ranking, so every pair of the
    item becomes a two-candidate task (the Pairwise tag in Label Studio)."""
    rows = labels("alice", [[1, 0, 2], []])[:3] + [
        {**pair_rows(ITEMS[0], [0, 1, 2])[0], "annotator": "bob"}]
    source = write(tmp_path / "labels.jsonl", rows)
    tasks = tasks_from_rows(load_rows(str(source)))
    assert [len(t.candidates) for t in tasks] == [2, 2, 2]
    exported, back = tmp_path / "export.json", tmp_path / "back.jsonl"
    run_export(ExportConfig(input=str(source), output=str(exported), format="label-studio"))
    records = json.loads(exported.read_text())
    assert {r["annotations"][0]["result"][0]["type"] for r in records} == {"pairwise"}
    run_import(ImportConfig(input=str(exported), output=str(back), format="label-studio"))
    # Places within a two-candidate task are 1 and 2; the preferences are the same.
    def strip(rows):
        return facts([{k: v for k, v in r.items() if not k.startswith("rank_")} for r in rows])

    assert strip(read(back)) == strip(rows)
    assert {(r["rank_chosen"], r["rank_rejected"]) for r in read(back)} == {(1, 2)}


def test_candidates_export_as_tasks_without_labels(tmp_path, capsys):
    source = write(tmp_path / "candidates.jsonl", [
        {"prompt": "Name a colour.", "candidates": ["red", "blue", "green"], "id": 7},
        {"prompt": CHAT, "candidates": ["apple", "pear"]}])
    out = tmp_path / "tasks.json"
    run_export(ExportConfig(input=str(source), output=str(out), format="label-studio"))
    tasks = json.loads(out.read_text())
    assert tasks[0]["data"]["candidates"][1] == {"id": "B", "title": "B", "body": "blue"}
    assert tasks[0]["data"]["item_id"] == 7 and tasks[1]["annotations"] == []
    text = capsys.readouterr().out
    assert '<Paragraphs name="prompt"' in text and "<Ranker" in text
    run_export(ExportConfig(input=str(source), output=str(out), format="argilla"))
    records = json.loads(out.read_text())
    assert records[0]["fields"] == {"prompt": "Name a colour.", "response-1": "red",
                                    "response-2": "blue", "response-3": "green"}
    assert records[0]["metadata"] == {"item_id": 7} and records[1]["responses"] == {}
    assert "RankingQuestion" in capsys.readouterr().out


def test_trl_export(tmp_path, capsys):
    source = write(tmp_path / "merged.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b", "weight": 0.5, "source": "x", "id": 3},
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}])
    out = tmp_path / "trl.jsonl"
    run_export(ExportConfig(input=str(source), output=str(out), format="trl"))
    assert read(out) == [{"prompt": "q", "chosen": "a", "rejected": "b", "id": 3},
                         {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "a"}],
                          "rejected": [{"role": "assistant", "content": "b"}]}]
    assert "1 row had a weight" in capsys.readouterr().out


def bad_argilla(responses, fields=None):
    return [{"id": "1", "fields": fields or {"prompt": "p", "response-1": "a",
                                             "response-2": "b"},
             "responses": responses}]


@pytest.mark.parametrize("fmt, content, message", [
    ("argilla", [{"prompt": "p", "chosen": "a", "rejected": "b"}], "not an Argilla record"),
    ("argilla", bad_argilla({"ranking": [{"value": ["response-9"], "user_id": "a"}]}),
     "'response-9', which is not a candidate field"),
    ("argilla", bad_argilla({"ranking": [{"value": ["response-1"], "user_id": "a"}]}),
     "does not place each of the 2 candidates"),
    ("argilla", bad_argilla({"ranking": [{"value": ["response-1", "response-2"]}]}),
     "'user_id' must name the annotator"),
    ("argilla", bad_argilla({"ranking": [{"value": "response-1", "user_id": "a"}],
                             "other": [{"value": 3, "user_id": "a"}]}), "--question"),
    ("argilla", bad_argilla({}, {"text": "p", "response-1": "a"}), "--prompt-field"),
    ("label-studio", [{"data": {"prompt": "p", "candidates": [{"id": "A", "body": "a"},
                                                              {"id": "B", "body": "b"}]},
                       "annotations": [{"completed_by": 1, "result": [{
                           "type": "ranker", "value": {"ranker": {"best": ["A"],
                                                                  "ads": ["B"]}}}]}]}],
     "buckets"),
    ("label-studio", [{"data": {"prompt": "p", "text1": "a", "text2": "b"},
                       "annotations": [{"completed_by": 1, "result": [{
                           "type": "pairwise", "value": {"selected": "both"}}]}]}],
     "\"selected\""),
    ("label-studio", [{"data": {"prompt": "p", "text1": "a", "text2": "b"},
                       "annotations": [{"result": [{"type": "pairwise",
                                                    "value": {"selected": "left"}}]}]}],
     "no annotator"),
    ("label-studio", [{"fields": {}}], "not a Label Studio task"),
])
def test_malformed_imports_name_the_record(tmp_path, fmt, content, message):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(DataError, match="in.json row 0") as error:
        run_import(ImportConfig(input=str(path), output=str(tmp_path / "o.jsonl"), format=fmt))
    assert message in str(error.value)
    assert not (tmp_path / "o.jsonl").exists()


def test_argilla_import_ranks_only_the_fields_the_rankings_name(tmp_path):
    record = {"id": "1", "fields": {"prompt": "p", "context": "some notes", "response-1": "a",
                                    "response-2": "b", "response-3": None},
              "responses": {"ranking": [{"value": ["response-2", "response-1"],
                                         "user_id": "ann", "status": "submitted"}]}}
    path = tmp_path / "records.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    run_import(ImportConfig(input=str(path), output=str(out), format="argilla"))
    assert [(r["chosen"], r["rejected"]) for r in read(out)] == [("b", "a")]


def test_export_refuses_contradictions_and_non_labels(tmp_path):
    cases = [([{"prompt": "p", "chosen": "a", "rejected": "b"},
               {"prompt": "p", "chosen": "b", "rejected": "a"}], "in.jsonl:2: annotator "
              "labels this pair both ways"),
             ([{"prompt": "p", "candidates": ["a"]}], "two or more strings"),
             ([{"text": "p"}], "in.jsonl:1: no prompt or chosen or rejected")]
    for rows, message in cases:
        source = write(tmp_path / "in.jsonl", rows)
        with pytest.raises(DataError) as error:
            run_export(ExportConfig(input=str(source), output=str(tmp_path / "o.json"),
                                    format="argilla"))
        assert message in str(error.value)


def test_cli_export_import_and_agreement(tmp_path, capsys):
    from prefalign.cli import main

    rows = labels("alice", [[1, 0, 2], [2, 0, 1]]) + labels("bob", [[0, 1, 2], [2, 1, 0]])
    source = write(tmp_path / "labels.jsonl", rows)
    exported, back = tmp_path / "records.json", tmp_path / "back.jsonl"
    assert main(["data", "export", "--format", "argilla", str(source), str(exported)]) == 0
    assert main(["data", "import", "--format", "argilla", str(exported), str(back)]) == 0
    assert main(["data", "agreement", str(back), "--bootstrap", "0"]) == 0
    assert "alice & bob" in capsys.readouterr().out
    assert main(["data", "import", "--format", "label-studio", str(source), str(back)]) == 2
    assert "not a Label Studio task" in capsys.readouterr().err
    assert main(["data", "export", "--format", "trl", str(source)]) == 2
    assert "give IN and OUT" in capsys.readouterr().err
    assert main(["data", "export", str(source), str(back)]) == 2
    assert "'format' is required" in capsys.readouterr().err
