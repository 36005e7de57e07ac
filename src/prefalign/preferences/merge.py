"""Merge preference files into one weighted, deduplicated JSONL with a stratified split.

    report = merge_preferences([("hh.jsonl", 1), ("synthetic.parquet", 0.5)], "merged.jsonl",
                               val_fraction=0.1)
    print(report.format())

Every input is read with data.load_rows and validated with data.normalize_rows (any format
prefalign loads, rows without a preference are dropped and counted). Rows are written
normalised: prompt/chosen/rejected as strings, or as lists of messages for conversational
rows, plus `source` (the row's own, else the input's file stem), `weight`, and margin/id
when the row has them. Such rows load back as the explicit or conversational format.

Per-input weights:
  mode="column"  weight = the row's own weight (1 when absent) * the input's weight; the
                 trainers average losses with it, so weight 2 counts like a repeated pair
  mode="repeat"  each row is written int(weight) times (0 drops the input) and keeps its own
                 weight; inputs with fractional weights are refused

Deduplication (dedupe=True) removes exact repeats of (prompt, chosen, rejected), also across
inputs. The copy with the largest weight (row weight * input weight; the first on ties) is
kept whole, source included, at the position of the first copy: a pair found in several
corpora is trained on once, with the strongest weight any of them gives it, never a sum.

With several annotators' label files for the same items, agreement="agreed" keeps only the
pairs every annotator who labelled them agrees on, and agreement="weight" multiplies each
pair's weight by the fraction of annotators who chose it (merge_agreement.py; every input
is one annotator unless its rows carry an `annotator` field). Either replaces deduplication:
copies of a pair from several annotators become one row, and the validation split draws
pairs, so both text orders of a pair land on the same side.

The validation split (val_fraction > 0) is drawn per stratum (the `stratify_by` column,
"source" by default; None: one stratum) from unique rows, before repetition, so no copy of
a validation pair is trained on: n * val_fraction rows (rounded half up) of each stratum of
n rows go to validation, but each stratum keeps at least one training row. The draw is
seeded per (seed, stratum): deterministic, independent between strata, and adding an input
leaves the other strata's draws alone.
Both files keep the merged order and get the same weighting, so the validation loss
measures the training objective. The validation file is OUTPUT with ".val" before the
suffix (merged.jsonl -> merged.val.jsonl) unless `val_output` is given.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.data.formats import normalize_rows
from prefalign.data.sources import load_rows
from prefalign.errors import ConfigError, DataError, write_files, writing
from prefalign.preferences.labels import tie_votes
from prefalign.preferences.merge_agreement import (
    AGREEMENT_MODES,
    AgreementCounts,
    combine,
    pair_key,
)

MODES = ("column", "repeat")
OUTPUT_SUFFIXES = (".jsonl", ".ndjson", ".json")  # all read back as JSON lines


@dataclass
class InputReport:
    """One input: rows read, dropped by normalisation, removed as duplicates, split."""

    path: str
    weight: float
    rows: int = 0
    dropped: int = 0
    duplicates: int = 0
    train: int = 0  # unique rows; repeat mode writes each int(weight) times
    val: int = 0
    disputed: int = 0  # rows of pairs dropped by --agreement


@dataclass
class MergeReport:
    """What merge_preferences wrote; `train_rows`/`val_rows` count written lines."""

    output: str
    val_output: str | None
    mode: str
    inputs: list[InputReport] = field(default_factory=list)
    train_rows: int = 0
    val_rows: int = 0
    agreement: AgreementCounts | None = None

    @property
    def duplicates(self) -> int:
        return sum(i.duplicates for i in self.inputs)

    def format(self) -> str:
        width = max([len("input")] + [len(i.path) for i in self.inputs])
        # Rows dropped for disagreement get a column only when --agreement is on.
        extra = self.agreement is not None
        lines = [f"{'input':<{width}}  {'weight':>6}  {'rows':>6}  {'dropped':>7}  "
                 f"{'dupes':>6}  " + (f"{'disputed':>8}  " if extra else "")
                 + f"{'train':>6}  {'val':>6}"]
        for i in self.inputs:
            lines.append(f"{i.path:<{width}}  {i.weight:>6g}  {i.rows:>6}  {i.dropped:>7}  "
                         f"{i.duplicates:>6}  " + (f"{i.disputed:>8}  " if extra else "")
                         + f"{i.train:>6}  {i.val:>6}")
        unit = " (lines; each row repeated by its input's weight)" if self.mode == "repeat" else ""
        lines.append(f"duplicates removed: {self.duplicates}")
        if self.agreement is not None:
            lines.append(self.agreement.format())
        lines.append(f"train: {self.train_rows} rows -> {self.output}{unit}")
        if self.val_output is not None:
            lines.append(f"val:   {self.val_rows} rows -> {self.val_output}{unit}")
        return "\n".join(lines)


@dataclass
class _Entry:
    row: dict
    input: int
    copies: int  # lines written: 1, or the input's weight in repeat mode
    rank: float  # row weight * input weight: decides which duplicate is kept
    annotator: str = ""  # who labelled the row: for agreement


def parse_input_spec(text: str) -> tuple[str, float]:
    """"path" -> (path, 1.0); "path:W" -> (path, W) when W reads as a number.

    Only a number after the last colon is a weight, so "data:v2.jsonl" is a path; a path
    that ends in ":NUMBER" itself is written with an explicit weight, "a:5:1".
    """
    path, colon, tail = text.rpartition(":")
    if colon and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def val_path(output: str | os.PathLike) -> Path:
    """merged.jsonl -> merged.val.jsonl."""
    path = Path(output)
    return path.with_name(f"{path.stem}.val{path.suffix}")


def merge_preferences(
    inputs: list[tuple[str | os.PathLike, float]],
    output: str | os.PathLike,
    mode: str = "column",
    dedupe: bool = True,
    val_fraction: float = 0.0,
    seed: int = 0,
    stratify_by: str | None = "source",
    val_output: str | os.PathLike | None = None,
    agreement: str | None = None,
    min_annotators: int = 1,
) -> MergeReport:
    """Merge `inputs` [(path, weight)] into `output` (and a validation file); see the module
    docstring. Raises ConfigError for bad arguments and DataError for bad data."""
    _check_arguments(inputs, output, mode, val_fraction)
    _check_agreement(agreement, min_annotators, mode, dedupe)
    output = Path(output)
    val_file = None if val_fraction == 0 else Path(val_output or val_path(output))
    _check_outputs(inputs, output, val_file)
    report = MergeReport(str(output), None if val_file is None else str(val_file), mode)
    entries, ties = _read_inputs(inputs, mode, agreement is not None, report)
    if agreement:
        entries, report.agreement = _by_agreement(entries, report.inputs, agreement,
                                                  min_annotators, ties)
    elif dedupe:
        entries = _dedupe(entries, report.inputs)
    entries = [entry for entry in entries if entry.copies]  # repeat mode, weight 0
    if not entries:
        raise DataError("no rows to write: every input was empty, dropped or has weight 0")
    val_ids = _split(entries, val_fraction, seed, stratify_by,
                     (lambda e: pair_key(e.row)) if agreement else None)
    train = [e for i, e in enumerate(entries) if i not in val_ids]
    val = [e for i, e in enumerate(entries) if i in val_ids]
    for part, name in ((train, "train"), (val, "val")):
        for entry in part:
            info = report.inputs[entry.input]
            setattr(info, name, getattr(info, name) + 1)
    text, report.train_rows = _lines(train)
    files, flags = {output: text}, {output: "--output"}
    if val_file is not None:
        files[val_file], report.val_rows = _lines(val)
        flags[val_file] = "--val-output"
    # Both files or neither: a train file from this merge beside a val file from an
    # earlier one would share rows.
    for path in files:
        with writing(path, flag=flags[path]):
            path.parent.mkdir(parents=True, exist_ok=True)
    write_files(files, flag=flags)
    return report


def _read_inputs(inputs: list, mode: str, agreement: bool, report: MergeReport
                 ) -> tuple[list[_Entry], list]:
    """Every input's normalised rows as entries, counted in `report`; with agreement also
    each row's annotator and the tie votes the rows' ranks imply."""
    entries, ties = [], []
    for index, (path, weight) in enumerate(inputs):
        info = InputReport(str(path), float(weight))
        report.inputs.append(info)
        rows = load_rows(path)
        examples, norm = normalize_rows(rows)
        info.rows, info.dropped = len(rows), norm.n_dropped
        stem = _default_source(path)
        who = _annotators(rows, str(path)) if agreement else {}
        if agreement:
            ties += [(v.annotator, v.prompt, v.texts) for v in tie_votes(rows, str(path))]
        for example in examples:
            entry = _entry(example, index, float(weight), mode, stem)
            entry.annotator = who.get(example["origin"], str(path))
            entries.append(entry)
    return entries, ties


def _check_arguments(inputs: list, output: Any, mode: str, val_fraction: float) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not inputs:
        raise ConfigError("no input files to merge")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if Path(output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"output {output}: the merged file is JSON lines; name it *.jsonl")
    for path, weight in inputs:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{path}: weight must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{path}: weight must be a finite number >= 0, got {weight}")
        if mode == "repeat" and weight != int(weight):
            raise ConfigError(f"{path}: weight {weight:g} is not a whole number; repeat mode "
                              "writes each row weight times (use mode 'column' for fractions)")


def _check_agreement(agreement: str | None, min_annotators: int, mode: str,
                     dedupe: bool) -> None:
    if agreement is None:
        if min_annotators != 1:
            raise ConfigError("--min-annotators needs --agreement agreed or weight")
        return
    if agreement not in AGREEMENT_MODES:
        raise ConfigError(f"agreement must be one of {', '.join(AGREEMENT_MODES)}, got "
                          f"{agreement!r}")
    if isinstance(min_annotators, bool) or not isinstance(min_annotators, int) or \
            min_annotators < 1:
        raise ConfigError(f"min_annotators must be a whole number >= 1, got {min_annotators!r}")
    if not dedupe:
        raise ConfigError("--agreement writes each pair once, combining the annotators' "
                          "copies; drop --no-dedupe")
    if agreement == "weight" and mode == "repeat":
        raise ConfigError("--agreement weight writes fractional weights, which --mode repeat "
                          "cannot; use --mode column")


def _annotators(rows: list, path: str) -> dict[str, str]:
    """origin -> the row's `annotator` field, for the rows that have one."""
    names = {}
    for data, origin in rows:
        if "annotator" in data:
            name = data["annotator"]
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"{origin}: field 'annotator' must be a non-empty name, got "
                                f"{name!r:.40}")
            names[origin] = name.strip()
    return names


