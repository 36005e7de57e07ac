"""Loading rows from every supported source, and the origin each error names."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefalign.data.sources import Row, load_rows
from prefalign.errors import DataError

ROWS = [
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
    {"prompt": "Say bye.", "chosen": " Bye!", "rejected": " Hi."},
    {"prompt": "Count.", "chosen": " 1 2 3", "rejected": " 3 2 1"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_rows_and_line_origins_skip_blank_lines(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), json.dumps(ROWS[2])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = load_rows(path)
    assert [r.data for r in rows] == ROWS
    # Blank lines are skipped but still counted, so origins are real line numbers.
    assert [r.origin for r in rows] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    data, origin = rows[0]  # a Row unpacks like a (dict, origin) pair
    assert isinstance(rows[0], Row) and data == ROWS[0] and origin == f"{path}:1"


def test_jsonl_malformed_line_names_file_line_and_json_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"prompt": "x", \n')
    with pytest.raises(DataError) as err:
        load_rows(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: invalid JSON: ")
    assert "Expecting property name" in message and "column" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"prefs\.jsonl:2: expected a JSON object, got array"):
        load_rows(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_bytes_name_file_and_line(tmp_path, suffix):
    path = tmp_path / f"prefs{suffix}"
    good = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    bad = b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n'  # Latin-1, not UTF-8
    if suffix == ".csv":
        good, bad = b"prompt,chosen,rejected\na,b,c\n", b"caf\xe9,b,c\n"
    path.write_bytes(good + bad)
    with pytest.raises(DataError) as err:
        load_rows(path)
    line = 3 if suffix == ".csv" else 2
    assert str(err.value).startswith(f"{path}:{line}: not valid UTF-8 (byte 0xe9")


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_rows(tmp_path / "nope.jsonl")
    text = tmp_path / "prefs.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"prefs\.txt: unsupported file type '\.txt'"):
        load_rows(text)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_file_has_no_rows(tmp_path, suffix, content):
    path = tmp_path / f"prefs{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=r"prefs\.\w+: no rows$"):
        load_rows(path)


def test_json_array_of_objects(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(ROWS, indent=2))
    rows = load_rows(path)
    assert [r.data for r in rows] == ROWS
    assert [r.origin for r in rows] == [f"{path} row {i}" for i in range(3)]


def test_json_file_holding_json_lines_or_one_object(tmp_path):
    lines = write_jsonl(tmp_path / "lines.json", ROWS)
    assert [r.origin for r in load_rows(lines)] == [f"{lines}:{i}" for i in (1, 2, 3)]
    single = tmp_path / "one.json"
    single.write_text("\n" + json.dumps(ROWS[0], indent=2))
    assert load_rows(single) == [(ROWS[0], f"{single}:2")]


def test_json_array_errors_name_line_and_row(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON: Expecting value"):
        load_rows(broken)
    not_objects = tmp_path / "strings.json"
    not_objects.write_text('[{"prompt": "a"}, "b"]')
    with pytest.raises(DataError, match=r"strings\.json row 1: expected a JSON object, got string"):
        load_rows(not_objects)


def test_parquet(tmp_path):
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    rows = load_rows(path)
    assert [r.data for r in rows] == ROWS
    assert rows[2].origin == f"{path} row 2"
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"damaged\.parquet: cannot read Parquet: "):
        load_rows(damaged)


def test_csv_records_numbers_and_multiline_cells(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text(
        "prompt,chosen,rejected,margin,weight,id\n"
        'Say hi.,"Hi,\nthere",No.,0.5,,7\n'
        "\n"
        "Count.,1 2,2 1,,2,\n",
        encoding="utf-8",
    )
    rows = load_rows(path)
    assert rows[0].data == {
        "prompt": "Say hi.",
        "chosen": "Hi,\nthere",
        "rejected": "No.",
        "margin": 0.5,
        "id": "7",
    }  # empty weight cell = absent; margin text became a float
    assert rows[1].data == {"prompt": "Count.", "chosen": "1 2", "rejected": "2 1", "weight": 2.0}
    # A record is named by the line it starts on: the quoted cell spans lines 2-3.
    assert [r.origin for r in rows] == [f"{path}:2", f"{path}:5"]


def test_csv_ragged_record(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\na,b\n")
    with pytest.raises(DataError, match=r"prefs\.csv:3: 2 cells but the header has 3 columns"):
        load_rows(path)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    rows = load_rows(single)
    assert [r.data for r in rows] == ROWS and rows[1].origin == f"{single} row 1"

    both = tmp_path / "both"
    splits = {"train": ROWS[:2], "test": ROWS[2:]}
    datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
    ).save_to_disk(str(both))
    assert [r.data for r in load_rows(both)] == ROWS[:2]
    test_rows = load_rows(both, split="test")
    assert [r.data for r in test_rows] == ROWS[2:] and test_rows[0].origin == f"{both}[test] row 0"
    with pytest.raises(
        DataError, match=r"both: no split 'validation'; the splits are \['test', 'train'\]"
    ):
        load_rows(both, split="validation")


def test_folder_not_written_by_save_to_disk(tmp_path):
    write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    with pytest.raises(DataError, match="not one written by Dataset.save_to_disk"):
        load_rows(tmp_path)


def test_in_memory_list_and_dataset_object():
    rows = load_rows(ROWS)
    assert rows == [(r, f"<list> row {i}") for i, r in enumerate(ROWS)]
    with pytest.raises(DataError, match=r"<list> row 1: expected a dict, got str"):
        load_rows([ROWS[0], "chosen"])
    with pytest.raises(DataError, match=r"<list>: no rows"):
        load_rows([])
    datasets = pytest.importorskip("datasets")
    from_object = load_rows(datasets.Dataset.from_list(ROWS))
    assert [r.data for r in from_object] == ROWS and from_object[0].origin == "<dataset> row 0"


def test_hub_id_not_in_cache_is_one_line_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    # Even where the environment allows the network, the loader only looks in the cache.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError) as err:
        load_rows("someone/not-cached-prefs")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "someone/not-cached-prefs: not a local file or folder, and not available offline"
    )
    assert "OfflineModeIsEnabled" in message  # refused before any connection was tried
    assert datasets.config.HF_HUB_OFFLINE is False  # the offline switch is restored


def test_hub_id_read_from_local_cache(tmp_path, monkeypatch):
    """A dataset once prepared into the datasets cache loads by id with no network.

    The cache entry is made the way `load_dataset` lays it out: <owner>___<name>/<config>/
    <version>/<hash>/ holding dataset_info.json and <name>-<split>.arrow.
    """
    datasets = pytest.importorskip("datasets")
    source = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    built = tmp_path / "built"
    datasets.load_dataset("json", data_files=str(source), cache_dir=str(built))
    prepared = next(p for p in built.glob("json/*/*/*") if p.is_dir())
    cache = tmp_path / "cache"
    entry = cache / "someone___prefs" / "default" / "0.0.0" / "abc"
    shutil.copytree(prepared, entry)
    (entry / "json-train.arrow").rename(entry / "prefs-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    rows = load_rows("someone/prefs")
    assert [r.data for r in rows] == ROWS
    assert rows[1].origin == "someone/prefs[train] row 1"


def test_unsupported_source_type():
    with pytest.raises(DataError, match="cannot read preference data from a int"):
        load_rows(3)
