"""User-facing errors: the CLI prints their message on one line and exits with code 2.

Raise these for anything the user can fix (bad data, bad config, a missing file) with a
message that names the file, line/row or field and says what to do. Anything else is a
bug and keeps its traceback.
"""

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


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
    """A failed write inside (an OSError, or what disk_error recognises) becomes
    output_error(path, ...): a write fails on a full disk or a read-only folder through no
    fault of the program, so it gets one line, not a traceback."""
    try:
        yield
    except Exception as exc:
        error = disk_error(exc)  # safetensors' and torch's writers raise their own types
        if error is None:
            raise
        raise output_error(path, error, note, flag) from None


def disk_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` when it is a failed write, else None.

    Writers that are not Python's own file objects report a full disk or a read-only folder
    in their own exception types: safetensors as SafetensorError("... I/O error: No space
    left on device (os error 28) ..."), torch.save (a path) as RuntimeError from its zip
    writer ("PytorchStreamWriter failed writing file ...", "unexpected pos ...", "open file
    failed with strerror: ...", or its stream's "basic_ios::clear: iostream error"). Those
    become an OSError with the reason, so they get the same one line as Python's own
    writes; any other exception is a bug and keeps its traceback.
    """
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", text)
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
    elif isinstance(exc, RuntimeError) and any(
            mark in text for mark in ("PytorchStreamWriter", "inline_container", "basic_ios")):
        found = re.search(r"strerror: ([^\n]+)", text)
        return OSError(None, found.group(1).strip() if found else
                       "the write stopped part way (most likely the disk is full)")
    return None


def _disk_error_or_raise(exc: BaseException) -> OSError:
    error = disk_error(exc)
    if error is None:
        raise exc
    return error


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", note: str = "",
                flag: str = "--output") -> Iterator[IO[Any]]:
    """Yield a handle on PATH.tmp, beside `path`; on success it is synced and renamed over
    `path`, so a reader or a crash sees the old file or the new one, never half of one. On
    any failure the temp file is removed and `path` is left as it was; a failed write (full
    disk, read-only folder) becomes a one-line OutputError naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        handle = open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    except OSError as exc:
        raise output_error(path, exc, note, flag) from None
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(OSError):
            handle.close()  # a full disk fails the flush in close() too; the file goes anyway
        with suppress(OSError):
            tmp.unlink()
        if isinstance(exc, Exception):
            raise output_error(path, _disk_error_or_raise(exc), note, flag) from None
        raise
    _fsync_dir(path.parent)


def write_files(files: Mapping[Path, str | bytes], note: str = "",
                flag: str | Mapping[Path, str] = "--output-dir") -> None:
    """Write several files that belong together (a report), all or none: each goes to a
    temp file beside it first, and only when every one is whole and synced are they renamed
    into place. A failed write removes the temp files, leaves every earlier file as it was,
    and becomes a one-line OutputError naming the file. flag: the option that chooses
    where the files go, or one per file."""
    done: list[tuple[Path, Path]] = []
    current = None
    try:
        for path, content in files.items():
            current = Path(path)
            tmp = current.with_name(current.name + ".tmp")
            done.append((tmp, current))
            with open(tmp, "wb") as handle:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, current in done:
            os.replace(tmp, current)
    except BaseException as exc:
        for tmp, _ in done:
            with suppress(OSError):
                tmp.unlink()
        if isinstance(exc, Exception) and current is not None:
            option = flag if isinstance(flag, str) else flag[current]
            raise output_error(current, _disk_error_or_raise(exc), note, option) from None
        raise
    for parent in {path.parent for _, path in done}:
        _fsync_dir(parent)


def _fsync_dir(path: Path) -> None:
    """Sync a folder, so the renames in it survive a power cut; best effort (some file
    systems cannot open a folder for syncing)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
