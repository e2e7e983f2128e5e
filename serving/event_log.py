"""The service's durable, append-only log of what it learned live: events and new items.

One JSON object per line, each with its offset (0, 1, 2, ...) and kind (``event`` or
``item``). An append is written and fsync'ed before it returns, so everything the service
acknowledged survives a crash (kill -9 included) and is replayed on restart in the order it
happened (an event on a new item comes after that item). A last line cut short by a crash was
never acknowledged: it is dropped on open, with a warning. Also what ``jobs.update`` reads
(offsets since a bundle was made).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


class EventLogError(ValueError):
    """A damaged log: names the file and the line."""


def read_log(path: str | Path, start: int = 0) -> Iterator[dict[str, Any]]:
    """Every complete record of the log file at ``path`` with offset >= ``start``, in order."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = len(lines) - 1
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            if number - 1 == last:  # the unterminated tail of a write cut by a crash: never acknowledged
                log.warning("%s: dropping an incomplete last line (a write cut short; it was never acknowledged)", path)
                return
            raise EventLogError(f"{path}, line {number}: not valid JSON") from None
        if not isinstance(record, dict) or "offset" not in record or "kind" not in record:
            raise EventLogError(f"{path}, line {number}: a record needs 'offset' and 'kind'")
        if record["offset"] >= start:
            yield record


class EventLog:
    """Appends records durably to ``<folder>/log.jsonl``; thread-safe."""

    def __init__(self, folder: str | Path, fsync: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / LOG_FILE
        self.fsync = fsync
        self._lock = threading.Lock()
        self._records = list(read_log(self.path))
        for expected, record in enumerate(self._records):
            if record["offset"] != expected:
                raise EventLogError(f"{self.path}: offsets must run 0, 1, 2, ...; found {record['offset']} where {expected} belongs")
        self._truncate_incomplete_tail()
        self._file = open(self.path, "ab")

    def _truncate_incomplete_tail(self) -> None:
        """Cut a crash's unterminated last line, so the next record starts on a line of its own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    @property
    def next_offset(self) -> int:
        return len(self._records)

    def records(self, start: int = 0) -> list[dict[str, Any]]:
        """The records from offset ``start`` on (a copy)."""
        with self._lock:
            return list(self._records[start:])

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one record durably (fsync) and return it with its offset."""
        with self._lock:
            record = {"offset": len(self._records), "kind": kind, **fields}
            self._file.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._records.append(record)
            return record

    def close(self) -> None:
        with self._lock:
            self._file.close()
