"""The real services some tests use on loopback: PostgreSQL, Redis, Mosquitto.

``require_redis()``, ``require_postgres()``, ``require_mqtt()`` return where
the service is (a ``Service``: the URL as a ``str``, with ``.url``, ``.host``,
``.port``) once it has answered a real protocol exchange, not just a TCP
connect. When it does not answer, the
calling test is skipped with a one-line reason; with the environment variable
``CI=true`` it fails instead (DEVELOPERS.md: CI must not silently skip).

Where: ``CARDSWITCH_TEST_REDIS`` (default ``redis://127.0.0.1:6379/0``),
``CARDSWITCH_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``,
trust auth) and ``CARDSWITCH_TEST_MQTT`` (default ``mqtt://127.0.0.1:1883``).
Each service is probed once per test process.

Usage::

    from services import require_redis

    def test_something():
        redis_url = require_redis().url
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from urllib.parse import urlsplit

import pytest

PROBE_TIMEOUT_S = 2.0

DEFAULTS = {
    "redis": ("CARDSWITCH_TEST_REDIS", "redis://127.0.0.1:6379/0", 6379),
    "postgres": ("CARDSWITCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres", 5432),
    "mqtt": ("CARDSWITCH_TEST_MQTT", "mqtt://127.0.0.1:1883", 1883),
}

NAMES = {"redis": "Redis", "postgres": "PostgreSQL", "mqtt": "Mosquitto (MQTT)"}


class Service(str):
    """Where a service is: the URL itself (a ``str``, so it goes wherever a URL
    or DSN does), with ``url``, ``name``, ``host`` and ``port`` attributes."""

    name: str
    host: str
    port: int

    def __new__(cls, name: str, url: str, host: str, port: int) -> "Service":
        self = super().__new__(cls, url)
        self.name, self.host, self.port = name, host, port
        return self

    @property
    def url(self) -> str:
        return str.__str__(self)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require_redis() -> Service:
    return _require("redis")


def require_postgres() -> Service:
    return _require("postgres")


def require_mqtt() -> Service:
    return _require("mqtt")


def _require(kind: str) -> Service:
    svc, problem = _probe(kind)
    if problem is None:
        return svc
    reason = f"{NAMES[kind]} not available at {svc.host}:{svc.port} ({problem})"
    if in_ci():
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(f"{reason}; set CI=true to make this a failure")
    raise AssertionError("unreachable")  # pragma: no cover


def service_of(kind: str) -> Service:
    env, default, default_port = DEFAULTS[kind]
    url = os.environ.get(env) or default
    parts = urlsplit(url)
    return Service(kind, url, parts.hostname or "127.0.0.1", parts.port or default_port)


@functools.cache
def _probe(kind: str) -> tuple[Service, str | None]:
    """(where, None) when the service answered, else (where, what went wrong)."""
    svc = service_of(kind)
    try:
        if kind == "redis":
            _probe_redis(svc)
        elif kind == "postgres":
            _probe_postgres(svc)
        else:
            _probe_mqtt(svc)
    except Exception as e:  # any failure means "not available": say which
        text = str(e).splitlines()[0][:80] if str(e) else ""
        return svc, f"{type(e).__name__}{': ' + text if text else ''}"
    return svc, None


def _exchange(svc: Service, data: bytes, want: int) -> bytes:
    with socket.create_connection((svc.host, svc.port), timeout=PROBE_TIMEOUT_S) as s:
        s.sendall(data)
        got = b""
        while len(got) < want:
            chunk = s.recv(want - len(got))
            if not chunk:
                break
            got += chunk
        return got


def _probe_redis(svc: Service) -> None:
    got = _exchange(svc, b"PING\r\n", 7)
    if not got.startswith(b"+PONG"):
        raise ConnectionError(f"PING answered {got[:20]!r}")


def _probe_postgres(svc: Service) -> None:
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(svc.url, timeout=PROBE_TIMEOUT_S)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    asyncio.run(probe())


def _probe_mqtt(svc: Service) -> None:
    # MQTT 3.1.1 CONNECT, clean session, keep-alive 5 s, client id "cardswitch-probe".
    client_id = b"cardswitch-probe"
    var = b"\x00\x04MQTT\x04\x02\x00\x05"
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = var + payload
    got = _exchange(svc, b"\x10" + bytes([len(body)]) + body, 4)
    if len(got) < 4 or got[0] != 0x20 or got[3] != 0:
        raise ConnectionError(f"CONNECT answered {got!r}")
