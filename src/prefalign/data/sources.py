"""Read preference rows from files, dataset folders, the local Hugging Face cache or memory.

Every row comes back with a human-readable origin ("prefs.jsonl:12", "prefs.parquet row 5",
"<list> row 3") that all later errors quote, so a user can find the offending row. Line
numbers count from 1 (as editors do); row numbers count from 0 (as `dataset[i]` does).

Supported sources:
  .jsonl / .ndjson   one JSON object per line; blank lines are skipped; read as a stream
                     (a block at a time), so memory holds the rows, not the file's text,
                     and a bad line is reported without reading the rest of the file
  .json              a list of objects, or JSON lines
  .parquet           any Parquet file
  .csv               header line plus one row per record; `margin`/`weight` cells become floats
  folder             written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`; of a
                     DatasetDict, `split` is read: by default "train", and a DatasetDict
                     without one is refused naming its splits
  "owner/name"       a dataset already in the local Hugging Face datasets cache (never
                     downloaded); `split` defaults to "train"

Every JSON value is checked as it is parsed: a key given twice in one object (and a CSV
header or Parquet schema naming a column twice), nesting too deep to parse, an integer
literal too large for a float, and a string holding a lone UTF-16 surrogate (a "\\ud83d"
escape without its pair: it cannot be tokenized or written as UTF-8) are DataErrors naming
the file, line and key or field (strict_json.py).

A `split` given for a source without splits (a file, a single Dataset) is refused rather
than ignored: it means the user expects rows that this source does not have.
  list of dicts      in memory; a `datasets.Dataset` / `DatasetDict` object is accepted too
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from prefalign.data.strict_json import parse_json
from prefalign.errors import DataError

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
# Hub dataset ids: "name" or "owner/name" made of word characters, dots and dashes.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# CSV stores every cell as text; these kept columns are numbers downstream.
_CSV_NUMERIC = ("margin", "weight")
_CSV_OPTIONAL = ("margin", "weight", "source", "id")


class Row(NamedTuple):
    """One raw row and where it came from ("prefs.jsonl:12"); unpacks as (data, origin)."""

    data: Any
    origin: str


def load_rows(source: Any, split: str | None = None) -> list[Row]:
    """Read every row of `source` (see the module docstring) as a list of Row(data, origin).

    Raises DataError for a missing or unreadable source, a malformed line (naming file and
    line), bytes that are not UTF-8, or a source without any row.
    """
    if isinstance(source, (list, tuple)):
        _no_splits("<list>", "a list of rows", split)
        rows = _rows_from_list(source)
        name = "<list>"
    elif _is_hf_dataset(source):
        rows = _rows_from_dataset_object(source, split)
        name = "<dataset>"
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        rows = _rows_from_path(name, split)
    else:
        raise DataError(
            f"cannot read preference data from a {type(source).__name__}: give a file path, "
            "a save_to_disk folder, a cached dataset id or a list of dicts"
        )
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows


def _rows_from_path(name: str, split: str) -> list[Row]:
    path = Path(name).expanduser()
    if path.is_dir():
        return _rows_from_saved_folder(path, name, split)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {
            ".jsonl": _rows_from_jsonl,
            ".ndjson": _rows_from_jsonl,
            ".json": _rows_from_json,
            ".parquet": _rows_from_parquet,
            ".csv": _rows_from_csv,
        }
        if suffix not in readers:
            raise DataError(
                f"{name}: unsupported file type {suffix or '(none)'!r}: use "
                f"{', '.join(FILE_SUFFIXES)} or a folder written by save_to_disk"
            )
        _no_splits(name, f"a {suffix[1:]} file", split)
        return readers[suffix](path, name)
    if path.suffix.lower() in FILE_SUFFIXES or not _HUB_ID.match(name):
        raise DataError(f"{name}: file not found")
    return _rows_from_hub_cache(name, split)


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None


def _utf8_error(data: bytes, e: UnicodeDecodeError, name: str, first_line: int = 1) -> DataError:
    """A bad byte of `data` (whose first line is `first_line`), with its line and column."""
    line = first_line + data.count(b"\n", 0, e.start)
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return DataError(
        f"{name}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
        "re-save the file as UTF-8"
    )


def _decode(data: bytes, name: str) -> str:
    """UTF-8 text of a whole file; a bad byte is reported with its line and column."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(data, e, name) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the first row


