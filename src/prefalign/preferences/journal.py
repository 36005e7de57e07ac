"""Exactly-once JSONL outputs for commands that work item by item (generate, judge).

A Journal commits the rows of finished items to every output file, then one log line per
item; a run stopped at any moment (Ctrl-C, a crash, a full disk) continues with the same
command, without duplicating or losing rows (see Journal).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError, DataError, writing

# What a failed write (disk full) leaves: the restart cuts the files back to the last commit.
COMMITTED_KEPT = " (the rows committed so far are kept: the same command continues)"


def item_key(value: Any) -> str:
    """A short hash of an input item, to notice an input that changed between runs."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Journal:
    """JSONL output files filled item by item, made exactly-once by a commit log.

    A commit appends the rows of some items to every file and fsyncs them, then appends one
    log line per item, {"index", "key", "sizes"} (each file's size after that item), and
    fsyncs the log: the log line is the commit. On restart a torn last log line is dropped,
    each file is cut back to the sizes of the last commit (removing rows of items that were
    being written) and the committed indices are skipped. The first log line holds the
    settings; a restart with other settings is refused, so one output never mixes two.
    """

    def __init__(self, log: Path, files: dict[str, Path], kind: str, settings: dict[str, Any]):
        self.log, self.files, self.kind = Path(log), {k: Path(p) for k, p in files.items()}, kind
        self.settings = json.loads(json.dumps(settings))  # as it reads back from disk
        self.handles: dict[str, Any] = {}

    def open(self) -> dict[int, dict]:
        """Prepare the files; returns the committed records by item index."""
        with writing(self.log, COMMITTED_KEPT, "--output"):
            records = self._recover() if self.log.exists() else self._start()
            # Unbuffered: a write the full disk refused is not retried by a later flush or
            # close, which would raise again outside this `writing`.
            self.handles = {name: open(path, "ab", buffering=0)
                            for name, path in self.files.items()}
            self.handles["_log"] = open(self.log, "ab", buffering=0)
        return {r["index"]: r for r in records}

    def _start(self) -> list[dict]:
        for path in self.files.values():
            if path.exists() and path.stat().st_size > 0:
                raise DataError(f"{path}: already exists and has no {self.log.name} beside it; "
                                "choose another output or move the file away")
        for path in (*self.files.values(), self.log):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        _append(self.log, [json.dumps(self._header(), ensure_ascii=False)])
        return []

    def _header(self) -> dict[str, Any]:
        return {"format": f"prefalign-{self.kind}/1", "settings": self.settings}

    def _recover(self) -> list[dict]:
        lines = self.log.read_bytes().split(b"\n")
        good, records = 0, []  # good: bytes of the log that hold complete lines
        for number, line in enumerate(lines[:-1], start=1):  # the part after the last \n is torn
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines) - 1:  # a last line cut mid-write: not committed
                    break
                raise DataError(f"{self.log}:{number}: not a progress record") from None
            good += len(line) + 1
            if number == 1:
                self._check_header(record)
            else:
                records.append(record)
        with open(self.log, "r+b") as handle:
            handle.truncate(good)
        if good == 0:  # stopped before the header was written: start the log again
            _append(self.log, [json.dumps(self._header(), ensure_ascii=False)])
        sizes = records[-1]["sizes"] if records else {}
        for name, path in self.files.items():
            want, have = sizes.get(name, 0), path.stat().st_size if path.exists() else 0
            if have < want:
                raise DataError(f"{path}: {have} bytes, but {self.log.name} records {want}; the "
                                f"file was changed: move it and {self.log.name} away to start over")
            with open(path, "ab") as handle:
                handle.truncate(want)
        return records

    def _check_header(self, header: Any) -> None:
        if not isinstance(header, dict) or header.get("format") != f"prefalign-{self.kind}/1":
            raise DataError(f"{self.log}:1: not a prefalign {self.kind} progress file")
        old = header.get("settings", {})
        for key in sorted(set(old) | set(self.settings)):
            if old.get(key) != self.settings.get(key):
                raise ConfigError(f"{self.log}: this output was started with {key}="
                                  f"{old.get(key)!r}, now {key}={self.settings.get(key)!r}; "
                                  "use the same settings to continue, or another output")

    def commit(self, items: Iterable[tuple[int, str, dict[str, list[dict]]]]) -> None:
        """Append (index, key, {file name: rows}) for several items, then their log lines."""
        chunks: dict[str, list[bytes]] = {name: [] for name in self.files}
        sizes = {name: self.handles[name].tell() for name in self.files}
        log_lines = []
        for index, key, rows in items:
            for name in self.files:
                data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n"
                                for r in rows.get(name, []))
                chunks[name].append(data)
                sizes[name] += len(data)
            log_lines.append(json.dumps({"index": index, "key": key, "sizes": dict(sizes)}))
        for name, path in self.files.items():
            with writing(path, COMMITTED_KEPT, "--output"):
                _write_synced(self.handles[name], b"".join(chunks[name]))
        with writing(self.log, COMMITTED_KEPT, "--output"):
            _write_synced(self.handles["_log"], "".join(s + "\n" for s in log_lines).encode())

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles = {}

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_synced(handle: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:  # an unbuffered write may take part of the bytes; the next one says why
        written = handle.write(view)
        if not written:
            raise OSError(errno.EIO, "the file took no bytes")
        view = view[written:]
    os.fsync(handle.fileno())


def _append(path: Path, lines: list[str]) -> None:
    with open(path, "ab") as handle:
        _write_synced(handle, "".join(s + "\n" for s in lines).encode("utf-8"))


def check_committed(records: dict[int, dict], keys: list[str], origins: list[str],
                    log: Path) -> None:
    """DataError when a committed item is not the input's item at the same index."""
    for index, record in sorted(records.items()):
        if index >= len(keys) or record.get("key") != keys[index]:
            where = origins[index] if index < len(keys) else f"item {index}"
            raise DataError(f"{where}: not the item recorded at index {index} in {log.name} (the "
                            f"input changed); restore it, or move {log.name} and the outputs away")


def sidecar(output: str | os.PathLike, suffix: str) -> Path:
    """OUTPUT.jsonl -> OUTPUT<suffix>: `pairs.jsonl` -> `pairs.candidates.jsonl`."""
    text = str(output)
    return Path((text[: -len(".jsonl")] if text.endswith(".jsonl") else text) + suffix)
