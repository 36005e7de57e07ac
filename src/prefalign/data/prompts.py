"""Prompt sets for rollouts, best-of-N generation and evaluation.

A row gives its prompt as `prompt` (text or chat messages), as `messages` (the prompt is
everything before the last assistant turn, or the whole list if it ends with a user turn),
or implicitly as any preference row data.formats understands (its prompt is used); other
column names and hub schemas are read through data.schemas (a `system` column included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefalign.data.formats import check_messages, normalize_row
from prefalign.data.schemas import read_rows
from prefalign.errors import DataError


def _from_messages(messages: Any, origin: str, key: str = "messages") -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"{origin}: field {key!r} must be a list of {{role, content}} dicts")
    # Each message needs a known role and text content: a chat template cannot place a
    # message without a role.
    messages = check_messages(messages, key, origin)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f"{origin}: field {key!r} has no turn before the last assistant turn")
    return messages


def prompt_of(row: dict[str, Any], origin: str) -> str | list[dict]:
    """The prompt of one row (text or messages), or a DataError naming the row."""
    if "prompt" in row and "chosen" not in row:
        prompt = row["prompt"]
        if isinstance(prompt, str) and prompt.strip():
            return prompt
        if isinstance(prompt, list) and prompt:
            return _from_messages(prompt, origin, "prompt")
        raise DataError(f"{origin}: field 'prompt' must be a non-empty string or chat messages")
    if "messages" in row:
        return _from_messages(row["messages"], origin)
    if "chosen" in row:
        return normalize_row(row, origin)["prompt"]
    raise DataError(f"{origin}: no prompt: give a 'prompt' or 'messages' field "
                    f"(found {', '.join(sorted(row)) or 'no fields'})")


def load_prompts(source: Any, split: str | None = None, columns: Any = None,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """[{"prompt": ..., "id": ..., "origin": ...}] with the row's id kept when present.

    columns, split, and the hub schemas recognised (reported through `log`): data.schemas.
    """
    out = []
    rows, _, _ = read_rows(source, "prompts", columns, split, log)
    for row, origin in rows:
        item = {"prompt": prompt_of(row, origin), "origin": origin}
        if "id" in row:
            item["id"] = row["id"]
        extra = {k: v for k, v in row.items() if k != "prompt"}
        if extra:  # what a TRL-style reward function gets as keywords (scorers.row_columns)
            item["extra_columns"] = extra
        out.append(item)
    return out
