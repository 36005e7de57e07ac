"""Preference data: load rows, normalise formats, tokenize, collate.

    rows = load_rows("prefs.jsonl")                     # [(dict, "prefs.jsonl:1"), ...]
    examples, norm = normalize_rows(rows)               # prompt/chosen/rejected/format/origin
    features, trunc = tokenize_preferences(examples, tokenizer)
    batch = collate_preferences(features[:8], tokenizer.pad_token_id)

`load_preferences` runs the first three steps at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefalign.data.check import CheckSummary, check_file
from prefalign.data.collate import collate_preferences, collate_prompts
from prefalign.data.formats import NormalizeReport, normalize_rows
from prefalign.data.instructions import InstructionReport, collate_instructions, load_instructions
from prefalign.data.schemas import read_rows, source_name
from prefalign.data.sources import Row, load_rows
from prefalign.data.tokenize import TruncationReport, tokenize_preferences

__all__ = [
    "CheckSummary",
    "DataReport",
    "InstructionReport",
    "NormalizeReport",
    "Row",
    "TruncationReport",
    "check_file",
    "collate_preferences",
    "collate_instructions",
    "collate_prompts",
    "load_instructions",
    "load_preferences",
    "load_rows",
    "normalize_rows",
    "tokenize_preferences",
]


@dataclass
class DataReport:
    """What load_preferences did: rows read, normalisation counts, truncation counts."""

    source: str
    normalize: NormalizeReport
    truncation: TruncationReport

    @property
    def rows(self) -> int:
        return self.normalize.rows


def load_preferences(
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
    """Load, normalise and tokenize `source` -> (features, DataReport).

    columns, split, and the hub schemas recognised (reported through `log`): data.schemas.
    Raises DataError when no row is left after dropping, since there is nothing to train on,
    or when more than max_drop_fraction of the rows were dropped (None: no limit).
    """
    name = source_name(source)
    rows, _, _ = read_rows(source, "preference", columns, split, log)
    examples, norm = normalize_rows(rows, strict=strict)
    norm.require_kept(name)
    norm.require_not_mass_dropped(name, max_drop_fraction)
    norm.require_weighted(name, examples)
    features, trunc = tokenize_preferences(examples, tokenizer, max_length, max_prompt_length)
    return features, DataReport(source=name, normalize=norm, truncation=trunc)
