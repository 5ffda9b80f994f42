"""End to end: bad input and odd terminals, each leaving everything else running.

Format errors (wire.md 4) are answered 30 on a connection that stays open;
framing trouble (wire.md 2) closes only the connection it happened on. Every
test checks that a second, healthy connection is still answered.

"No answer" is checked without waiting for a timeout: the switch reads a
connection's frames in order and answers an unreadable or keep-alive frame
(if at all) before it reads the next one, so when the answer to a request
sent after it is the first thing to come back, nothing was answered.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import replace

import pytest

from e2e_support import (
    PURCHASE, Driver, assert_response_shape, default_test_network, encode, frame, network_mgmt,
)

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"
B_DEBIT = "6228480000000015"
C_DEBIT = "6217000000000014"


READ_TIMEOUT_MS = 1_000


@pytest.fixture(scope="module")
def run(launch, workdir):
    net = default_test_network(workdir / "var")
    # A frame begun must be whole within 1 s (default 10 s), so the stall test is quick.
    net = replace(net, switch=replace(net.switch, link=replace(net.switch.link, read_timeout_ms=READ_TIMEOUT_MS)))
    r = launch(net, workdir)
    yield r
    assert r.stop() == 0, "`cardswitch up` did not exit 0 on SIGTERM"


@pytest.fixture(scope="module")
def d(run):
    drv = Driver(run)
    yield drv
    drv.close()


@pytest.fixture
def healthy(run, d):
    """A second connection, opened before the trouble; checked to still be served after it."""
    c = run.conn()
    d.ask(d.fin("POS00012", PURCHASE, B_DEBIT, 100), "00", conn=c)
    yield c
    d.ask(d.fin("POS00012", PURCHASE, B_DEBIT, 100), "00", conn=c)
    c.close()


def good(d, tid="POS00002"):
    return d.fin(tid, PURCHASE, A_DEBIT, 100)


def set_bitmap_bit(payload: bytes, bit: int) -> bytes:
    """Set a bit (2..64) of the hex primary bitmap that follows the 4-digit MTI."""
    bitmap = int(payload[4:20], 16) | (1 << (64 - bit))
    return payload[:4] + f"{bitmap:016X}".encode() + payload[20:]


# -- format errors (wire.md 4): 30, connection stays open -------------------------------


def test_bad_bitmap_with_readable_mti_and_stan_gets_30(run, d, healthy):
    with run.conn() as c:
        req = good(d)
        # The bitmap claims field 64, which the message does not hold.
        c.send_bytes(frame(set_bitmap_bit(encode(req), 64)))
        resp = c.wait_for(req["41"], req["11"])
        assert resp["t"] == "0210" and resp["39"] == "30", resp
        assert resp["11"] == req["11"]
        d.ask(good(d), "00", conn=c)


def test_truncated_field_after_the_stan_gets_30(run, d, healthy):
    with run.conn() as c:
        req = good(d)
        raw = encode(req)
        cut = raw.index(req["41"].encode()) + 3       # inside field 41
        c.send_bytes(frame(raw[:cut]))
        resp = c.wait_for("", req["11"])
        assert resp["t"] == "0210" and resp["39"] == "30", resp
        assert resp["11"] == req["11"]
        d.ask(good(d), "00", conn=c)


def test_unreadable_bitmap_gets_no_answer_and_the_connection_stays(run, d, healthy):
    with run.conn() as c:
        req = good(d)
        raw = encode(req)
        c.send_bytes(frame(raw[:4] + b"ZZZZZZZZZZZZZZZZ" + raw[20:]))
        nxt = good(d)
        c.send(nxt)
        first = c.next_response()
        assert (first["41"], first["11"]) == (nxt["41"], nxt["11"]), first
        assert first["39"] == "00"


def test_non_digits_in_the_amount_get_30(run, d, healthy):
    with run.conn() as c:
        req = dict(good(d), **{"4": "00000000010A"})
        resp = c.request(req)
        assert_response_shape(req, resp, "30")          # every field it could read is echoed
        d.ask(good(d), "00", conn=c)


def test_impossible_transmission_date_gets_30(run, d, healthy):
    with run.conn() as c:
        req = dict(good(d), **{"7": "1332250000"})
        resp = c.request(req)
        assert_response_shape(req, resp, "30")
        d.ask(good(d), "00", conn=c)


def test_missing_mandatory_field_gets_30(run, d, healthy):
    with run.conn() as c:
        for missing in ("49", "60", "4"):
            req = d.fin("POS00002", PURCHASE, A_DEBIT, 100, drop=(missing,))
            resp = c.request(req)
            assert_response_shape(req, resp, "30")
        d.ask(good(d), "00", conn=c)


def test_nothing_of_a_format_error_reaches_the_issuer(run, d):
    before = d.balance(A_DEBIT)
    resp = d.conn.request(dict(good(d), **{"7": "0230120000"}))    # February 30th
    assert resp["39"] == "30", resp
    assert d.balance(A_DEBIT) == before


# -- several terminals, many requests in flight --------------------------------------------


def test_two_terminals_with_the_same_stan_at_the_same_time(run, d):
    stan = d.stan()
    a = d.fin("POS00002", PURCHASE, A_DEBIT, 150, stan=stan)
    b = d.fin("POS00012", PURCHASE, B_DEBIT, 250, stan=stan, f7=a["7"])
    with run.conn() as ca, run.conn() as cb:
        ca.send(a)
        cb.send(b)
        ra = ca.wait_for("POS00002", stan)
        rb = cb.wait_for("POS00012", stan)
    assert ra["39"] == "00" and rb["39"] == "00", (ra, rb)
    assert (ra["4"], rb["4"]) == ("000000000150", "000000000250")
    assert ra["37"] != rb["37"]


def test_the_same_request_on_two_connections_at_once_is_served_once(run, d):
    before = d.balance(A_DEBIT)
    req = d.fin("POS00002", PURCHASE, A_DEBIT, 1_700)
    with run.conn() as ca, run.conn() as cb:
        ca.send(req)
        cb.send(req)
        codes = sorted([ca.wait_for("POS00002", req["11"])["39"], cb.wait_for("POS00002", req["11"])["39"]])
    assert codes == ["00", "94"]
    assert d.balance(A_DEBIT) == (before[0] - 1_700, before[1] - 1_700)


def test_100_requests_pipelined_on_one_connection(run, d):
    before = {pan: d.balance(pan) for pan in (A_DEBIT, B_DEBIT, C_DEBIT)}
    terminals = ("POS00002", "POS00012", "POS00013", "POS00022", "POS00001")
    cards = (A_DEBIT, B_DEBIT, C_DEBIT)
    reqs = [d.fin(terminals[i % len(terminals)], PURCHASE, cards[i % len(cards)], 1 + i, batch=11)
            for i in range(100)]
    spent = {pan: sum(int(r["4"]) for r in reqs if r["2"] == pan) for pan in cards}
    with run.conn() as c, run.conn() as other:
        c.send_many(reqs)
        # Another connection is answered while the hundred are in flight.
        d.ask(d.fin("POS00011", PURCHASE, A_DEBIT, 5, batch=11), "00", conn=other)
        got = [c.next_response() for _ in range(100)]
    keyed = {(r["41"], r["11"]): r for r in got}
    assert len(keyed) == 100
    for req in reqs:
        resp = keyed[(req["41"], req["11"])]
        assert resp["39"] == "00", resp
        assert (resp["2"], resp["4"], resp["7"]) == (req["2"], req["4"], req["7"])
    assert len({r["37"] for r in got}) == 100
    for pan in cards:
        extra = 5 if pan == A_DEBIT else 0
        want = before[pan][0] - spent[pan] - extra
        assert d.balance(pan) == (want, before[pan][1] - spent[pan] - extra), pan


# -- framing trouble (wire.md 2) ---------------------------------------------------------------


def test_garbage_frame_gets_no_answer(run, d, healthy):
    with run.conn() as c:
        c.send_bytes(frame(b"\x00\xffgarbage\x13 not an ISO 8583 message at all" * 3))
        req = good(d)
        c.send(req)
        first = c.next_response()
        assert (first["41"], first["11"], first["39"]) == (req["41"], req["11"], "00"), first


def test_oversized_frame_closes_that_connection_only(run, d, healthy):
    with run.conn() as c:
        c.send_bytes((4097).to_bytes(2, "big") + b"0200" + b"0" * 200)
        assert c.closed_by_switch(), "the switch kept a connection that declared 4097 bytes"
    with run.conn() as fresh:
        d.ask(good(d), "00", conn=fresh)


def test_largest_allowed_frame_is_read(run, d, healthy):
    """4096 is the maximum: a frame of exactly that length is read (and answered)."""
    with run.conn() as c:
        req = good(d)
        filler = {"61": "X" * 999, "62": "Y" * 999, "63": "Z" * 999}
        pad = 4096 - len(encode(dict(req, **filler, **{"48": ""})))
        raw = encode(dict(req, **filler, **{"48": "W" * pad}))
        assert len(raw) == 4096
        c.send_bytes(frame(raw))
        resp = c.wait_for(req["41"], req["11"])
        assert resp["39"] == "00", resp


def test_client_that_disconnects_mid_frame(run, d, healthy):
    raw = encode(good(d))
    s = socket.create_connection(("127.0.0.1", run.port))
    s.sendall(len(raw).to_bytes(2, "big") + raw[: len(raw) // 2])
    s.close()
    with run.conn() as fresh:
        d.ask(good(d), "00", conn=fresh)


def test_frame_not_completed_within_the_read_timeout_closes_that_connection(run, d, healthy):
    raw = encode(good(d))
    with run.conn() as c:
        c.send_bytes(len(raw).to_bytes(2, "big") + raw[:30])
        assert c.closed_by_switch(), "a half-sent frame kept its connection open past the read timeout"
    with run.conn() as fresh:
        d.ask(good(d), "00", conn=fresh)


def test_client_that_disconnects_with_requests_in_flight(run, d, healthy):
    """Its requests are still completed at the issuer (and journaled); the answers are dropped."""
    before = d.balance(C_DEBIT)
    with run.conn() as c:
        c.send_many([d.fin("POS00022", PURCHASE, C_DEBIT, 10) for _ in range(5)])
    after = d.wait_balance(C_DEBIT, (before[0] - 50, before[1] - 50))
    assert after == (before[0] - 50, before[1] - 50)


def test_keep_alives_get_no_answer(run, d, healthy):
    with run.conn() as c:
        echo = network_mgmt(d.T["POS00002"], d.stan(), "301")
        c.send_bytes(b"\x00\x00" * 3 + frame(encode(echo)) + b"\x00\x00")
        first = c.next_response()
        assert (first["t"], first["11"]) == ("0810", echo["11"]), first
        req = good(d)
        c.send(req)
        second = c.next_response()
        assert (second["41"], second["11"], second["39"]) == (req["41"], req["11"], "00"), second


def test_many_connections_at_once(run, d):
    """Ten terminals connected at the same time, each answered on its own connection."""
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    reqs = [d.fin("POS00002", PURCHASE, A_DEBIT, 20) for _ in range(10)]

    def one(i: int) -> None:
        try:
            with run.conn() as c:
                results[i] = c.request(reqs[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(results) == list(range(10))
    for i, resp in results.items():
        assert resp["11"] == reqs[i]["11"] and resp["39"] == "00"

