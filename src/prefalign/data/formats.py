"""Normalise raw preference rows of any supported format into one example shape.

Every example is a dict with
  prompt, chosen, rejected   strings (text formats) or lists of {"role", "content"} messages
                             (conversational; the chat template is applied by data.tokenize)
  format                     "explicit" | "implicit" | "conversational" | "hh"
  origin                     where the row came from, e.g. "prefs.jsonl:12"
and, when the row has them, the kept columns margin (float), weight (float >= 0),
source (str | int) and id (str | int).

Formats are detected per row, so one file may mix them:
  explicit        prompt, chosen, rejected are strings
  implicit        chosen and rejected strings share a prefix and there is no prompt; the prompt
                  is their longest common prefix cut back so no completion starts mid-word
  hh              Anthropic HH-RLHF transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."; the prompt is
                  everything through the last "\\n\\nAssistant:", the completion keeps its space
  conversational  chosen/rejected are whole conversations (the prompt is all but the last
                  assistant turn), or a prompt (messages or string) plus assistant replies
                  (messages or strings)

Malformed rows raise DataError naming origin and field. Rows that are well formed but carry
no preference signal (an empty completion, chosen == rejected, transcripts whose prompts
differ, no shared prompt) are dropped and counted by reason, or raise under strict=True.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefalign.data.sources import Row
from prefalign.errors import DataError

FORMATS = ("explicit", "implicit", "conversational", "hh")
KEPT_COLUMNS = ("margin", "source", "weight", "id")
ROLES = ("system", "user", "assistant", "tool")
HH_HUMAN = "Human:"
HH_ASSISTANT = "\n\nAssistant:"

DROP_EMPTY = "empty completion"
DROP_SAME = "chosen equals rejected"
DROP_PROMPTS_DIFFER = "chosen and rejected prompts differ"
DROP_NO_PROMPT = "no shared prompt"
ORIGINS_PER_REASON = 5


class DroppedRow(Exception):
    """A well-formed row without a usable preference; `reason` is one of the DROP_* names."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class NormalizeReport:
    """What normalisation did: rows in, examples kept per format, rows dropped per reason."""

    rows: int = 0
    formats: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    dropped_origins: dict[str, list[str]] = field(default_factory=dict)
    first_dropped: str | None = None  # the origin of the first row dropped, for error lines

    @property
    def kept(self) -> int:
        return sum(self.formats.values())

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def require_kept(self, name: str) -> None:
        """Raise DataError when every row was dropped: there is nothing to train on."""
        if not self.kept:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.dropped.most_common())
            raise DataError(f"{name}: all {self.rows} rows were dropped ({reasons})")

    def require_weighted(self, name: str, examples: list[dict]) -> None:
        """Raise DataError when the kept rows' weights (absent: 1) sum to 0: the weighted
        loss would be 0/0 or nothing, a run that trains on nothing and exits 0."""
        if examples and sum(e.get("weight", 1.0) for e in examples) == 0:
            raise DataError(f"{name}: every kept row has weight 0 (column 'weight'), so "
                            "nothing would be trained on; give rows a weight > 0 or drop the "
                            "column")

    def too_many_dropped(self, max_fraction: float | None) -> bool:
        """True when more than max_fraction of the rows were dropped (None: no limit)."""
        return max_fraction is not None and self.n_dropped > max_fraction * self.rows

    def drop_error(self, name: str, max_fraction: float) -> str:
        """The one line that stops a run whose rows were mostly dropped: counts, where, fix."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in self.dropped.most_common())
        return (f"{name}: {self.n_dropped} of {self.rows} rows dropped ({reasons}), more than "
                f"max_drop_fraction {max_fraction:g}; first: {self.first_dropped}; if the data "
                "has other column names, map them (--columns prompt=question,system=system), "
                "or raise --max-drop-fraction")

    def require_not_mass_dropped(self, name: str, max_fraction: float | None) -> None:
        """Raise DataError when more than max_fraction of the rows were dropped."""
        if self.too_many_dropped(max_fraction):
            raise DataError(self.drop_error(name, max_fraction))

    def record_drop(self, reason: str, origin: str) -> None:
        if self.first_dropped is None:
            self.first_dropped = origin
        self.dropped[reason] += 1
        origins = self.dropped_origins.setdefault(reason, [])
        if len(origins) < ORIGINS_PER_REASON:
            origins.append(origin)


def normalize_rows(rows: list[Row], strict: bool = False) -> tuple[list[dict], NormalizeReport]:
    """Normalise rows to examples; len(examples) + report.n_dropped == len(rows) always.

    strict=True turns every drop into a DataError naming the row and the reason.
    """
    return normalize_each(rows, normalize_row, strict)


def normalize_each(rows: list[Row], normalize_one: Callable[[Any, str], dict],
                   strict: bool = False) -> tuple[list[dict], NormalizeReport]:
    """normalize_one(data, origin) -> example, or DroppedRow, on every row; a dropped row is
    counted in the report (strict: a DataError naming the row and the reason)."""
    report = NormalizeReport(rows=len(rows))
    examples = []
    for data, origin in rows:
        try:
            example = normalize_one(data, origin)
        except DroppedRow as drop:
            if strict:
                detail = f" ({drop.detail})" if drop.detail else ""
                raise DataError(
                    f"{origin}: {drop.reason}{detail}; strict mode drops nothing"
                ) from None
            report.record_drop(drop.reason, origin)
            continue
        report.formats[example["format"]] += 1
        examples.append(example)
    return examples, report


def normalize_row(data: Any, origin: str) -> dict:
    """One raw row -> one example (see the module docstring); raises DataError or DroppedRow."""
    if not isinstance(data, dict):
        raise DataError(
            f"{origin}: expected an object with prompt/chosen/rejected, got {type(data).__name__}"
        )
    for key in ("chosen", "rejected"):
        if data.get(key) is None:
            raise DataError(f"{origin}: missing field {key!r} (the row has {row_keys(data)})")
        check_text_or_messages(data[key], key, origin)
    prompt = data.get("prompt")
    if prompt is not None:
        check_text_or_messages(prompt, "prompt", origin)
    chosen, rejected = data["chosen"], data["rejected"]
    # Checked on the raw values too: splitting two equal or empty texts would otherwise
    # report "no shared prompt", hiding the real reason.
    _check_signal({"chosen": chosen, "rejected": rejected}, raw=True)

    if isinstance(chosen, str) and isinstance(rejected, str) and not isinstance(prompt, list):
        if prompt is not None:
            fmt, parts = "explicit", (prompt, chosen, rejected)
        elif _looks_hh(chosen) and _looks_hh(rejected):
            fmt, parts = "hh", _split_hh(chosen, rejected)
        else:
            fmt, parts = "implicit", _split_implicit(chosen, rejected)
    else:
        fmt, parts = "conversational", split_conversation(prompt, chosen, rejected, origin)
    example = dict(zip(("prompt", "chosen", "rejected"), parts))
    _check_signal(example)
    example.update(format=fmt, origin=origin)
    example.update(kept_columns(data, origin))
    return example


def row_keys(data: dict, most: int = 8) -> str:
    """The row's field names for an error line, kept short: a wide Parquet file has hundreds."""
    names = [f"{k!r:.40}" for k in list(data)[:most]]
    more = f" and {len(data) - most} more" if len(data) > most else ""
    return (", ".join(names) + more) or "no fields"


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_text_or_messages(value: Any, key: str, origin: str) -> None:
    if not isinstance(value, (str, list)):
        raise DataError(
            f"{origin}: field {key!r} must be a string or a list of messages, got {type_name(value)}"
        )


