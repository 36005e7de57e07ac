"""Checking a response's final answer against a reference answer (math and short text).

The response's answer is the content of its last \\boxed{...} when it has one, else its last
number (for a numeric reference) or its last non-empty line (for a text reference).
Numbers: integers, decimals, fractions (3/4, \\frac{3}{4}), a leading minus sign, commas
between groups of three digits (1,234); equal when they agree to a relative tolerance of
1e-6 (math.isclose), so 0.75 matches 3/4 and 1,000 matches 1000.0. A reference that is not
a number is compared as text: case folded, runs of whitespace made one space, surrounding
whitespace and a final period dropped. A reference written as a worked solution ending in
"#### 42" (GSM8K's form) means its part after the last "####". No answer found: wrong.
"""

from __future__ import annotations

import math
import numbers
import re
from fractions import Fraction
from typing import Any

# A number: optional minus, digits with comma thousands groups or plain, an optional
# decimal part, an optional /denominator. Leading "." decimals (.5) count too.
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+(?:\.\d+)?)?(?![\w])")
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}")
REL_TOL = 1e-6


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (braces inside balanced), or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j]
        start = text.rfind("\\boxed{", 0, start)  # unclosed: an earlier one may be whole
    return None


def parse_number(text: str) -> float | None:
    """One number written alone ("3/4", "-1,234.5", "\\frac{1}{2}", "$12"), else None."""
    s = _FRAC.sub(r"\1/\2", text.strip()).replace("$", "").replace("\\!", "").strip()
    s = s.rstrip(".").strip()
    m = _NUMBER.fullmatch(s)
    if not s or not m or not any(c.isdigit() for c in s):
        return None
    return _value(s)


def _value(s: str) -> float | None:
    num, _, den = s.replace(",", "").partition("/")
    try:
        if den:
            return float(Fraction(num) / Fraction(den)) if float(den) != 0 else None
        return float(num)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> float | None:
    """The value of the last number in text, or None when it has none."""
    text = _FRAC.sub(r"\1/\2", text)
    found = [m.group(0) for m in _NUMBER.finditer(text) if any(c.isdigit() for c in m.group(0))]
    for s in reversed(found):
        value = _value(s)
        if value is not None:
            return value
    return None


def normalize_text(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".").strip()


def reference_value(answer: Any) -> float | str | None:
    """A row's reference answer as a number, or normalised text; None when it is empty."""
    if isinstance(answer, bool) or answer is None:
        return None if answer is None else normalize_text(str(answer))
    if isinstance(answer, numbers.Real):
        return float(answer)
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    number = parse_number(text)
    if number is not None:
        return number
    return normalize_text(text) or None


def check_answer(response: str, answer: Any) -> bool:
    """True when the response's final answer equals `answer` (see the module docstring)."""
    ref = reference_value(answer)
    if ref is None:
        return False
    boxed = last_boxed(response)
    if isinstance(ref, float):
        got = None
        if boxed is not None:
            got = parse_number(boxed)
            got = last_number(boxed) if got is None else got
        else:
            got = last_number(response)
        return got is not None and math.isclose(got, ref, rel_tol=REL_TOL)
    if boxed is not None:
        return normalize_text(boxed) == ref
    lines = [line for line in response.splitlines() if line.strip()]
    return bool(lines) and normalize_text(lines[-1]) == ref
