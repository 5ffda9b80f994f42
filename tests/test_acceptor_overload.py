"""The acceptor under overload: the global in-flight cap (shed with 91),
per-connection backpressure under a burst, slow-loris connections, thousands
of idle connections, the open-file limit."""

from __future__ import annotations

import resource
import socket
import threading
import time

import pytest

from cardswitch.config import LinkOptions
from cardswitch.switch.acceptor import Acceptor, DEFAULT_MAX_TOTAL_INFLIGHT, raise_nofile_limit
from test_acceptor import Handler, Server, _set_gate, encode, frame, make_server, txn, wait_until


def recv_all(client, n: int) -> list[dict]:
    return [client.recv_msg() for _ in range(n)]


# -- the global cap -----------------------------------------------------------------

def test_requests_beyond_the_global_cap_are_answered_91_at_once(request):
    handler = Handler()
    srv = make_server(request, handler=handler, max_total_inflight=10)
    srv.call(_set_gate(handler))
    clients = [srv.connect() for _ in range(3)]
    for i, c in enumerate(clients):
        c.send(b"".join(frame(encode(txn(100 * i + s, **{"37": "RRN%09d" % (100 * i + s)})))
                        for s in range(8)))
    assert wait_until(lambda: srv.stats.shed == 14)
    assert handler.running == 10 and srv.acceptor.handlers_running == 10
    # The shed answers came at once, while the handlers are still held.
    shed = []
    for c in clients:
        c.sock.settimeout(0.2)
        while True:
            try:
                shed.append(c.recv_msg())
            except (socket.timeout, TimeoutError):
                break
        c.sock.settimeout(5.0)
    assert len(shed) == 14
    for resp in shed:
        assert resp["t"] == "0210" and resp["39"] == "91"
        assert resp["41"] == "TERM0001" and resp["37"] == "RRN%09d" % int(resp["11"])
        assert resp["2"] == "4761739001010119" and resp["4"] == "000000001000"
    srv.in_loop(handler.gate.set)
    served = [m for c in clients for m in _drain(c)]
    assert len(served) == 10 and all(m["39"] == "00" for m in served)
    stans = sorted(int(m["11"]) for m in shed + served)
    assert stans == sorted(100 * i + s for i in range(3) for s in range(8))
    assert handler.completed == 10
    # Below the cap again: processed normally.
    assert clients[0].roundtrip(txn(999))["39"] == "00"
    assert srv.stats.shed == 14 and srv.errors == []


def _drain(client, quiet: float = 0.3) -> list[dict]:
    out = []
    client.sock.settimeout(quiet)
    try:
        while True:
            out.append(client.recv_msg())
    except (socket.timeout, TimeoutError):
        pass
    client.sock.settimeout(5.0)
    return out


class OverloadHandler(Handler):
    def overloaded(self, msg: dict) -> dict:
        return {"t": "0210", "11": msg["11"], "41": msg["41"], "39": "91", "44": "BUSY"}


def test_the_handler_may_shape_the_shed_answer(request):
    handler = OverloadHandler()
    srv = make_server(request, handler=handler, max_total_inflight=1)
    srv.call(_set_gate(handler))
    c = srv.connect()
    c.send_msg(txn(1))
    assert wait_until(lambda: handler.running == 1)
    resp = c.roundtrip(txn(2))
    assert (resp["11"], resp["39"], resp["44"]) == ("000002", "91", "BUSY")
    srv.in_loop(handler.gate.set)
    assert c.recv_msg()["11"] == "000001"


def test_default_caps():
    assert DEFAULT_MAX_TOTAL_INFLIGHT == 10_000
    with pytest.raises(ValueError):
        Acceptor(None, LinkOptions(), Handler(), max_total_inflight=0)