# Line-delimited files are read in blocks of this many bytes: memory holds one block (or
# one line, if longer), not the file, and a bad line is found without reading the rest.
READ_BLOCK = 1 << 20


def _file_lines(handle: BinaryIO, name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a binary file, read a block at a time."""
    number, pending = 0, []  # pending: the start of a line that no block has ended yet
    try:
        while True:
            block = handle.read(READ_BLOCK)
            cut = block.rfind(b"\n") + 1 if block else len(block)
            if block and not cut:
                pending.append(block)  # a line longer than a block: joined once it ends
                continue
            data = b"".join([*pending, block[:cut]])
            pending = [block[cut:]]
            if data:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _utf8_error(data, e, name, number + 1) from None
                if number == 0:
                    text = text.removeprefix("\ufeff")  # a byte-order mark is not a row
                lines = text.split("\n")
                for line in lines[:-1] if block else lines:  # a block ends with a newline
                    number += 1
                    yield number, line
            if not block:
                return
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None


def _json_lines(lines: Iterable[tuple[int, str]], name: str) -> Iterator[Row]:
    for number, line in lines:
        if not line.strip():
            continue
        value = parse_json(line, f"{name}:{number}")
        if isinstance(value, list):
            # Typically a whole data set dumped as one array into a .jsonl file.
            raise DataError(
                f"{name}:{number}: expected a JSON object, got array; JSON lines hold one "
                "object per line (a file that is one JSON array of rows loads as .json)"
            )
        yield Row(_require_object(value, f"{name}:{number}"), f"{name}:{number}")


def _require_object(value: Any, origin: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{origin}: expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _rows_from_jsonl(path: Path, name: str) -> list[Row]:
    try:
        handle = open(path, "rb")  # closed by the `with` below, after the last row
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
    with handle:
        return list(_json_lines(_file_lines(handle, name), name))


def _rows_from_json(path: Path, name: str) -> list[Row]:
    """A JSON array of objects, a single (possibly pretty-printed) object, or JSON lines."""
    text = _decode(_read_bytes(path, name), name)
    head = text.lstrip()[:1]
    if head == "[":
        value = parse_json(text, name, whole_file=True)
        return [
            Row(_require_object(v, f"{name} row {i}"), f"{name} row {i}")
            for i, v in enumerate(value)
        ]
    if head == "{":  # one (pretty-printed) object, or JSON lines
        try:
            json.loads(text)
            single = True
        except json.JSONDecodeError:
            single = False  # JSON lines: read (and any error named) below
        except (ValueError, RecursionError):
            single = True  # one object too large or too deep: parse_json names the problem
        if single:
            where = f"{name}:{text.count(chr(10), 0, text.index('{')) + 1}"
            return [Row(parse_json(text, where), where)]
    return list(_json_lines(enumerate(text.split("\n"), start=1), name))


def _rows_from_csv(path: Path, name: str) -> list[Row]:
    text = _decode(_read_bytes(path, name), name)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    while header is not None and not any(cell.strip() for cell in header):
        header = next(reader, None)  # blank lines before the header
    if header is None:
        return []
    _refuse_duplicate_columns(header, f"{name}:{reader.line_num}", "the header")
    rows = []
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: report where the record starts
        try:
            cells = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{name}:{start}: malformed CSV: {e}") from None
        if cells is None:
            return rows
        if not cells:
            continue
        origin = f"{name}:{start}"
        if len(cells) != len(header):
            raise DataError(
                f"{origin}: {len(cells)} cells but the header has {len(header)} columns"
            )
        rows.append(Row(_csv_record(dict(zip(header, cells))), origin))


def _csv_record(record: dict[str, str]) -> dict[str, Any]:
    for key in _CSV_OPTIONAL:
        if record.get(key) == "":  # an empty cell means "absent", not an empty id or a zero
            del record[key]
    for key in _CSV_NUMERIC:
        if key in record:
            # Unparseable text stays a string so the format check names the field.
            with contextlib.suppress(ValueError):
                record[key] = float(record[key])
    return record


def _rows_from_parquet(path: Path, name: str) -> list[Row]:
    import pyarrow.parquet as pq  # imported on use: most sources are JSON

    try:
        columns = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{name}: cannot read Parquet: {_one_line(e)}") from None
    _refuse_duplicate_columns(columns, name, "the schema")
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{name}: cannot read Parquet: {_one_line(e)}") from None
    return [Row(r, f"{name} row {i}") for i, r in enumerate(records)]


def _refuse_duplicate_columns(columns: list[str], where: str, what: str) -> None:
    """Two columns of one name would leave each row only the last one's value."""
    seen = set()
    for column in columns:
        if column in seen:
            raise DataError(f"{where}: column {column!r:.60} appears twice in {what}; rename "
                            "or remove one")
        seen.add(column)


def _rows_from_saved_folder(path: Path, name: str, split: str) -> list[Row]:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(
            f"{name}: a folder, but not one written by Dataset.save_to_disk or "
            "DatasetDict.save_to_disk (no dataset_dict.json or state.json)"
        )
    import datasets  # imported on use: slow to import and only needed for dataset folders

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{name}: cannot load the saved dataset: {_one_line(e)}") from None
    return _rows_from_dataset_object(loaded, split, name)


def _is_hf_dataset(source: Any) -> bool:
    # Checked by class name so that plain-file sources never pay for importing `datasets`.
    return type(source).__name__ in ("Dataset", "DatasetDict") and type(
        source
    ).__module__.startswith("datasets")


def _no_splits(name: str, what: str, split: str | None) -> None:
    if split is not None:
        raise DataError(f"{name}: --split {split} given, but {what} has no splits; remove "
                        "--split (it selects a split of a DatasetDict folder or a cached dataset)")


def _rows_from_dataset_object(dataset: Any, split: str | None,
                              name: str = "<dataset>") -> list[Row]:
    if type(dataset).__name__ == "DatasetDict":
        if split is None and "train" not in dataset:
            raise DataError(f"{name}: a DatasetDict without a 'train' split; choose one of "
                            f"{', '.join(sorted(dataset))} with --split")
        split = split or "train"
        if split not in dataset:
            raise DataError(f"{name}: no split {split!r}; the splits are {sorted(dataset)}; "
                            "choose one with --split")
        dataset, name = dataset[split], f"{name}[{split}]"
    else:
        _no_splits(name, "a single Dataset (not a DatasetDict)", split)
    return [Row(r, f"{name} row {i}") for i, r in enumerate(dataset.to_list())]


def _rows_from_list(items: list | tuple) -> list[Row]:
    rows = []
    for i, item in enumerate(items):
        origin = f"<list> row {i}"
        if not isinstance(item, dict):
            raise DataError(f"{origin}: expected a dict, got {type(item).__name__}")
        rows.append(Row(item, origin))
    return rows


@contextlib.contextmanager
def _offline(datasets_module: Any) -> Iterator[None]:
    """Make `datasets` look only in its local cache: the toolkit never reaches the network."""
    config = datasets_module.config
    saved = config.HF_HUB_OFFLINE, getattr(config, "HF_DATASETS_OFFLINE", None)
    config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE = saved


def _rows_from_hub_cache(name: str, split: str | None) -> list[Row]:
    import datasets

    split = split or "train"
    try:
        with _offline(datasets):
            dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # not cached, unknown split, damaged cache: all one message
        raise DataError(
            f"{name}: not a local file or folder, and not available offline from the local "
            f"Hugging Face datasets cache ({_one_line(e)})"
        ) from None
    return [Row(r, f"{name}[{split}] row {i}") for i, r in enumerate(dataset.to_list())]


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
