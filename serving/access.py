"""Who may call the service: API keys with scopes, and the Host names it answers to.

Three scopes, each including the ones before it: ``read`` (recommend, generate, healthz),
``write`` (events) and ``admin`` (items, reload, users, metrics, the API description, and any
other path). With no key configured every endpoint is open (a loopback service for local use);
once one is, every request needs ``Authorization: Bearer <key>`` of a scope high enough.

Keys come from the environment (``TOWERREC_ADMIN_TOKEN``, ``TOWERREC_WRITE_KEY``,
``TOWERREC_READ_KEY``) or a file of ``<scope> <key>`` lines (``#`` comments), never from the
config, so they are never written into a run folder.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path

SCOPES = ("read", "write", "admin")
ENV_KEYS = {"TOWERREC_READ_KEY": "read", "TOWERREC_WRITE_KEY": "write", "TOWERREC_ADMIN_TOKEN": "admin"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# the scope each endpoint needs; anything else (the API description, unknown paths) needs admin
READ_PATHS = {"/recommend", "/generate", "/healthz"}
WRITE_PATHS = {"/events"}


class AccessError(ValueError):
    """A keys file that cannot be read: names the file and line."""


def required_scope(path: str) -> str:
    if path in READ_PATHS:
        return "read"
    if path in WRITE_PATHS:
        return "write"
    return "admin"


def read_keys_file(path: str | Path) -> dict[str, str]:
    """{key: scope} of a keys file (``<scope> <key>`` per line)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise AccessError(f"{path}: cannot read the keys file ({e.strerror})") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in SCOPES:
            raise AccessError(f"{path}, line {number}: expected '<scope> <key>' with scope one of {', '.join(SCOPES)}")
        if len(parts[1]) < 16:
            raise AccessError(f"{path}, line {number}: a key needs at least 16 characters")
        keys[parts[1]] = parts[0]
    return keys


class Access:
    """The configured keys and allowed Host names; :meth:`check` decides one request."""

    def __init__(self, keys: Mapping[str, str] | None = None, allowed_hosts: tuple[str, ...] = ()):
        self.keys = dict(keys or {})
        unknown = sorted({s for s in self.keys.values() if s not in SCOPES})
        if unknown:
            raise AccessError(f"unknown scope {unknown[0]!r}: expected one of {', '.join(SCOPES)}")
        self.allowed_hosts = tuple(h.lower() for h in (*LOOPBACK_NAMES, *allowed_hosts))

    @classmethod
    def from_sources(cls, environ: Mapping[str, str], keys_file: str | None = None, allowed_hosts: tuple[str, ...] = ()) -> Access:
        keys = read_keys_file(keys_file) if keys_file else {}
        for name, scope in ENV_KEYS.items():
            if environ.get(name):
                keys[environ[name]] = scope
        return cls(keys, allowed_hosts)

    @property
    def open(self) -> bool:
        """No key configured: every endpoint answers anyone who reaches it."""
        return not self.keys

    def host_allowed(self, host_header: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        if not host_header:
            return False
        host = host_header.strip().lower()
        if host.startswith("["):  # [::1]:8000
            host = host[1 : host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        return host in self.allowed_hosts

    def scope_of(self, authorization: str | None) -> str | None:
        """The scope of the request's bearer key (every key compared in constant time), or None."""
        given = (authorization or "").encode()
        found = None
        for key, scope in self.keys.items():
            if hmac.compare_digest(given, f"Bearer {key}".encode()):
                found = scope
        return found

    def check(self, path: str, host_header: str | None, authorization: str | None) -> tuple[int, str, str] | str:
        """The caller's scope ('open' with no keys), or the refusal: (status, message, field)."""
        if not self.host_allowed(host_header):
            return 400, f"Host {host_header!r} is not one this service answers to (serve.allowed_hosts)", "host"
        if self.open:
            return "open"
        need = required_scope(path)
        scope = self.scope_of(authorization)
        if scope is None:
            return 401, f"this endpoint needs 'Authorization: Bearer <key>' of scope {need} or above", "authorization"
        if SCOPES.index(scope) < SCOPES.index(need):
            return 403, f"this key's scope is {scope}; this endpoint needs {need}", "authorization"
        return scope
