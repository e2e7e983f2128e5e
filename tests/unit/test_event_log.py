"""The service's durable log on SQLite (serving/event_log.py): offsets, durability across opens,
one writer per state folder, readers beside the writer, failed writes, damage, the former JSONL."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from serving.event_log import LEGACY_LOG, EventLog, EventLogError, StateLockedError, StateWriteError, read_log, state_file, user_hash


def test_appends_take_offsets_in_order_and_survive_a_reopen(tmp_path):
    log = EventLog(tmp_path)
    assert [log.append("event", user_id=f"u{k}", item_id="i1")["offset"] for k in range(3)] == [0, 1, 2]
    log.close()
    again = EventLog(tmp_path)
    assert again.next_offset == 3
    assert [(r["offset"], r["user_id"]) for r in again.records()] == [(0, "u0"), (1, "u1"), (2, "u2")]
    assert again.append("item", item_id="new", text="t")["offset"] == 3
    again.close()


def test_a_second_writer_on_the_same_state_is_refused_naming_the_folder_and_the_holder(tmp_path):
    log = EventLog(tmp_path)
    log.append("event", user_id="u", item_id="i")
    with pytest.raises(StateLockedError, match=rf"{tmp_path}: another process \(pid \d+\) writes this state folder"):
        EventLog(tmp_path)
    other = subprocess.run(
        [sys.executable, "-c", f"from serving.event_log import EventLog; EventLog({str(tmp_path)!r})"], capture_output=True, text=True, timeout=60
    )
    assert other.returncode != 0 and "StateLockedError" in other.stderr and "serve.state_dir" in other.stderr
    log.close()
    EventLog(tmp_path).close()  # free again once the first writer closed


def test_read_log_reads_from_an_offset_beside_a_running_writer(tmp_path):
    log = EventLog(tmp_path)
    for k in range(5):
        log.append("event", user_id="u", item_id=f"i{k}")
    assert [r["item_id"] for r in read_log(tmp_path, 3)] == ["i3", "i4"]
    log.append("event", user_id="u", item_id="i5")
    assert [r["offset"] for r in read_log(tmp_path, 3)] == [3, 4, 5]
    log.close()
    assert [r["offset"] for r in read_log(tmp_path)] == [0, 1, 2, 3, 4, 5]  # and after it closed
    assert list(read_log(tmp_path / "nothing-here")) == []


def test_a_write_that_fails_records_nothing_and_frees_its_offset(tmp_path):
    log = EventLog(tmp_path)
    log.append("event", user_id="u", item_id="i0")
    # a failure inside the append's transaction, after its row was handed to SQLite
    log._conn.execute("CREATE TEMP TRIGGER fail AFTER INSERT ON records BEGIN SELECT RAISE(ABORT, 'disk I/O error (injected)'); END")
    with pytest.raises(StateWriteError, match="not written .*injected.*nothing was recorded"):
        log.append("event", user_id="u", item_id="lost")
    log._conn.execute("DROP TRIGGER fail")
    assert log.append("event", user_id="u", item_id="i1")["offset"] == 1
    log.close()
    assert [(r["offset"], r["item_id"]) for r in read_log(tmp_path)] == [(0, "i0"), (1, "i1")]
    assert EventLog(tmp_path).next_offset == 2


def _closed_log(folder, events: int):
    """A state folder whose log holds ``events`` events of one user, closed: a database to damage."""
    log = EventLog(folder)
    for k in range(events):
        log.append("event", user_id="u", item_id=f"i{k}")
    log.close()
    return sqlite3.connect(state_file(folder))


def test_a_damaged_record_in_the_middle_is_named_by_file_and_offset(tmp_path):
    with _closed_log(tmp_path, 3) as conn:
        conn.execute('UPDATE records SET fields = \'{"user_id": "u", broken\' WHERE offset = 1')
    with pytest.raises(EventLogError, match=rf"{state_file(tmp_path)}, offset 1: its fields are not valid JSON"):
        list(read_log(tmp_path))


def test_a_missing_offset_stops_the_open_naming_it(tmp_path):
    with _closed_log(tmp_path, 4) as conn:
        conn.execute("DELETE FROM records WHERE offset = 1")
    with pytest.raises(EventLogError, match="offset 1 is missing below 3"):
        EventLog(tmp_path)


def test_a_former_jsonl_log_is_imported_once_with_its_offsets(tmp_path):
    lines = [{"offset": 0, "kind": "event", "user_id": "u", "item_id": "i1"}, {"offset": 1, "kind": "item", "item_id": "n", "text": "t"}]
    (tmp_path / LEGACY_LOG).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"offset": 2, "ki')  # a torn last line
    log = EventLog(tmp_path)
    assert list(log.records()) == lines and log.next_offset == 2
    assert not (tmp_path / LEGACY_LOG).exists()  # removed once imported: no copy outlives a forget
    log.close()
    assert EventLog(tmp_path).next_offset == 2  # not imported twice


def test_a_forgotten_user_is_erased_from_the_files_and_named_only_by_a_hash(tmp_path):
    log = EventLog(tmp_path)
    for item in ("i1", "i2", "i3"):
        log.append("event", user_id="forget-me-7f3a", item_id=item)
        log.append("event", user_id="stays", item_id=item)
    log.append("item", item_id="n1", text="kept")
    record, erased = log.forget("forget-me-7f3a")
    assert erased == 3 and record == {"offset": 7, "kind": "forget", "user_hash": user_hash("forget-me-7f3a")}
    assert log.append("event", user_id="stays", item_id="i4")["offset"] == 8
    files = [f for f in tmp_path.iterdir() if f.name.startswith("state.sqlite")]  # the database and its WAL, still open
    assert files and not any(b"forget-me-7f3a" in f.read_bytes() for f in files)
    log.close()
    kinds = [(r["kind"], r.get("user_id")) for r in read_log(tmp_path)]
    assert kinds == [("erased", None), ("event", "stays")] * 3 + [("item", None), ("forget", None), ("event", "stays")]
    files = [f for f in tmp_path.iterdir() if f.name.startswith("state.sqlite")]
    assert files and not any(b"forget-me-7f3a" in f.read_bytes() for f in files)
    assert EventLog(tmp_path).next_offset == 9
