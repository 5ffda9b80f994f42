"""The terminal acceptor over real TCP.

The server runs in its own thread (uvloop, or the stock asyncio loop where
parametrized); the tests are plain blocking-socket clients that encode with
pyiso8583 directly (``iso8583.specs.default_ascii``), not with our codec.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time

import iso8583
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iso8583.specs import default as binary_spec
from iso8583.specs import default_ascii as ascii_spec

from cardswitch.config import Endpoint, LinkOptions
from cardswitch.iso8583.constants import response_mti
from cardswitch.switch.acceptor import Acceptor, AcceptorStats, ConnInfo, error_response

REQ = {
    "t": "0200", "2": "4761739001010119", "3": "000000", "4": "000000001000",
    "7": "1128134500", "11": "000001", "12": "134500", "13": "1128", "22": "051",
    "25": "00", "41": "TERM0001", "42": "MERCHANT0000001", "49": "156", "60": "000001",
}

PROC_RAISE = "999999"      # the test handler raises on this processing code
PROC_SILENT = "888888"     # ... and answers nothing on this one


def txn(stan: int, **fields: str) -> dict:
    m = dict(REQ)
    m["11"] = "%06d" % stan
    m.update(fields)
    return m


def encode(msg: dict, spec: dict = ascii_spec) -> bytes:
    raw, _ = iso8583.encode(dict(msg), spec)
    return bytes(raw)


def decode(data: bytes, spec: dict = ascii_spec) -> dict:
    doc, _ = iso8583.decode(data, spec)
    return doc


def frame(payload: bytes, header: bytes = b"", kind: str = "2byte") -> bytes:
    body = header + payload
    if kind == "2byte":
        return len(body).to_bytes(2, "big") + body
    return b"%04d" % len(body) + body


class Handler:
    """Answers 0x10 with 39 = 00 after an optional random delay or gate."""

    def __init__(self, max_delay: float = 0.0) -> None:
        self.max_delay = max_delay
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.peak = 0
        self.completed = 0
        self.conns: list[ConnInfo] = []
        self.rng = random.Random(7)

    async def handle(self, msg: dict, conn: ConnInfo) -> dict | None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.conns.append(conn)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.max_delay:
                await asyncio.sleep(self.rng.uniform(0, self.max_delay))
            if msg.get("3") == PROC_RAISE:
                raise RuntimeError("handler bug")
            if msg.get("3") == PROC_SILENT:
                return None
            return {"t": response_mti(msg["t"]), "3": msg["3"], "4": msg.get("4", "000000000000"),
                    "11": msg["11"], "37": "RRN%09d" % int(msg["11"]), "39": "00", "41": msg["41"]}
        finally:
            self.running -= 1
            self.completed += 1


class FormatErrorHandler(Handler):
    def format_error(self, partial: dict, reason: str) -> dict | None:
        resp = error_response(partial, "30")
        resp["44"] = "FMT"
        return resp


class Server:
    """An Acceptor on a free port, served by a loop in a background thread."""

    def __init__(self, handler=None, options: LinkOptions = LinkOptions(), loop_kind: str = "uvloop",
                 **kw) -> None:
        self.handler = handler if handler is not None else Handler()
        self.loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.options = options
        self.acceptor = Acceptor(Endpoint("127.0.0.1", 0), options, self.handler, **kw)
        self.call(self.acceptor.start())
        self.port = self.acceptor.port
        self.stats: AcceptorStats = self.acceptor.stats

    def call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def in_loop(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def connect(self) -> "Client":
        return Client(self.port, self.options)

    def close(self) -> None:
        try:
            self.call(self.acceptor.stop(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


class Client:
    def __init__(self, port: int, options: LinkOptions = LinkOptions(), timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.kind = options.framing
        self.header_len = len(bytes.fromhex(options.header)) if options.header else 0
        self.spec = binary_spec if options.dialect == "binary" else ascii_spec
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_msg(self, msg: dict, header: bytes = b"") -> None:
        self.send(frame(encode(msg, self.spec), header, self.kind))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self) -> tuple[bytes, bytes]:
        if self.kind == "2byte":
            n = int.from_bytes(self._read(2), "big")
        else:
            n = int(self._read(4))
        body = self._read(n)
        return body[:self.header_len], body[self.header_len:]

    def recv_msg(self) -> dict:
        return decode(self.recv_frame()[1], self.spec)

    def closed_by_server(self) -> bool:
        """True when the server closes this connection (waits up to the socket timeout)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def roundtrip(self, msg: dict) -> dict:
        self.send_msg(msg)
        return self.recv_msg()

    def close(self) -> None:
        self.sock.close()


def wait_until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    return request.param


