"""Preference data: load rows, normalise formats, tokenize, collate.

    rows = load_rows("prefs.jsonl")                     # [(dict, "prefs.jsonl:1"), ...]
    examples, norm = normalize_rows(rows)               # prompt/chosen/rejected/format/origin
    features, trunc = tokenize_preferences(examples, tokenizer)
    batch = collate_preferences(features[:8], tokenizer.pad_token_id)

`load_preferences` runs the first three steps at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefalign.data.check import CheckSummary, check_file
from prefalign.data.collate import collate_preferences, collate_prompts
from prefalign.data.formats import NormalizeReport, normalize_rows
from prefalign.data.instructions import InstructionReport, collate_instructions, load_instructions
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
    split: str = "train",
) -> tuple[list[dict], DataReport]:
    """Load, normalise and tokenize `source` -> (features, DataReport).

    Raises DataError when no row is left after dropping, since there is nothing to train on.
    """
    name = "<list>" if isinstance(source, (list, tuple)) else str(source)
    examples, norm = normalize_rows(load_rows(source, split=split), strict=strict)
    norm.require_kept(name)
    features, trunc = tokenize_preferences(examples, tokenizer, max_length, max_prompt_length)
    return features, DataReport(source=name, normalize=norm, truncation=trunc)
