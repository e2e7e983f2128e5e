"""The service's durable, append-only log of what it learned live: events and new items.

A SQLite database (``<state_dir>/state.sqlite``, stdlib ``sqlite3``, write-ahead log,
``synchronous=FULL``): one row per record, its offset (0, 1, 2, ...) the row id, its kind
(``event`` or ``item``) and its fields as JSON. An append is one transaction, committed (and
with ``fsync`` on, on disk) before it returns: a record is either in the log with its offset or
not at all, so everything the service acknowledged survives a crash (kill -9 included), a failed
write takes no offset, and the log is replayed on restart in the order it happened (an event on a
new item comes after that item). One service writes a state folder: a second is refused while the
first holds ``writer.lock``. Readers (``jobs.update``, ``read_log``) open the database read-only,
beside the writer, and read by offset without loading the rest.

A user can be forgotten (:meth:`EventLog.forget`): their events are erased in place (the rows
keep their offsets, kind ``erased``, no fields), a ``forget`` record holding only the SHA-256 of
the user id is appended for ``jobs.update`` and later training to exclude them, and the deleted
bytes are overwritten (``secure_delete``) and the write-ahead log emptied, so the id is nowhere
in the files.

A state folder from before (``log.jsonl``, one JSON object per line) is imported on the first
open, offsets kept, and the file removed once the import is committed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.sqlite"
LOCK_FILE = "writer.lock"
LEGACY_LOG = "log.jsonl"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (offset INTEGER PRIMARY KEY, kind TEXT NOT NULL, fields TEXT NOT NULL, user_id TEXT);"
    "CREATE INDEX IF NOT EXISTS records_user ON records (user_id) WHERE user_id IS NOT NULL"
)
FORGET, ERASED = "forget", "erased"


def user_hash(user_id: str) -> str:
    """How a forgotten user is named in the log: never by the id itself."""
    return hashlib.sha256(user_id.encode()).hexdigest()


class EventLogError(ValueError):
    """A damaged log: names the file and the record (line or offset)."""


class StateLockedError(RuntimeError):
    """Another process writes this state folder."""


class StateWriteError(OSError):
    """An append that did not become durable; nothing of it was recorded."""


def state_file(folder: str | Path) -> Path:
    """Where the log of the state folder ``folder`` lives."""
    return Path(folder) / STATE_FILE


def _record(path: Path, offset: int, kind: str, fields: str) -> dict[str, Any]:
    try:
        body = json.loads(fields)
    except json.JSONDecodeError:
        raise EventLogError(f"{path}, offset {offset}: its fields are not valid JSON") from None
    if not isinstance(body, dict):
        raise EventLogError(f"{path}, offset {offset}: its fields are not a JSON object")
    return {"offset": offset, "kind": kind, **body}


def _damaged(path: Path, error: sqlite3.DatabaseError) -> EventLogError:
    return EventLogError(f"{path}: {error} (check it with: sqlite3 {path} 'PRAGMA integrity_check')")


def _rows(conn: sqlite3.Connection, path: Path, start: int, kinds: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
    where = "offset >= ?"
    args: list[object] = [start]
    if kinds is not None:
        where += f" AND kind IN ({', '.join('?' * len(kinds))})"
        args += list(kinds)
    try:
        for offset, kind, fields in conn.execute(f"SELECT offset, kind, fields FROM records WHERE {where} ORDER BY offset", args):
            yield _record(path, offset, kind, fields)
    except sqlite3.DatabaseError as e:
        raise _damaged(path, e) from e


def read_log(folder: str | Path, start: int = 0, kinds: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
    """Every record (of ``kinds``, default all) of the state folder ``folder`` with offset >=
    ``start``, in order, read-only (beside a running service); nothing when the folder has no log
    yet."""
    path = state_file(folder)
    if not path.is_file():
        return
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        yield from _rows(conn, path, start, kinds)
    finally:
        conn.close()


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a former ``log.jsonl`` (a last line cut short by a crash is dropped)."""
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            if number == len(lines):  # the unterminated tail of a write cut by a crash: never acknowledged
                log.warning("%s: dropping an incomplete last line (a write cut short; it was never acknowledged)", path)
                return
            raise EventLogError(f"{path}, line {number}: not valid JSON") from None
        if not isinstance(record, dict) or "offset" not in record or "kind" not in record:
            raise EventLogError(f"{path}, line {number}: a record needs 'offset' and 'kind'")
        yield record


