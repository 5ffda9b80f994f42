"""The admin server on a real socket: HTTP/1.1 framing, limits, and bad clients.

The server runs in a thread's event loop on a free port; clients are
http.client and raw sockets. Fuzzing (hypothesis) sends arbitrary bytes and
checks the answer is an HTTP status line or a closed connection, and that
the server still answers afterwards.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import re
import socket
import threading
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardswitch.config import Endpoint
from cardswitch.switch.admin import AdminServer, HttpError, Limits, parse_head, render_head, Response
from cardswitch.switch.metrics import SwitchMetrics

TOKEN = "http-test-token"


class StubApp:
    links: dict = {}
    acceptor = None
    journal = None
    hsm = None


class Running:
    """An AdminServer in its own thread and loop."""

    def __init__(self, tmp_path, limits: Limits = Limits()) -> None:
        self.loop = asyncio.new_event_loop()
        self.metrics = SwitchMetrics()
        self.server = AdminServer(StubApp(), self.metrics, Endpoint("127.0.0.1", 0), token=TOKEN,
                                  data_dir=str(tmp_path), limits=limits, journal_probe_s=None,
                                  on_cutover=lambda: ("2026-03-14", "2026-03-15"))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())
        self.port = self.server.port

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def raw(self, data: bytes, *, shut: bool = True, timeout: float = 10.0) -> bytes:
        """Send ``data``, half-close, read everything the server says until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            try:
                s.sendall(data)
                if shut:
                    s.shutdown(socket.SHUT_WR)
            except OSError:         # the server closed first (refused, or answered and closed)
                pass
            out = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
            return out


@pytest.fixture
def srv(tmp_path):
    r = Running(tmp_path)
    yield r
    r.stop()


def status_of(raw: bytes) -> int:
    line = raw.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), raw[:100]
    return int(line[9:12])


# -- parse_head (pure) ---------------------------------------------------------------------------


def test_parse_a_request_head():
    req = parse_head(b"GET /api/transactions?limit=5&x= HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert (req.method, req.path, req.version) == ("GET", "/api/transactions", "HTTP/1.1")
    assert req.query == {"limit": "5", "x": ""}
    assert req.headers == {"host": "a", "x-a": "1, 2"}
    assert req.keep_alive
    assert not parse_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive
    assert parse_head(b"GET /a%20b HTTP/1.1\r\nHost: a\r\n\r\n").path == "/a b"


@pytest.mark.parametrize("head, status", [
    (b"GET /\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                    # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", 400),
    (b"GET /a%00b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /a%ff HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999\r\n\r\n", 413),
    (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 70 + b"\r\n", 431),
])
def test_bad_heads_are_refused_with_their_status(head, status):
    with pytest.raises(HttpError) as e:
        parse_head(head)
    assert e.value.status == status


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_head_never_fails_otherwise(data):
    try:
        parse_head(data + b"\r\n\r\n")
    except HttpError as e:
        assert 400 <= e.status < 600


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "BREW"]),
       path=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
       headers=st.lists(st.tuples(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1,
                                          max_size=10),
                                  st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=20)),
                        max_size=8))
def test_parse_head_structured(method, path, headers):
    head = f"{method} /{path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    try:
        req = parse_head(head.encode("latin-1"))
    except HttpError as e:
        assert 400 <= e.status < 600
    else:
        assert req.method == method and req.path.startswith("/")


def test_render_head():
    head = render_head(Response(404, b"{}", headers=[("Allow", "GET")]), keep_alive=False).decode()
    assert head.startswith("HTTP/1.1 404 Not Found\r\n") and head.endswith("\r\n\r\n")
    assert "Content-Length: 2\r\n" in head and "Connection: close\r\n" in head and "Allow: GET\r\n" in head


# -- the server ------------------------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(srv):
    c = srv.conn()
    for path in ("/healthz", "/metrics", "/api/stats", "/"):
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        assert r.status in (200, 503), path
        assert int(r.getheader("Content-Length")) == len(body)
        assert r.getheader("Connection") == "keep-alive"
    c.close()


def test_metrics_is_prometheus_text(srv):
    c = srv.conn()
    c.request("GET", "/metrics")
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
    assert b"# TYPE cardswitch_transactions_total counter" in r.read()