def test_a_burst_far_beyond_the_per_connection_cap_keeps_work_bounded(request):
    """5,000 requests in one write: at most 256 handlers, the rest waits in the
    socket (reading paused), then everything is answered once."""
    handler = Handler()
    srv = make_server(request, handler=handler)
    srv.call(_set_gate(handler))
    c = srv.connect()
    n = 5000
    data = b"".join(frame(encode(txn(s))) for s in range(1, n + 1))
    sender = threading.Thread(target=c.send, args=(data,), daemon=True)
    sender.start()
    assert wait_until(lambda: handler.running == 256)
    peak_work = 0
    for _ in range(20):
        peak_work = max(peak_work, srv.acceptor.in_flight)
        time.sleep(0.01)
    assert handler.running == 256 and srv.stats.read_pauses >= 1
    # Frames read past the cap wait in a queue bounded by one read.
    assert peak_work < 256 + 3000
    srv.in_loop(handler.gate.set)
    stans = sorted(int(m["11"]) for m in recv_all(c, n))
    assert stans == list(range(1, n + 1))
    sender.join(5)
    assert handler.peak == 256 and srv.stats.shed == 0 and srv.errors == []


# -- slow loris --------------------------------------------------------------------

def test_slow_loris_connections_are_closed_by_the_read_timeout(request):
    srv = make_server(request, options=LinkOptions(read_timeout_ms=300))
    good = srv.connect()
    payload = frame(encode(txn(1)))
    lorises = [srv.connect() for _ in range(40)]
    header_only = [srv.connect() for _ in range(10)]
    for c in header_only:
        c.send(payload[:2])                       # a length, then nothing
    idle = srv.connect()                          # nothing at all: a terminal between requests
    closed: set[int] = set()
    deadline = time.monotonic() + 10
    i = 0
    while len(closed) < len(lorises) and time.monotonic() < deadline:
        # One byte of the frame every 50 ms on each loris: it never completes in time.
        for k, c in enumerate(lorises):
            if k in closed:
                continue
            try:
                c.send(payload[i % len(payload):i % len(payload) + 1])
            except OSError:
                closed.add(k)
        i += 1
        time.sleep(0.05)
        assert good.roundtrip(txn(1000 + i))["39"] == "00"   # served meanwhile
    assert wait_until(lambda: srv.stats.stalled == 50)
    assert all(c.closed_by_server() for c in lorises + header_only)
    # An idle connection holds no partial frame: it is kept.
    assert idle.roundtrip(txn(7))["39"] == "00"
    assert srv.errors == []


# -- thousands of idle connections -------------------------------------------------

IDLE_CONNECTIONS = 5000


def test_5000_idle_connections_and_the_others_are_still_served(request):
    # Client and server ends are both in this process: two descriptors each.
    limit = raise_nofile_limit(2 * IDLE_CONNECTIONS + 1000)
    if limit != -1 and limit < 2 * IDLE_CONNECTIONS + 200:
        pytest.skip(f"open-file hard limit {limit} is below the {2 * IDLE_CONNECTIONS + 200} this test needs")
    srv = make_server(request)
    socks: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        assert wait_until(lambda: srv.acceptor.connections == IDLE_CONNECTIONS, timeout=20)
        c = srv.connect()
        assert c.roundtrip(txn(1))["39"] == "00"
        # The first and the last idle connections are still good terminals.
        for s, stan in ((socks[0], 2), (socks[-1], 3)):
            s.sendall(frame(encode(txn(stan))))
            n = int.from_bytes(_recv_exactly(s, 2), "big")
            assert _recv_exactly(s, n)[:4] == b"0210"
        c.close()
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: srv.acceptor.connections == 0, timeout=20)
    assert srv.stats.connections_opened == IDLE_CONNECTIONS + 1
    assert srv.errors == []


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def test_raise_nofile_limit_moves_the_soft_limit_up_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"open-file hard limit {hard} too low to test raising")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert raise_nofile_limit(2048) == 2048
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (2048, hard)
        assert raise_nofile_limit(1500) == 2048              # never lowers it
        top = hard if hard != resource.RLIM_INFINITY else 4096
        assert raise_nofile_limit(10 ** 9 if hard != resource.RLIM_INFINITY else 4096) == top
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1024), hard))


def test_acceptor_start_raises_the_limit(request):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"open-file hard limit {hard} too low to test raising")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        srv = Server()
        try:
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 1024
        finally:
            srv.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1024), hard))
