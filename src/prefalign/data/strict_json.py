"""json.loads for data rows, refusing what would silently lose or corrupt data.

A key given twice in one object (json.loads keeps only the last value), an integer too
large for any float field, nesting too deep to parse, and a string holding a lone UTF-16
surrogate (a "\\ud83d" escape without its pair: it cannot be tokenized or written as
UTF-8) are DataErrors naming the file, line and key or field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prefalign.errors import DataError


class _DuplicateKey(Exception):
    pass


class _HugeInteger(Exception):
    pass


# A float holds at most 309 integer digits; past that a weight or margin overflows, and
# past 4,300 Python refuses to parse the int at all.
_MAX_INT_DIGITS = 309
# "\ud800"-"\udfff" escapes: halves of a UTF-16 pair, which json.loads keeps when alone.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    """object_pairs_hook: a repeated key would silently keep only its last value."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
        raise _HugeInteger(len(digits.lstrip("-")))
    return int(digits)


def parse_json(text: str, where: str, whole_file: bool = False) -> Any:
    """json.loads for data rows: a malformed, duplicate-keyed, too deeply nested or too
    large value is a DataError naming `where` ("prefs.jsonl:12"), and so is a string that
    holds a lone UTF-16 surrogate (it cannot be tokenized or written as UTF-8).
    whole_file: `text` is a whole file named `where`; a syntax error names its line."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_object, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        if whole_file:
            raise DataError(
                f"{where}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})"
            ) from None
        raise DataError(
            f"{where}: invalid JSON: {e.msg} (column {e.colno}); fix or remove the line"
        ) from None
    except _DuplicateKey as e:
        raise DataError(
            f"{where}: key {e.args[0]!r:.60} appears twice in one object (only one value can "
            "be used); remove or rename one"
        ) from None
    except _HugeInteger as e:
        raise DataError(
            f"{where}: an integer of {e.args[0]} digits is too large for any number field; "
            "fix the value (or quote it as a string)"
        ) from None
    except RecursionError:
        raise DataError(
            f"{where}: JSON nested too deeply to read (rows hold strings, numbers and lists of "
            "messages); fix or remove the line"
        ) from None
    if _SURROGATE_ESCAPE.search(text):
        _refuse_surrogates(value, where)
    return value


def _refuse_surrogates(value: Any, where: str) -> None:
    """Name the first field whose text (or key) holds a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            children = [(f"{path}.{k}" if path else str(k), v) for k, v in item.items()]
            texts = [(path or "(the row)", k) for k in item]
        elif isinstance(item, list):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(item)]
            texts = []
        else:
            children, texts = [], [(path or "(the row)", item)] if isinstance(item, str) else []
        for field, text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(
                    f"{where}: field {field!r:.80} holds a lone UTF-16 surrogate "
                    f"({text[_first_surrogate(text)].encode('unicode_escape').decode()}): half of "
                    "an escaped character pair, which cannot be tokenized or written as UTF-8; "
                    "fix the \\u escape or remove it"
                ) from None
        stack.extend(reversed(children))


def _first_surrogate(text: str) -> int:
    return next(i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff")
