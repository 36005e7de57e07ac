"""Preference data: load rows, normalise formats, tokenize, collate.

    rows = load_rows("prefs.jsonl")                     # [(dict, "prefs.jsonl:1"), ...]
    examples, norm = normalize_rows(rows)               # prompt/chosen/rejected/format/origin
    features, trunc = tokenize_preferences(examples, tokenizer)
    batch = collate_preferences(features[:8], tokenizer.pad_token_id)

`load_preferences` runs the first three steps at once.
"""

from __future__ import annotations

from typing import Any

from prefalign.data.check import CheckSummary, check_file
from prefalign.data.collate import collate_preferences, collate_prompts
from prefalign.data.formats import NormalizeReport, normalize_rows
from prefalign.data.instructions import collate_instructions, load_instructions
from prefalign.data.load import DataKind, load
from prefalign.data.report import DataReport
from prefalign.data.sources import Row, load_rows
from prefalign.data.tokenize import TruncationReport, tokenize_preferences

__all__ = [
    "CheckSummary",
    "DataReport",
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


def _normalize(rows: list, strict: bool) -> tuple[list[dict], NormalizeReport, dict]:
    examples, norm = normalize_rows(rows, strict=strict)
    return examples, norm, {}


def _tokenize(examples: list[dict], tokenizer: Any, max_length: int | None,
              max_prompt_length: int | None) -> tuple[list[dict], dict]:
    features, trunc = tokenize_preferences(examples, tokenizer, max_length, max_prompt_length)
    return features, {"truncated": {"prompts": trunc.prompt, "chosen": trunc.chosen,
                                    "rejected": trunc.rejected}}


PREFERENCE_DATA = DataKind("preference", _normalize, _tokenize, weighted=True)


def load_preferences(source: Any, tokenizer: Any, **options: Any
                     ) -> tuple[list[dict], DataReport]:
    """Preference rows -> (features, DataReport); options and errors: data.load.load."""
    return load(PREFERENCE_DATA, source, tokenizer, **options)