class EventLog:
    """Appends records durably to ``<folder>/state.sqlite``; thread-safe; one per folder."""

    def __init__(self, folder: str | Path, fsync: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = state_file(self.folder)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._writer = self._take_writer_lock()
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._conn.execute("PRAGMA secure_delete=ON")  # what a forget removes is overwritten, not left in free pages
            self._conn.executescript(SCHEMA)
            self._import_legacy()
            count, top = self._conn.execute("SELECT COUNT(*), MAX(offset) FROM records").fetchone()
        except sqlite3.DatabaseError as e:
            self._writer.close()
            raise _damaged(self.path, e) from e
        if count and top != count - 1:
            first_gap = self._conn.execute("SELECT MIN(offset) + 1 FROM records WHERE offset + 1 NOT IN (SELECT offset FROM records)").fetchone()[0]
            self.close()
            raise EventLogError(f"{self.path}: offsets must run 0, 1, 2, ...; offset {first_gap} is missing below {top}")
        self._next = count

    def _take_writer_lock(self):
        lock = open(self.folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise StateLockedError(
                f"{self.folder}: another process (pid {holder}) writes this state folder; give each service its own serve.state_dir"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        return lock

    def _import_legacy(self) -> None:
        legacy = self.folder / LEGACY_LOG
        if not legacy.is_file() or self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]:
            return
        rows = [
            (
                r["offset"],
                r["kind"],
                json.dumps({k: v for k, v in r.items() if k not in ("offset", "kind")}),
                r.get("user_id") if r["kind"] == "event" else None,
            )
            for r in _read_jsonl(legacy)
        ]
        for expected, (offset, *_) in enumerate(rows):
            if offset != expected:
                raise EventLogError(f"{legacy}: offsets must run 0, 1, 2, ...; found {offset} where {expected} belongs")
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("INSERT INTO records (offset, kind, fields, user_id) VALUES (?, ?, ?, ?)", rows)
        legacy.unlink()  # committed: a copy left behind would keep what a forget erases
        log.warning("%s: imported %d records into %s (the file was removed)", legacy, len(rows), self.path)

    @property
    def next_offset(self) -> int:
        return self._next

    def records(self, start: int = 0, kinds: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
        """The records (of ``kinds``, default all) from offset ``start`` on, read from the
        database a row at a time."""
        return read_log(self.folder, start, kinds)

    def user_events(self, user_id: str) -> list[tuple[int, str]]:
        """(offset, item_id) of every event of ``user_id``, in order (the user index)."""
        with self._lock:
            try:
                rows = self._conn.execute("SELECT offset, fields FROM records WHERE user_id = ? ORDER BY offset", (user_id,)).fetchall()
            except sqlite3.DatabaseError as e:
                raise _damaged(self.path, e) from e
        return [(offset, _record(self.path, offset, "event", fields)["item_id"]) for offset, fields in rows]

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one record durably (committed, fsync'ed with ``fsync``) and return it with its
        offset; on a failed write nothing is recorded, the offset stays free, and
        :class:`StateWriteError` says why."""
        body = json.dumps(fields, separators=(",", ":"))
        with self._lock:
            offset = self._next
            try:
                with self._conn:  # BEGIN ... COMMIT, or ROLLBACK on an error
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.execute(
                        "INSERT INTO records (offset, kind, fields, user_id) VALUES (?, ?, ?, ?)",
                        (offset, kind, body, fields.get("user_id") if kind == "event" else None),
                    )
            except sqlite3.Error as e:
                raise StateWriteError(f"{self.path}: the record was not written ({e}); nothing was recorded") from e
            self._next = offset + 1
        return {"offset": offset, "kind": kind, **fields}

    def forget(self, user_id: str) -> tuple[dict[str, Any], int]:
        """Erase every event of ``user_id`` and append a ``forget`` record (the id's hash only),
        in one transaction; then empty the write-ahead log. Returns the record and the number of
        events erased."""
        record_fields = {"user_hash": user_hash(user_id)}
        with self._lock:
            offset = self._next
            try:
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    erased = self._conn.execute("UPDATE records SET kind = ?, fields = '{}', user_id = NULL WHERE user_id = ?", (ERASED, user_id)).rowcount
                    self._conn.execute("INSERT INTO records (offset, kind, fields) VALUES (?, ?, ?)", (offset, FORGET, json.dumps(record_fields)))
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the pages as they were, with the id, leave the WAL
            except sqlite3.Error as e:
                raise StateWriteError(f"{self.path}: the user was not forgotten ({e}); nothing was changed") from e
            self._next = offset + 1
        return {"offset": offset, "kind": FORGET, **record_fields}, erased

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._writer.close()