@pytest.fixture
def server(loop_kind):
    srv = Server(loop_kind=loop_kind)
    yield srv
    srv.close()
    assert srv.errors == []


def make_server(request, **kw) -> Server:
    srv = Server(**kw)
    request.addfinalizer(srv.close)
    return srv


# -- basic exchange ------------------------------------------------------------

def test_request_gets_its_response(server):
    c = server.connect()
    resp = c.roundtrip(txn(42))
    assert resp["t"] == "0210"
    assert resp["11"] == "000042" and resp["41"] == "TERM0001" and resp["39"] == "00"
    assert wait_until(lambda: server.stats.frames_out == 1)    # counted just after the write
    assert server.stats.frames_in == 1
    conn = server.handler.conns[0]
    assert conn.peer.startswith("127.0.0.1:") and conn.connected_at.tzinfo is not None
    c.close()
    assert wait_until(lambda: server.stats.connections_closed == 1)
    assert server.stats.connections_opened == 1


def test_each_connection_gets_its_own_id(server):
    a, b = server.connect(), server.connect()
    a.roundtrip(txn(1))
    b.roundtrip(txn(2))
    ids = {c.id for c in server.handler.conns}
    assert len(ids) == 2


def test_pipelined_requests_each_get_their_matching_response(loop_kind, request):
    srv = make_server(request, handler=Handler(max_delay=0.02), loop_kind=loop_kind)
    c = srv.connect()
    stans = list(range(1, 101))
    c.send(b"".join(frame(encode(request_msg)) for request_msg in
                    (_req(s) for s in stans)))
    got = {}
    order = []
    for _ in stans:
        resp = c.recv_msg()
        got[resp["11"]] = resp
        order.append(int(resp["11"]))
    assert sorted(got) == ["%06d" % s for s in stans]
    for s, resp in got.items():
        assert resp["t"] == "0210" and resp["37"] == "RRN%09d" % int(s) and resp["4"] == "%012d" % int(s)
    # answered in completion order, not necessarily request order
    assert order != stans
    assert srv.errors == []


def _req(stan: int) -> dict:
    return txn(stan, **{"4": "%012d" % stan})


def test_keepalive_gets_no_answer(server):
    c = server.connect()
    c.send(b"\x00\x00" * 3)
    c.send_msg(txn(7))
    c.send(b"\x00\x00")
    assert c.recv_msg()["11"] == "000007"
    c.send_msg(txn(8))
    assert c.recv_msg()["11"] == "000008"      # nothing else arrived in between
    assert server.stats.frames_in == 2


def test_handler_none_means_no_answer(server):
    c = server.connect()
    c.send_msg(txn(1, **{"3": PROC_SILENT}))
    c.send_msg(txn(2))
    assert c.recv_msg()["11"] == "000002"
    assert wait_until(lambda: server.stats.frames_in == 2 and server.stats.frames_out == 1)


def test_binary_dialect_with_tpdu_and_4ascii_framing(request):
    opts = LinkOptions(dialect="binary", framing="4ascii", header="6000120034")
    srv = make_server(request, options=opts)
    c = srv.connect()
    msg = request_msg = txn(5, **{"52": "0123456789ABCDEF"})
    c.send(frame(encode(request_msg, binary_spec), bytes.fromhex("6000120034"), "4ascii"))
    header, payload = c.recv_frame()
    assert header == bytes.fromhex("6000340012")       # source and destination swapped
    resp = decode(payload, binary_spec)
    assert resp["t"] == "0210" and resp["11"] == msg["11"]


# -- bad input -------------------------------------------------------------------

def test_handler_exception_answers_96_and_keeps_the_connection(server):
    c = server.connect()
    resp = c.roundtrip(txn(9, **{"3": PROC_RAISE}))
    assert resp["t"] == "0210" and resp["39"] == "96"
    assert resp["11"] == "000009" and resp["41"] == "TERM0001"
    assert server.stats.handler_errors == 1
    assert c.roundtrip(txn(10))["39"] == "00"


def _broken_frame(stan: str = "000123") -> bytes:
    """A 0200 cut short inside field 60, the last field: 11 and 41 are still readable."""
    raw = encode(txn(int(stan)))
    return raw[:-5]


def test_undecodable_frame_answers_30_echoing_11_and_41(server):
    c = server.connect()
    c.send(frame(_broken_frame("000123")))
    resp = c.recv_msg()
    assert resp["t"] == "0210" and resp["39"] == "30"
    assert resp["11"] == "000123" and resp["41"] == "TERM0001"
    assert server.stats.decode_errors == 1
    assert c.roundtrip(txn(124))["39"] == "00"    # the connection stays


