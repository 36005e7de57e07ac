"""Finding the code in a response: what python_compiles compiles and command runs."""

from __future__ import annotations

import re

# A fence opens at a line start with an optional tag; an unclosed fence (a truncated
# generation) runs to the end of the response.
_FENCE = re.compile(r"^```[ \t]*([\w.+-]*)[^\n]*\n(.*?)(?:^```|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = ("python", "py", "python3")


def extract_code(response: str) -> str:
    """The first ```python block, else the first untagged ``` block, else the response."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    for wanted in (_PYTHON_TAGS, ("",)):
        for tag, code in blocks:
            if tag in wanted:
                return code
    return response

