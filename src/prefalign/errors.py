"""User-facing errors: the CLI prints their message on one line and exits with code 2.

Raise these for anything the user can fix (bad data, bad config, a missing file) with a
message that names the file, line/row or field and says what to do. Anything else is a
bug and keeps its traceback.
"""

from collections.abc import Iterator
from contextlib import contextmanager


class PrefalignError(Exception):
    """Base of every error whose message alone tells the user what to fix."""


class DataError(PrefalignError):
    """A data file or row is malformed: the message names file, line/row and field."""


class ConfigError(PrefalignError):
    """A config key or value is invalid: the message names the key and the valid range."""


class OutputError(PrefalignError):
    """A write failed (disk full, read-only folder, no permission): the message names the
    path and the reason, and says what to do."""


def output_error(path: object, exc: OSError, note: str = "",
                 flag: str = "--output-dir") -> OutputError:
    """OutputError for `exc`, raised while writing `path`; `note` says what is kept, `flag`
    is the option that chooses where the output goes."""
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {path}: {reason}; free disk space or choose a writable "
                       f"{flag}{note}")


@contextmanager
def writing(path: object, note: str = "", flag: str = "--output-dir") -> Iterator[None]:
    """An OSError inside becomes output_error(path, ...): a write fails on a full disk or a
    read-only folder through no fault of the program, so it gets one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise output_error(path, exc, note, flag) from None
