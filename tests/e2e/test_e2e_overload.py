"""End to end: overload and bad input against the real switch.

Thousands of idle terminals, slow-loris connections, a burst far beyond the
per-connection in-flight cap, masses of requests whose fields break their
format, unknown MTIs: each is answered as wire.md says (or closed, for
framing trouble) and a healthy terminal is served throughout.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from e2e_support import (
    BALANCE, PURCHASE, Driver, assert_response_shape, default_test_network, encode, frame, part_pids,
)

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"
B_DEBIT = "6228480000000015"
READ_TIMEOUT_MS = 1_000
IDLE_CONNECTIONS = 5_000


@pytest.fixture(scope="module")
def run(launch, workdir):
    net = default_test_network(workdir / "var")
    net = replace(net, switch=replace(net.switch, link=replace(net.switch.link, read_timeout_ms=READ_TIMEOUT_MS)))
    r = launch(net, workdir)
    yield r
    assert r.stop() == 0, "`cardswitch up` did not exit 0 on SIGTERM"


@pytest.fixture(scope="module")
def d(run):
    drv = Driver(run)
    yield drv
    drv.close()


def good(d, tid="POS00002"):
    return d.fin(tid, PURCHASE, A_DEBIT, 1)


def rss_kb(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4


def test_5000_idle_connections_and_terminals_are_still_served(run, d):
    switch_pid = part_pids(run).get("switch")
    assert switch_pid, "the switch part's process was not found"
    d.ask(good(d), "00")
    rss_before = rss_kb(switch_pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            socks.append(socket.create_connection(("127.0.0.1", run.port), timeout=10))
        # A new terminal, and idle ones waking up, are served while all of them are open.
        with run.conn() as c:
            d.ask(good(d), "00", conn=c)
        for s in (socks[0], socks[len(socks) // 2], socks[-1]):
            req = good(d)
            s.sendall(frame(encode(req)))
            n = int.from_bytes(_recv_exactly(s, 2), "big")
            payload = _recv_exactly(s, n)
            assert payload[:4] == b"0210" and req["11"].encode() in payload
        rss_during = rss_kb(switch_pid)
    finally:
        for s in socks:
            s.close()
    per_conn = (rss_during - rss_before) * 1024 / IDLE_CONNECTIONS
    assert per_conn < 64 * 1024, f"{per_conn:.0f} bytes of switch memory per idle connection"
    d.ask(good(d), "00")


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed by the switch")
        out += chunk
    return out


def test_slow_loris_connections_are_closed_and_others_served(run, d):
    raw = frame(encode(good(d)))
    lorises = [socket.create_connection(("127.0.0.1", run.port), timeout=5) for _ in range(40)]
    open_ = set(range(len(lorises)))
    deadline = time.monotonic() + 10 * READ_TIMEOUT_MS / 1000
    i = 0
    with run.conn() as c:
        while open_ and time.monotonic() < deadline:
            for k in list(open_):
                try:                      # one byte of a frame every 100 ms: never whole in time
                    lorises[k].sendall(raw[i % len(raw):i % len(raw) + 1])
                except OSError:
                    open_.discard(k)
            i += 1
            time.sleep(0.1)
            if i % 5 == 0:
                d.ask(good(d), "00", conn=c)      # a healthy terminal is served meanwhile
    still_open = [k for k, s in enumerate(lorises) if not _closed_by_switch(s)]
    for s in lorises:
        s.close()
    assert still_open == [], f"{len(still_open)} slow-loris connections still open"
    d.ask(good(d), "00")


def _closed_by_switch(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
        return True                                # EOF
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:                                # timed out: still open
        return False


def test_a_burst_beyond_the_per_connection_cap_is_answered_in_full(run, d):
    """Six concentrators pipeline 400 balance inquiries each (more than the 256
    the switch handles at once per connection): every one is answered, once."""
    per_conn, conns = 400, 6
    results: dict[int, list[dict]] = {}
    errors: list[BaseException] = []
    reqs = [[d.fin("POS00002", BALANCE, B_DEBIT, None, batch=99) for _ in range(per_conn)]
            for _ in range(conns)]

    def one(i: int) -> None:
        try:
            with run.conn(timeout=60) as c:
                c.send_many(reqs[i])
                results[i] = [c.next_response() for _ in range(per_conn)]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(conns):
        got = sorted(r["11"] for r in results[i])
        assert got == sorted(r["11"] for r in reqs[i]), f"connection {i}: answers do not match requests"
        assert all(r["39"] == "00" for r in results[i]), {r["39"] for r in results[i]}
    d.ask(good(d), "00")


NUMERIC = ("3", "4", "7", "11", "12", "13", "22", "25", "49", "60")


def test_masses_of_invalid_field_contents_get_30(run, d):
    """300 requests, each with a non-digit somewhere in a numeric field: each is
    answered 30 echoing what it could read; nothing else is disturbed."""
    rng = random.Random(4711)
    with run.conn() as c:
        reqs = []
        for _ in range(300):
            req = good(d)
            f = rng.choice(NUMERIC)
            pos = rng.randrange(len(req[f]))
            req[f] = req[f][:pos] + rng.choice("ABCXYZ:;<=>?@ -/") + req[f][pos + 1:]
            reqs.append(req)
        c.send_many(reqs)
        for req in reqs:
            resp = c.wait_for(req["41"], req["11"])
            assert resp["39"] == "30", (req, resp)
            assert_response_shape(req, resp, "30")
        d.ask(good(d), "00", conn=c)


def test_unknown_mtis(run, d):
    """A request of a class the switch does not serve gets 12; a response or an
    advice response from a terminal gets nothing; the connection stays."""
    with run.conn() as c:
        for mti in ("0300", "0600", "0900", "0120"):
            req = dict(good(d), t=mti)
            resp = c.request(req)
            assert resp["t"] == mti[:2] + str(int(mti[2]) + 1) + "0" and resp["39"] == "12", resp
        for mti in ("0210", "0430", "0810"):
            c.send(dict(good(d), t=mti))
        nxt = good(d)
        c.send(nxt)
        first = c.next_response()                   # nothing was answered before it
        assert (first["41"], first["11"], first["39"]) == (nxt["41"], nxt["11"], "00"), first
