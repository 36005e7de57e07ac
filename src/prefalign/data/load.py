"""One loading path for every kind of training data: read the rows (column mapping, split,
hub schema), normalise them, refuse a file that lost too many, tokenize, report.

The kinds differ only in how rows are normalised and tokenized, and in what their report
adds; each module names that as a DataKind (data.PREFERENCE_DATA, instructions.SFT_DATA,
unpaired.UNPAIRED_DATA) and its load_* function is load(kind, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefalign.data.formats import NormalizeReport
from prefalign.data.report import DataReport
from prefalign.data.schemas import read_rows, source_name

# rows, strict -> (examples, normalisation report, further DataReport fields)
Normalize = Callable[[list[dict], bool], tuple[list[dict], NormalizeReport, dict[str, Any]]]
# examples, tokenizer, max_length, max_prompt_length -> (features, further DataReport fields)
Tokenize = Callable[[list[dict], Any, "int | None", "int | None"],
                    tuple[list[dict], dict[str, Any]]]


@dataclass(frozen=True)
class DataKind:
    rows: str  # read_rows' kind: which hub schemas and columns apply
    normalize: Normalize
    tokenize: Tokenize
    weighted: bool  # rows may carry a `weight` column, checked to be usable


def load(
    kind: DataKind,
    source: Any,
    tokenizer: Any,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    strict: bool = False,
    split: str | None = None,
    columns: Any = None,
    max_drop_fraction: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], DataReport]:
    """Load, normalise and tokenize `source` -> (features, report).

    columns, split, and the hub schemas recognised (reported through `log`): data.schemas.
    Raises DataError when no row is left after dropping, since there is nothing to train on,
    or when more than max_drop_fraction of the rows were dropped (None: no limit).
    """
    name = source_name(source)
    rows, _, _ = read_rows(source, kind.rows, columns, split, log)
    examples, norm, fields = kind.normalize(rows, strict)
    norm.require_kept(name)
    norm.require_not_mass_dropped(name, max_drop_fraction)
    if kind.weighted:
        norm.require_weighted(name, examples)
    features, more = kind.tokenize(examples, tokenizer, max_length, max_prompt_length)
    return features, DataReport(source=name, normalize=norm, **fields, **more)