def check_messages(messages: list, key: str, origin: str) -> list[dict]:
    """Validate {"role", "content"} dicts; returns copies without null keys (arrow fills those)."""
    if not messages:
        raise DataError(f"{origin}: field {key!r} is an empty list of messages")
    clean = []
    for i, message in enumerate(messages):
        where = f"{origin}: field {key!r} message {i}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"{where} must be an object with 'role' and 'content', got {message!r:.80}"
            )
        if message["role"] not in ROLES:
            raise DataError(
                f"{where} has role {message['role']!r:.40}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: 'content' must be a string, got {type_name(message['content'])}"
            )
        clean.append({k: v for k, v in message.items() if v is not None})
    return clean


def split_conversation(prompt: Any, chosen: Any, rejected: Any, origin: str) -> tuple:
    """(prompt messages, chosen messages, rejected messages) from either conversational shape."""
    if isinstance(chosen, list):
        chosen = check_messages(chosen, "chosen", origin)
    if isinstance(rejected, list):
        rejected = check_messages(rejected, "rejected", origin)
    whole = [
        isinstance(c, list) and any(m["role"] != "assistant" for m in c) for c in (chosen, rejected)
    ]
    if any(whole):
        # Whole conversations carry their own prompt; a prompt column beside them (as in
        # UltraFeedback-binarized) repeats the first user turn and is not used, as in TRL's
        # maybe_extract_prompt.
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(value, str):
                raise DataError(
                    f"{origin}: field {key!r} is a string but the other completion is a whole "
                    "conversation; give both as lists of messages"
                )
        prompt_c, reply_c = last_assistant_turn(chosen, "chosen", origin)
        prompt_r, reply_r = last_assistant_turn(rejected, "rejected", origin)
        if prompt_c != prompt_r:
            raise DroppedRow(DROP_PROMPTS_DIFFER, "the turns before the last assistant turn differ")
        return prompt_c, reply_c, reply_r
    if prompt is None:
        raise DataError(
            f"{origin}: field 'chosen' holds only assistant turns and the row has no 'prompt'; "
            "add a prompt or give whole conversations"
        )
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = check_messages(prompt, "prompt", origin)
        if prompt[-1]["role"] == "assistant":
            raise DataError(
                f"{origin}: field 'prompt' ends with an assistant turn; it must end with the "
                "user (or system/tool) turn the completions answer"
            )
    replies = [
        [{"role": "assistant", "content": c}] if isinstance(c, str) else c
        for c in (chosen, rejected)
    ]
    return prompt, replies[0], replies[1]


