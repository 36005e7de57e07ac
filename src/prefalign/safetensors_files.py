"""What a .safetensors file holds, from its header alone (no tensor is read).

The format: 8 bytes of little-endian header length, a JSON header
{tensor name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
tensors' bytes; the largest end offset says how long the whole file must be. Reading the
header first lets a cut file or a missing tensor be named before safetensors or
transformers meet it (their own errors name no file, or fill the gap with random weights).
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound


def read_header(file: Path) -> tuple[dict, int]:
    """({tensor name: entry}, header length) of `file`; raises OSError or ValueError."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= MAX_HEADER_BYTES:
            raise ValueError(f"implausible header length {length}")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, length


def file_problem(file: Path) -> str | None:
    """Why `file` cannot be read whole (None when it can): missing, an unreadable header,
    or fewer (or more) bytes than its header describes."""
    if not file.is_file():
        return f"{file.name} is missing"
    size = file.stat().st_size
    try:
        header, length = read_header(file)
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    except (OSError, ValueError, AttributeError, KeyError, TypeError, IndexError):
        return f"{file.name} has a cut or unreadable header"
    if size != 8 + length + end:
        return f"{file.name} is cut short ({size} of {8 + length + end} bytes)"
    return None
