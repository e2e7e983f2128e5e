"""What the service learned live, shared by everything that serves: the durable log (events and
new items, serving/event_log.py) and, from it, each user's recent events in memory.

One process serves from a ``LiveState`` directly; Ray Serve replicas share one through a Ray
actor (``RemoteLiveState``), so an event ingested by one replica is in the next answer of every
other, and the log has one writer.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

from serving.event_log import EventLog


class LiveState:
    """The durable log plus per-user live histories (bounded in memory; the log keeps all)."""

    def __init__(self, state_dir: str | Path, max_history: int = 500, fsync: bool = True):
        self.log = EventLog(state_dir, fsync=fsync)
        self.max_history = max_history
        self._users: dict[str, deque[tuple[int, str]]] = {}
        self._items: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        for record in self.log.records():
            self._apply(record)

    def _apply(self, record: dict[str, Any]) -> None:
        with self._lock:
            if record["kind"] == "event":
                live = self._users.get(record["user_id"])
                if live is None:
                    live = self._users[record["user_id"]] = deque(maxlen=self.max_history)
                live.append((record["offset"], record["item_id"]))
            elif record["kind"] == "item":
                self._items.append(record)

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Log a record durably, then apply it; returns it with its offset."""
        record = self.log.append(kind, **fields)
        self._apply(record)
        return record

    def live_events(self, user_id: str) -> list[tuple[int, str]]:
        """(offset, item_id) of the user's recent events, oldest first."""
        with self._lock:
            return list(self._users.get(user_id, ()))

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

    def live_events(self, user_id: str) -> list[tuple[int, str]]:
        return self._call("live_events", user_id)

    def items_since(self, offset: int) -> list[dict[str, Any]]:
        return self._call("items_since", offset)

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def close(self) -> None:
        """The actor outlives a replica; the deployment's owner stops it."""