def _by_agreement(entries: list[_Entry], inputs: list[InputReport], mode: str,
                  min_annotators: int, ties: list) -> tuple[list[_Entry], AgreementCounts]:
    def removed(entry: _Entry, dropped: bool) -> None:
        info = inputs[entry.input]
        if dropped:
            info.disputed += 1
        else:
            info.duplicates += 1

    return combine(entries, lambda e: e.annotator, lambda e: e.rank, mode, min_annotators,
                   removed, ties)


def _check_outputs(inputs: list, output: Path, val_file: Path | None) -> None:
    # Reading finishes before writing, but overwriting an input would still lose it.
    sources = {Path(path).resolve() for path, _ in inputs}
    for path in (output, val_file):
        if path is not None and path.resolve() in sources:
            raise ConfigError(f"{path} is also an input; write the merged file elsewhere")
    if val_file is not None and val_file.resolve() == output.resolve():
        raise ConfigError(f"the validation file {val_file} is the output file")


def _default_source(path: str | os.PathLike) -> str:
    return Path(str(path).rstrip("/")).stem or str(path)


def _entry(example: dict, index: int, weight: float, mode: str, stem: str) -> _Entry:
    own = example.get("weight", 1.0)
    row = {key: example[key] for key in ("prompt", "chosen", "rejected")}
    row["source"] = example.get("source", stem)
    row["weight"] = own * weight if mode == "column" else own
    if not math.isfinite(row["weight"]):  # 1e308 * 10: JSON has no Infinity to write
        raise DataError(f"{example['origin']}: weight {own:g} times the input's weight "
                        f"{weight:g} overflows to {row['weight']}; scale the weights down")
    for key in ("margin", "id"):
        if key in example:
            row[key] = example[key]
    copies = int(weight) if mode == "repeat" else 1
    return _Entry(row, index, copies, own * weight)