def last_assistant_turn(messages: list[dict], key: str, origin: str) -> tuple[list, list]:
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{origin}: field {key!r} must end with an assistant turn, but its last message has "
            f"role {messages[-1]['role']!r}"
        )
    if len(messages) < 2:
        raise DataError(f"{origin}: field {key!r} has no turn before its assistant turn")
    return messages[:-1], messages[-1:]


def _looks_hh(text: str) -> bool:
    return text.lstrip().startswith(HH_HUMAN) and HH_ASSISTANT in text


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    def split(text: str) -> tuple[str, str]:
        cut = text.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)
        return text[:cut], text[cut:]

    (prompt_c, reply_c), (prompt_r, reply_r) = split(chosen), split(rejected)
    if prompt_c != prompt_r:
        raise DroppedRow(
            DROP_PROMPTS_DIFFER, "the transcripts differ before the last '\\n\\nAssistant:'"
        )
    return prompt_c, reply_c, reply_r


def implicit_prompt_length(chosen: str, rejected: str) -> int:
    """Length of the implicit prompt shared by two texts (0 when there is none).

    Start from the longest common prefix, leaving each completion at least one character.
    If it holds "\\n\\nAssistant:", cut right after the last one (the turn boundary). Else cut
    back to a word boundary so neither completion starts mid-word, then hand trailing
    spaces to the completions: " 4" tokenizes like generated text, "4" after "is " does not
    (TRL's extract_prompt moves the space the same way).
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    n = min(n, len(chosen) - 1, len(rejected) - 1)
    if n <= 0:
        return 0
    turn = chosen.rfind(HH_ASSISTANT, 0, n)
    if turn >= 0 and turn + len(HH_ASSISTANT) <= n:
        return turn + len(HH_ASSISTANT)
    while n > 0 and (_mid_word(chosen, n) or _mid_word(rejected, n)):
        n -= 1
    while n > 0 and chosen[n - 1] in " \t":
        n -= 1
    return n


def _mid_word(text: str, i: int) -> bool:
    return text[i - 1].isalnum() and text[i].isalnum()


def _split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    n = implicit_prompt_length(chosen, rejected)
    if n == 0:
        raise DroppedRow(
            DROP_NO_PROMPT, "chosen and rejected share no prefix that ends on a word boundary"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def is_empty(completion: str | list[dict]) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    return all(not m["content"].strip() for m in completion)


def _check_signal(example: dict, raw: bool = False) -> None:
    if raw and not all(isinstance(example[key], str) for key in ("chosen", "rejected")):
        return  # messages are validated first, then checked once split
    for key in ("chosen", "rejected"):
        if is_empty(example[key]):
            raise DroppedRow(DROP_EMPTY, f"{key} is empty")
    if example["chosen"] == example["rejected"]:
        raise DroppedRow(DROP_SAME)


def kept_columns(data: dict, origin: str) -> dict:
    """margin/weight as floats, source/id as str or int; a null value means absent."""
    kept = {}
    for key in KEPT_COLUMNS:
        value = data.get(key)
        if value is None:
            continue
        if key in ("margin", "weight"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(
                    f"{origin}: field {key!r} must be a number, got {type_name(value)}"
                )
            value = float(value)
            if not math.isfinite(value):
                raise DataError(f"{origin}: field {key!r} must be finite, got {value}")
            if key == "weight" and value < 0:
                raise DataError(f"{origin}: field 'weight' must be >= 0, got {value:g}")
        elif isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(
                f"{origin}: field {key!r} must be a string or an integer, got {type_name(value)}"
            )
        kept[key] = value
    return kept
