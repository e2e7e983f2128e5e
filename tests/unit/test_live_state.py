"""The service's live state over its log (serving/live_state.py): users bounded in memory and
read back from the log, a start that reads no events."""

from __future__ import annotations

from serving.live_state import LiveState


def test_users_beyond_max_users_are_evicted_and_read_back_from_the_log(tmp_path):
    state = LiveState(tmp_path, max_history=3, max_users=2)
    try:
        for n, user in enumerate(["a", "b", "c", "a", "d"]):
            state.append("event", user_id=user, item_id=f"i{n}")
        assert state.stats()["live_users"] == 2  # the two used last: a and d
        assert state.user_view("b")["live"] == [(1, "i1")]  # evicted, read back from the log
        assert state.stats()["live_users"] == 2
        for n in range(5, 9):
            state.append("event", user_id="a", item_id=f"i{n}")
        assert state.user_view("a")["live"] == [(6, "i6"), (7, "i7"), (8, "i8")]  # the last max_history
        assert state.user_view("a")["seen"] == {"i0", "i3", "i5", "i6", "i7", "i8"}  # all of them
        assert state.user_view("stranger") == {"live": [], "seen": set(), "forgotten_at": None}
        assert "stranger" not in state._users  # an unknown user takes no memory
    finally:
        state.close()


def test_a_start_reads_items_and_forgets_but_no_event(tmp_path):
    state = LiveState(tmp_path)
    state.append("event", user_id="a", item_id="i1")
    state.append("item", item_id="new", text="t")
    state.append("event", user_id="b", item_id="new")
    state.forget("b")
    state.close()
    again = LiveState(tmp_path)
    try:
        assert again.stats()["live_users"] == 0 and [r["item_id"] for r in again.items_since(0)] == ["new"]
        assert again.user_view("b") == {"live": [], "seen": set(), "forgotten_at": 3}
        assert again.user_view("a")["live"] == [(0, "i1")] and again.stats()["live_users"] == 1
    finally:
        again.close()
