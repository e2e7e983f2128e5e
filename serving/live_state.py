"""What the service learned live, shared by everything that serves: the durable log (events and
new items, serving/event_log.py) and, from it, the users' recent events in memory: at most
``max_users`` users, the least recently used evicted and read back from the log (by its user
index) when asked for again. A start reads only the new items and forgets, not the events.

One process serves from a ``LiveState`` directly; Ray Serve replicas share one through a Ray
actor (``RemoteLiveState``), so an event ingested by one replica is in the next answer of every
other, and the log has one writer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

from serving.event_log import FORGET, EventLog, user_hash


class DuplicateItemError(ValueError):
    """A new item whose id was logged already (by this process or another replica)."""


class LiveState:
    """The durable log plus per-user live histories (the last ``max_history`` events in memory
    as the model's input; every item a user was seen with, for the ranking to remove)."""

    def __init__(self, state_dir: str | Path, max_history: int = 500, fsync: bool = True, max_users: int = 100_000):
        self.log = EventLog(state_dir, fsync=fsync)
        self.max_history, self.max_users = max_history, max_users
        # user -> (the last max_history (offset, item_id) events, every item of their events)
        self._users: OrderedDict[str, tuple[deque[tuple[int, str]], set[str]]] = OrderedDict()
        self._items: list[dict[str, Any]] = []
        self._item_ids: set[str] = set()
        self._forgotten: dict[str, int] = {}  # user hash -> offset of the latest forget
        self._lock = threading.Lock()
        self._append_lock = threading.Lock()  # a check and its append are one step
        for record in self.log.records(kinds=("item", FORGET)):  # events are read per user, when asked for
            self._apply(record)

    def _user(self, user_id: str) -> tuple[deque[tuple[int, str]], set[str]] | None:
        """The user's live events and seen items, from memory or else the log; None for a user
        without events (never cached: strangers take no memory). Called holding ``_lock``."""
        entry = self._users.get(user_id)
        if entry is not None:
            self._users.move_to_end(user_id)
            return entry
        events = self.log.user_events(user_id)
        if not events:
            return None
        entry = (deque(events, maxlen=self.max_history), {item for _, item in events})
        self._users[user_id] = entry
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)
        return entry

    def _apply(self, record: dict[str, Any]) -> None:
        with self._lock:
            if record["kind"] == "event":
                entry = self._users.get(record["user_id"])
                if entry is None:  # read from the log, this record included
                    self._user(record["user_id"])
                else:
                    entry[0].append((record["offset"], record["item_id"]))
                    entry[1].add(record["item_id"])
            elif record["kind"] == "item":
                self._items.append(record)
                self._item_ids.add(record["item_id"])
            elif record["kind"] == FORGET:
                self._forgotten[record["user_hash"]] = record["offset"]

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Log a record durably, then apply it; returns it with its offset. An item whose id
        was logged before is refused (:class:`DuplicateItemError`), nothing written."""
        with self._append_lock:
            if kind == "item" and fields["item_id"] in self._item_ids:
                raise DuplicateItemError(f"item_id {fields['item_id']!r} is already in the catalog")
            record = self.log.append(kind, **fields)
            self._apply(record)
        return record

    def forget(self, user_id: str) -> dict[str, Any]:
        """Erase the user's events from the log and from memory; returns the forget's offset and
        how many events were erased."""
        with self._append_lock:
            record, erased = self.log.forget(user_id)
            with self._lock:
                self._users.pop(user_id, None)
            self._apply(record)
        return {"offset": record["offset"], "erased_events": erased}

    def user_view(self, user_id: str) -> dict[str, Any]:
        """What a request needs of one user, in one call (one round trip to a shared state):
        ``live``, (offset, item_id) of their recent events, oldest first; ``seen``, every item
        the log holds an event of theirs with, however long ago; ``forgotten_at``, the offset of
        their latest forget (None: never)."""
        with self._lock:
            entry = self._user(user_id)
            return {
                "live": list(entry[0]) if entry else [],
                "seen": set(entry[1]) if entry else set(),
                "forgotten_at": self._forgotten.get(user_hash(user_id)),
            }

    def items_since(self, offset: int) -> list[dict[str, Any]]:
        """Item records at or after ``offset``, in log order."""
        with self._lock:
            return [r for r in self._items if r["offset"] >= offset]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"log_offset": self.log.next_offset, "live_users": len(self._users), "log": str(self.log.path)}

    def close(self) -> None:
        self.log.close()


class RemoteLiveState:
    """The ``LiveState`` interface over a Ray actor that holds the one real ``LiveState``."""

    def __init__(self, actor):
        self.actor = actor

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(getattr(self.actor, name).remote(*args, **kwargs))

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self._call("append", kind, **fields)

    def user_view(self, user_id: str) -> dict[str, Any]:
        return self._call("user_view", user_id)

    def items_since(self, offset: int) -> list[dict[str, Any]]:
        return self._call("items_since", offset)

    def forget(self, user_id: str) -> dict[str, Any]:
        return self._call("forget", user_id)

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def close(self) -> None:
        """The actor outlives a replica; the deployment's owner stops it."""