def test_undecodable_frame_uses_the_handlers_format_error(request):
    srv = make_server(request, handler=FormatErrorHandler())
    c = srv.connect()
    c.send(frame(_broken_frame("000321")))
    resp = c.recv_msg()
    assert resp["39"] == "30" and resp["11"] == "000321" and resp["44"] == "FMT"


def test_unreadable_mti_gets_no_answer(server):
    c = server.connect()
    c.send(frame(b"XX00" + b"\xff" * 30))
    c.send(frame(b"0200"))                     # MTI but no bitmap: no field 11 either
    c.send_msg(txn(77))
    assert c.recv_msg()["11"] == "000077"
    assert server.stats.decode_errors == 2


def test_oversized_frame_closes_only_that_connection(server):
    good, bad = server.connect(), server.connect()
    assert good.roundtrip(txn(1))["39"] == "00"
    bad.send((4097).to_bytes(2, "big") + b"0200")
    assert bad.closed_by_server()
    assert server.stats.too_large == 1
    assert good.roundtrip(txn(2))["39"] == "00"
    assert server.connect().roundtrip(txn(3))["39"] == "00"


def test_frames_before_an_oversized_one_are_still_answered(server):
    c = server.connect()
    c.send(frame(encode(txn(1))) + frame(encode(txn(2))) + (60000).to_bytes(2, "big") + b"0200")
    assert sorted(int(c.recv_msg()["11"]) for _ in range(2)) == [1, 2]
    assert c.closed_by_server()
    assert server.stats.too_large == 1


def test_non_digit_4ascii_length_closes_only_that_connection(request):
    opts = LinkOptions(framing="4ascii")
    srv = make_server(request, options=opts)
    good, bad = srv.connect(), srv.connect()
    bad.send(b"12a4" + b"0" * 20)
    assert bad.closed_by_server()
    assert srv.stats.framing_errors == 1
    assert good.roundtrip(txn(2))["39"] == "00"


def test_stalled_frame_closes_only_that_connection(request, loop_kind):
    opts = LinkOptions(read_timeout_ms=500)
    srv = make_server(request, options=opts, loop_kind=loop_kind)
    good, bad = srv.connect(), srv.connect()
    raw = frame(encode(txn(1)))
    bad.send(raw[:20])                          # a frame begun, never finished
    # the good connection keeps completing frames meanwhile, slower than the timeout overall
    for i in range(3):
        good.send(raw[:10])
        time.sleep(0.02)
        good.send(raw[10:])
        assert good.recv_msg()["39"] == "00"
    assert bad.closed_by_server()
    assert srv.stats.stalled == 1
    assert good.roundtrip(txn(2))["39"] == "00"
    assert srv.errors == []