def _dedupe(entries: list[_Entry], inputs: list[InputReport]) -> list[_Entry]:
    kept: dict[str, int] = {}  # pair key -> position in `unique`
    unique: list[_Entry] = []
    for entry in entries:
        # Messages are dicts: sort their keys so the same pair always gives the same key.
        key = json.dumps([entry.row[k] for k in ("prompt", "chosen", "rejected")],
                         sort_keys=True, ensure_ascii=False)
        if key not in kept:
            kept[key] = len(unique)
            unique.append(entry)
            continue
        first = unique[kept[key]]
        loser = first if entry.rank > first.rank else entry
        inputs[loser.input].duplicates += 1
        if loser is first:
            unique[kept[key]] = entry
    return unique


def _split(entries: list[_Entry], fraction: float, seed: int, column: str | None,
           unit: Any = None) -> set[int]:
    """Indices of validation entries: the same fraction of every stratum, seeded per stratum.
    unit(entry) -> key: entries with one key go to the same side, and the fraction counts
    keys (--agreement weight: both text orders of a pair); by default each entry alone."""
    if fraction == 0:
        return set()
    strata: dict[str, dict[Any, list[int]]] = {}
    for i, entry in enumerate(entries):
        value = entry.row.get(column) if column else None
        # json.dumps keeps 1 and "1" apart, and str seeds are stable across processes.
        units = strata.setdefault(json.dumps(value), {})
        units.setdefault(i if unit is None else unit(entry), []).append(i)
    chosen: set[int] = set()
    for stratum, units in strata.items():
        keys = list(units)
        count = min(math.floor(len(keys) * fraction + 0.5), len(keys) - 1)
        rng = random.Random(f"{seed}:{stratum}")
        chosen.update(i for key in rng.sample(keys, count) for i in units[key])
    return chosen


def _lines(entries: list[_Entry]) -> tuple[str, int]:
    """The JSON lines of `entries`, each repeated `copies` times -> (text, line count)."""
    out, lines = [], 0
    for entry in entries:
        # allow_nan=False: never write Infinity or NaN, which are not JSON.
        line = json.dumps(entry.row, ensure_ascii=False, allow_nan=False) + "\n"
        if not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
                line = json.dumps(entry.row, allow_nan=False) + "\n"
        out.append(line * entry.copies)
        lines += entry.copies
    return "".join(out), lines
