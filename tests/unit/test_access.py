"""API keys and Host names (serving/access.py): what each scope reaches, and clear errors."""

from __future__ import annotations

import pytest

from serving.access import Access, AccessError, read_keys_file

READ, WRITE, ADMIN = "r" * 16, "w" * 16, "a" * 16


def test_each_scope_reaches_its_endpoints_and_those_of_the_scopes_below():
    access = Access({READ: "read", WRITE: "write", ADMIN: "admin"})
    host = "127.0.0.1:8000"
    assert access.check("/recommend", host, f"Bearer {READ}") == "read"
    assert access.check("/events", host, f"Bearer {READ}")[0] == 403
    assert access.check("/events", host, f"Bearer {WRITE}") == "write"
    assert access.check("/generate", host, f"Bearer {WRITE}") == "write"
    assert access.check("/admin/reload", host, f"Bearer {WRITE}")[0] == 403
    assert access.check("/openapi.json", host, f"Bearer {ADMIN}") == "admin"
    assert access.check("/anything-else", host, f"Bearer {READ}")[0] == 403
    assert access.check("/recommend", host, None)[:1] == (401,)
    assert access.check("/recommend", host, READ)[0] == 401  # the key without 'Bearer '


def test_without_keys_everything_is_open_but_the_host_is_still_checked():
    access = Access()
    assert access.open and access.check("/admin/reload", "localhost:8000", None) == "open"
    assert access.check("/recommend", "[::1]:8000", None) == "open"
    assert access.check("/recommend", "attacker.example:8000", None) == (
        400,
        "Host 'attacker.example:8000' is not one this service answers to (serve.allowed_hosts)",
        "host",
    )
    assert access.check("/recommend", None, None)[0] == 400
    assert Access(allowed_hosts=("recs.example.com",)).check("/recommend", "RECS.example.com", None) == "open"
    assert Access(allowed_hosts=("*",)).check("/recommend", "anything", None) == "open"


def test_keys_come_from_the_environment_and_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# clients\nread {READ}\n\nwrite {WRITE}\n")
    access = Access.from_sources({"TOWERREC_ADMIN_TOKEN": ADMIN, "UNRELATED": "x"}, str(keys))
    assert access.keys == {READ: "read", WRITE: "write", ADMIN: "admin"}


@pytest.mark.parametrize(
    "text, message",
    [
        (f"read {READ}\nsuper {WRITE}\n", "line 2: expected '<scope> <key>' with scope one of read, write, admin"),
        (f"read {READ} extra\n", "line 1: expected"),
        ("write short\n", "line 1: a key needs at least 16 characters"),
    ],
)
def test_a_bad_keys_file_is_named_with_its_line(tmp_path, text, message):
    keys = tmp_path / "keys"
    keys.write_text(text)
    with pytest.raises(AccessError, match=f"{keys}, {message}"):
        read_keys_file(keys)
    with pytest.raises(AccessError, match=f"{tmp_path / 'missing'}: cannot read the keys file"):
        read_keys_file(tmp_path / "missing")