def test_trickled_frame_still_counts_as_stalled(request):
    """Bytes arriving slowly do not re-arm the timer: the frame must be whole in time."""
    opts = LinkOptions(read_timeout_ms=150)
    srv = make_server(request, options=opts)
    c = srv.connect()
    raw = frame(encode(txn(1)))
    closed = False
    for i in range(len(raw) - 1):
        try:
            c.send(raw[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.02)
        if srv.stats.stalled:
            break
    assert closed or c.closed_by_server()
    assert srv.stats.stalled == 1


def test_half_closed_terminal_still_gets_its_answers(server):
    c = server.connect()
    server.handler.max_delay = 0.01
    for s in range(1, 6):
        c.send_msg(txn(s))
    c.sock.shutdown(socket.SHUT_WR)
    assert sorted(int(c.recv_msg()["11"]) for _ in range(5)) == [1, 2, 3, 4, 5]
    assert c.closed_by_server()


def test_response_that_does_not_encode_is_replaced_by_96(request):
    class BadHandler(Handler):
        async def handle(self, msg, conn):
            return {"t": "0210", "11": msg["11"], "41": "TOO-LONG-TERMINAL-ID", "39": "00"}
    srv = make_server(request, handler=BadHandler())
    resp = srv.connect().roundtrip(txn(3))
    assert resp["39"] == "96" and resp["11"] == "000003" and resp["41"] == "TERM0001"
    assert srv.stats.encode_errors == 1


def test_client_disconnecting_mid_frame_leaves_the_server_healthy(server):
    c = server.connect()
    c.send(frame(encode(txn(1)))[:30])
    c.close()
    assert wait_until(lambda: server.stats.connections_closed == 1)
    assert server.connect().roundtrip(txn(2))["39"] == "00"


def test_answer_to_a_departed_terminal_is_dropped_but_the_handler_completes(request):
    handler = Handler()
    srv = make_server(request, handler=handler)
    srv.call(_set_gate(handler))
    c = srv.connect()
    c.send_msg(txn(1))
    assert wait_until(lambda: handler.running == 1)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()                                   # reset: the terminal is gone
    assert wait_until(lambda: srv.stats.connections_closed == 1)
    srv.in_loop(handler.gate.set)
    assert wait_until(lambda: handler.completed == 1)
    assert wait_until(lambda: srv.stats.responses_dropped == 1)
    assert srv.stats.frames_out == 0
    assert srv.errors == []


async def _set_gate(handler: Handler) -> None:
    handler.gate = asyncio.Event()


# -- backpressure ------------------------------------------------------------------

def test_inflight_is_bounded_per_connection(request):
    handler = Handler()
    srv = make_server(request, handler=handler, max_inflight=4)
    srv.call(_set_gate(handler))
    c = srv.connect()
    c.send(b"".join(frame(encode(txn(s))) for s in range(1, 31)))
    assert wait_until(lambda: handler.running == 4)
    assert srv.stats.read_pauses >= 1
    # another connection is not held back by this one
    other = srv.connect()
    other.send_msg(txn(99))
    assert wait_until(lambda: handler.running == 5)
    srv.in_loop(handler.gate.set)
    stans = sorted(int(c.recv_msg()["11"]) for _ in range(30))
    assert stans == list(range(1, 31))
    assert other.recv_msg()["11"] == "000099"
    assert handler.peak <= 5
    assert srv.errors == []


# -- shutdown ----------------------------------------------------------------------

def test_stop_drains_inflight_requests(request, loop_kind):
    handler = Handler()
    srv = Server(handler=handler, loop_kind=loop_kind)
    try:
        srv.call(_set_gate(handler))
        c = srv.connect()
        for s in range(1, 11):
            c.send_msg(txn(s))
        assert wait_until(lambda: handler.running == 10)
        stopping = srv.submit(srv.acceptor.stop(drain_timeout=5.0))
        # the listener no longer accepts
        assert wait_until(lambda: _refused(srv.port))
        assert not stopping.done()
        srv.in_loop(handler.gate.set)
        stans = sorted(int(c.recv_msg()["11"]) for _ in range(10))
        assert stans == list(range(1, 11))
        assert stopping.result(5) is True
        assert c.closed_by_server()
        assert srv.errors == []
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv.thread.join(5)
        srv.loop.close()


def test_stop_gives_up_after_the_drain_timeout(request):
    handler = Handler()
    srv = Server(handler=handler)
    try:
        srv.call(_set_gate(handler))
        c = srv.connect()
        c.send_msg(txn(1))
        assert wait_until(lambda: handler.running == 1)
        assert srv.call(srv.acceptor.stop(drain_timeout=0.1)) is False
        assert c.closed_by_server()
        assert handler.running == 0
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv.thread.join(5)
        srv.loop.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


# -- fuzzing -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server():
    srv = Server(options=LinkOptions(read_timeout_ms=300))
    yield srv
    srv.close()
    assert srv.errors == []
    print("fuzz server stats:", srv.stats)
    assert srv.stats.decode_errors > 0          # the fuzzing reached the format-error path


def _valid_payloads():
    return st.integers(1, 999999).map(lambda s: encode(txn(s)))


@st.composite
def mangled_payloads(draw):
    raw = draw(_valid_payloads())
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "random", "mti+random"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    if kind == "insert":
        i = draw(st.integers(0, len(raw)))
        return raw[:i] + draw(st.binary(min_size=1, max_size=8)) + raw[i:]
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=300))
    return b"0200" + draw(st.binary(max_size=300))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=mangled_payloads(), probe=st.integers(1, 999999))
def test_garbage_frames_get_at_most_a_format_error_and_the_connection_stays(fuzz_server, payload, probe):
    c = fuzz_server.connect()
    try:
        c.send(frame(payload))
        probe_stan = "%06d" % probe
        c.send_msg(txn(probe, **{"41": "PROBE001"}))
        others = []
        while True:
            resp = c.recv_msg()              # every answer decodes with pyiso8583
            if resp.get("41") == "PROBE001" and resp["11"] == probe_stan:
                break
            others.append(resp)
        assert len(others) <= 1
        for resp in others:
            # 30: undecodable; 00/96: it decoded after all and went to the handler
            assert resp["39"] in ("00", "30", "96")
            if resp["39"] == "30":
                assert resp["t"] == response_mti(payload[:4].decode())
    finally:
        c.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(st.binary(max_size=200), min_size=1, max_size=5))
def test_random_byte_streams_do_not_affect_other_connections(fuzz_server, stream):
    good = fuzz_server.connect()
    bad = fuzz_server.connect()
    try:
        for chunk in stream:
            try:
                bad.send(chunk)
            except OSError:
                break
        assert good.roundtrip(txn(1, **{"41": "GOOD0001"}))["39"] == "00"
    finally:
        bad.close()
        good.close()
    assert fuzz_server.connect().roundtrip(txn(2))["39"] == "00"
