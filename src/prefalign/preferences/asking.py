"""Asking a judge, shared by listwise (listwise.py) and pairwise (pairwise.py) judging.

Each item's distinct candidates are shown once, its judgment record starts unjudged (or
skipped, with fewer than two), and a malformed answer is asked again, up to `retries` more
times, while a request that failed outright (NoAnswer) is not: asking again would fail too.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from prefalign.errors import PrefalignError
from prefalign.text import printable, warn

FEW_CANDIDATES = "fewer than 2 distinct candidates"


def distinct_candidates(candidates: Sequence[str]) -> list[int]:
    """Indices of the first copy of each distinct non-empty candidate, in input order."""
    first: dict[str, int] = {}
    for i, text in enumerate(candidates):
        if text.strip():
            first.setdefault(text, i)
    return sorted(first.values())


def new_record(item: dict, judge_name: str, **fields: Any) -> dict:
    """An item's judgment record: {origin, id (if any), judge, **fields}, skipped when fewer
    than two candidates are shown (`fields` hold shown, status, reason and errors)."""
    ident = {"id": item["id"]} if item["id"] is not None else {}
    record = {"origin": item["origin"], **ident, "judge": judge_name, **fields}
    if len(record["shown"]) < 2:
        record.update(status="skipped", reason=FEW_CANDIDATES, errors=[FEW_CANDIDATES])
    return record


def note_no_answer(record: dict, answer: str, consequence: str) -> None:
    """Record a failed request in the item's errors and say so in one warning line."""
    record["errors"].append(str(answer))
    warn(f"{printable(str(record['origin']), keep='')}: {consequence}: "
         f"{printable(answer, keep='')}")


def ask_until_parsed(judge: Any, asks: list[tuple[Hashable, str]], retries: int,
                     take: Callable[[Hashable, str], bool]) -> None:
    """Send every (key, prompt text) of `asks` to `judge(texts, attempt) -> answers`;
    `take(key, answer)` stores an answer and returns True when it must be asked again."""
    pending = asks
    for attempt in range(retries + 1):
        if not pending:
            return
        answers = list(judge([text for _, text in pending], attempt))
        if len(answers) != len(pending):
            raise PrefalignError(f"judge {judge.name} gave {len(answers)} answers to "
                                 f"{len(pending)} prompts")
        pending = [(key, text) for (key, text), answer in zip(pending, answers)
                   if take(key, answer)]