def test_head_has_no_body(srv):
    c = srv.conn()
    c.request("HEAD", "/api/stats")
    r = c.getresponse()
    assert r.status == 200 and int(r.getheader("Content-Length")) > 0
    assert r.read() == b""
    c.request("GET", "/api/links")                 # the connection is still in step
    assert orjson.loads(c.getresponse().read()) == {"links": []}


def test_post_with_token_and_body(srv):
    c = srv.conn()
    c.request("POST", "/api/cutover", body=b'{"why": "test"}', headers={"Authorization": f"Bearer {TOKEN}"})
    r = c.getresponse()
    assert r.status == 200
    assert orjson.loads(r.read()) == {"previous": "2026-03-14", "business_date": "2026-03-15"}
    c.request("POST", "/api/cutover", body=b"x" * 2000, headers={"Authorization": "Bearer nope",
                                                                 "Expect": "100-continue"})
    r = c.getresponse()
    assert r.status == 401
    r.read()


def test_status_codes_over_the_wire(srv):
    assert status_of(srv.raw(b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n")) == 404
    assert status_of(srv.raw(b"PUT /metrics HTTP/1.1\r\nHost: a\r\n\r\n")) == 405
    assert status_of(srv.raw(b"POST /api/cutover HTTP/1.1\r\nHost: a\r\n\r\n")) == 401
    assert status_of(srv.raw(b"garbage\r\n\r\n")) == 400
    assert status_of(srv.raw(b"GET / HTTP/3.0\r\nHost: a\r\n\r\n")) == 505
    assert status_of(srv.raw(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"y" * 9000 + b"\r\n\r\n")) == 431
    assert status_of(srv.raw(b"POST /api/cutover HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")) == 413
    assert status_of(srv.raw(b"GET /api/settlement/..%2f..%2fadmin.token HTTP/1.1\r\nHost: a\r\n\r\n")) == 404


def test_error_closes_the_connection(srv):
    out = srv.raw(b"bad request\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(out) == 400
    assert out.count(b"HTTP/1.1 ") == 1             # nothing read after the bad request


def test_pipelined_requests_answered_in_order(srv):
    out = srv.raw(b"GET /api/links HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /api/queue HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]
    assert statuses == [200, 404, 200]


def test_a_slow_client_is_dropped(tmp_path):
    r = Running(tmp_path, Limits(head_timeout_s=0.2))
    try:
        out = r.raw(b"GET / HTTP/1.1\r\nHo", shut=False)       # never finishes its head
        assert out == b"" or status_of(out) == 408
        c = r.conn()
        c.request("GET", "/api/links")
        assert c.getresponse().status == 200
    finally:
        r.stop()


def test_connections_beyond_the_limit_are_closed(tmp_path):
    r = Running(tmp_path, Limits(max_connections=2))
    try:
        held = []
        for _ in range(2):                   # two keep-alive connections, each answered once
            c = r.conn()
            c.request("GET", "/api/links")
            resp = c.getresponse()
            resp.read()
            held.append(c)
        assert r.raw(b"GET /api/links HTTP/1.1\r\nHost: a\r\n\r\n") == b""
        held[0].close()
        deadline = time.monotonic() + 10
        while True:                         # the freed slot is taken again once the close is seen
            out = r.raw(b"GET /api/links HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            if out or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert status_of(out) == 200
        held[1].close()
    finally:
        r.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=400),
    st.builds(lambda m, p, h: f"{m} {p} HTTP/1.1\r\n{h}\r\n\r\n".encode("latin-1", "replace"),
              st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "get", ""]),
              st.text(max_size=60), st.text(max_size=120)),
))
def test_fuzzed_requests_never_break_the_server(srv, caplog, data):
    caplog.set_level(logging.ERROR, logger="cardswitch.admin")
    out = srv.raw(data)
    if out:
        assert 100 <= status_of(out) < 600
    assert not [r for r in caplog.records if r.name == "cardswitch.admin" and r.levelno >= logging.ERROR]


def test_server_still_answers_after_abuse(srv):
    for data in (b"\x00" * 100, b"\r\n\r\n", b"GET / HTTP/1.1\r\n", b"\xff\xfe" * 5000):
        srv.raw(data)
    c = srv.conn()
    c.request("GET", "/api/stats")
    assert c.getresponse().status == 200
