"""The HSM simulator over TCP (hsm.md 1, 5, 6): framing, header echo, order,
fault injection, garbage, and the golden vectors through the socket.

The server runs on an event loop in a background thread; the tests talk to it
with a minimal blocking client, as a payShield client would.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardswitch.config import Endpoint, HsmConfig, Network, SwitchConfig
from cardswitch.crypto.des import fix_parity
from cardswitch.hsm_sim.lmk import TEST_LMK_PAIRS, Lmk
from cardswitch.hsm_sim.server import HsmOptions, HsmServer, parse_overrides, run_hsm

CA_GOLDEN = b"CA0406FBB23A5214DFBAB32D775A38E4AB12DC80B186C30902B00303550000025321"
CA_GOLDEN_01 = CA_GOLDEN[:-14] + b"01" + CA_GOLDEN[-12:]
CW_GOLDEN = b"CWU9B4934384B19946B040CD702B4D581454123456789012345;8701101"


class Client:
    """A minimal payShield host client: 2-byte length, header, command."""

    def __init__(self, port: int, header_len: int = 4) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.header_len = header_len
        self.seq = 0
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def frame(self, body: bytes, header: bytes | None = None) -> tuple[bytes, bytes]:
        if header is None:
            header = b"%0*d" % (self.header_len, self.seq % 10 ** self.header_len) if self.header_len else b""
            self.seq += 1
        msg = header + body
        return header, struct.pack(">H", len(msg)) + msg

    def send(self, body: bytes, header: bytes | None = None) -> bytes:
        header, data = self.frame(body, header)
        self.sock.sendall(data)
        return header

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the HSM")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv_raw(self) -> bytes:
        (n,) = struct.unpack(">H", self._read(2))
        return self._read(n)

    def recv(self) -> tuple[bytes, bytes]:
        msg = self.recv_raw()
        return msg[:self.header_len], msg[self.header_len:]

    def call(self, body: bytes) -> bytes:
        header = self.send(body)
        got_header, resp = self.recv()
        assert got_header == header
        return resp

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


class ThreadedHsm:
    """HsmServer on its own event loop thread; ``ctl`` runs a call on that loop."""

    def __init__(self, options: HsmOptions | None = None, lmk: Lmk | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = HsmServer(options, lmk=lmk)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.port = self.server.port

    def ctl(self, fn, *args):
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def hsm_srv():
    srv = ThreadedHsm()
    yield srv
    srv.close()


@pytest.fixture
def srv(hsm_srv):
    hsm_srv.ctl(hsm_srv.server.clear_faults)
    yield hsm_srv
    hsm_srv.ctl(hsm_srv.server.clear_faults)


@pytest.fixture
def client(srv):
    c = Client(srv.port)
    yield c
    c.close()


# -- golden vectors (hsm.md 5) through TCP --------------------------------------------------------

def test_golden_nc(client):
    r = client.call(b"NC")
    assert r[:4] == b"ND00" and len(r) == 4 + 16 + 9
    int(r[4:20], 16)


def test_golden_cw(client):
    assert client.call(CW_GOLDEN) == b"CX00561"


def test_golden_ca_format_03(client):
    assert client.call(CA_GOLDEN) == b"CB0004F7808F2CBEC6316803"


def test_golden_ca_format_01(client):
    assert client.call(CA_GOLDEN_01) == b"CB0004E98FFDA17099AF5501"


# -- framing ------------------------------------------------------------------------------------

def test_unknown_command_68(client):
    assert client.call(b"XX0000") == b"XY68"


def test_short_frame_zz15(client):
    assert client.call(b"C") == b"ZZ15"
    assert client.call(b"") == b"ZZ15"


def test_frame_shorter_than_header_zz15(client):
    client.sock.sendall(b"\x00\x02AB")
    assert client._read(2) == b"\x00\x06"
    assert client._read(6) == b"ABZZ15"
    assert client.call(b"NC")[:4] == b"ND00"


def test_zero_length_frame_is_ignored(client):
    client.sock.sendall(b"\x00\x00")
    assert client.call(b"NC")[:4] == b"ND00"


def test_binary_header_echoed_unchanged(client):
    header = b"\x00\xff;\x80"
    assert client.send(b"NC", header) == header
    h, r = client.recv()
    assert h == header and r[:4] == b"ND00"


def test_pipelined_in_order_with_headers(client):
    bodies = [CA_GOLDEN, b"NC", CW_GOLDEN, CA_GOLDEN_01, b"XX", b"B20003abc"] * 40
    frames = [client.frame(b) for b in bodies]
    client.sock.sendall(b"".join(f for _, f in frames))
    expect = {CA_GOLDEN: b"CB0004F7808F2CBEC6316803", CW_GOLDEN: b"CX00561",
              CA_GOLDEN_01: b"CB0004E98FFDA17099AF5501", b"XX": b"XY68", b"B20003abc": b"B300abc"}
    for (header, _), body in zip(frames, bodies):
        h, r = client.recv()
        assert h == header
        if body == b"NC":
            assert r[:4] == b"ND00"
        else:
            assert r == expect[body]


def test_frames_split_across_writes(client):
    _, data = client.frame(CA_GOLDEN, b"0001")
    for i in range(len(data)):
        client.sock.sendall(data[i:i + 1])
    assert client.recv() == (b"0001", b"CB0004F7808F2CBEC6316803")


def test_header_length_configurable():
    srv = ThreadedHsm(HsmOptions(header_len=0))
    try:
        c = Client(srv.port, header_len=0)
        assert c.call(CW_GOLDEN) == b"CX00561"
        c.close()
    finally:
        srv.close()
    srv = ThreadedHsm(HsmOptions(header_len=12))
    try:
        c = Client(srv.port, header_len=12)
        assert c.call(CW_GOLDEN) == b"CX00561"
        c.close()
    finally:
        srv.close()


def test_several_connections_independent(srv):
    clients = [Client(srv.port) for _ in range(4)]
    try:
        headers = [c.send(CA_GOLDEN, b"C%03d" % i) for i, c in enumerate(clients)]
        for c, h in reversed(list(zip(clients, headers))):
            assert c.recv() == (h, b"CB0004F7808F2CBEC6316803")
    finally:
        for c in clients:
            c.close()


# -- fault injection ------------------------------------------------------------------------------

def test_latency_holds_order(srv, client):
    srv.ctl(srv.server.set_latency, "CA", 30)
    h1 = client.send(CA_GOLDEN)
    h2 = client.send(b"NC")
    h3 = client.send(CW_GOLDEN)
    assert client.recv() == (h1, b"CB0004F7808F2CBEC6316803")
    h, r = client.recv()
    assert h == h2 and r[:4] == b"ND00"
    assert client.recv() == (h3, b"CX00561")
    srv.ctl(srv.server.set_latency, "CA", None)
    assert client.call(CA_GOLDEN) == b"CB0004F7808F2CBEC6316803"


def test_latency_for_every_command(srv, client):
    srv.ctl(srv.server.set_latency, "*", 5)
    headers = [client.send(b) for b in (b"NC", CW_GOLDEN, b"NC")]
    assert [client.recv()[0] for _ in headers] == headers


def test_failure_error_code(srv, client):
    srv.ctl(srv.server.set_failure, "CA", "13")
    assert client.call(CA_GOLDEN) == b"CB13"
    assert client.call(CW_GOLDEN) == b"CX00561"
    srv.ctl(srv.server.set_failure, "CA", None)
    assert client.call(CA_GOLDEN) == b"CB0004F7808F2CBEC6316803"


def test_failure_down_swallows_the_request(srv, client):
    srv.ctl(srv.server.set_failure, "CA", "down")
    client.send(CA_GOLDEN)
    h = client.send(CW_GOLDEN)
    assert client.recv() == (h, b"CX00561")      # the CA got no answer at all
    before = srv.ctl(lambda: srv.server.stats.dropped.get("CA", 0))
    assert before >= 1


def test_failure_everything_down_then_up(srv, client):
    srv.ctl(srv.server.set_failure, "*", "down")
    client.send(b"NC")
    srv.ctl(srv.server.set_failure, "*", None)
    h = client.send(CW_GOLDEN)
    assert client.recv() == (h, b"CX00561")


def test_failure_close(srv, client):
    srv.ctl(srv.server.set_failure, "M6", "close")
    h = client.send(CW_GOLDEN)
    client.send(b"M6" + b"0" * 40)
    client.send(b"NC")
    assert client.recv() == (h, b"CX00561")      # due before the M6: sent
    with pytest.raises(ConnectionError):
        client.recv()
    srv.ctl(srv.server.set_failure, "M6", None)
    c2 = Client(srv.port)
    assert c2.call(CW_GOLDEN) == b"CX00561"
    c2.close()


def test_disable_at_run_time(srv, client):
    srv.ctl(srv.server.disable, "CW")
    assert client.call(CW_GOLDEN) == b"CX68"
    srv.ctl(srv.server.enable, "CW")
    assert client.call(CW_GOLDEN) == b"CX00561"


def test_options_at_start():
    srv = ThreadedHsm(HsmOptions(latency_ms={"NC": 1}, fail={"CA": "01"}, disabled={"KQ"}))
    try:
        c = Client(srv.port)
        assert c.call(CA_GOLDEN) == b"CB01"
        assert c.call(b"KQ") == b"KR68"
        assert c.call(b"NC")[:4] == b"ND00"
        c.close()
    finally:
        srv.close()


@pytest.mark.parametrize("kw", [{"fail": {"CA": "slow"}}, {"fail": {"CA": "1"}}, {"latency_ms": {"CA": -1}},
                                {"header_len": -1}])
def test_bad_options_rejected(kw):
    with pytest.raises(ValueError):
        HsmServer(HsmOptions(**kw))


def test_parse_overrides():
    assert parse_overrides(["CA=5", " *=down "], "--x") == {"CA": "5", "*": "down"}
    with pytest.raises(ValueError):
        parse_overrides(["CA"], "--x")


# -- stats ----------------------------------------------------------------------------------------

def test_stats_per_command():
    srv = ThreadedHsm()
    try:
        c = Client(srv.port)
        for _ in range(3):
            c.call(CA_GOLDEN)
        c.call(b"CA")
        c.call(b"XX")
        srv.ctl(srv.server.set_failure, "NC", "down")
        c.send(b"NC")
        assert c.call(CW_GOLDEN) == b"CX00561"
        snap = srv.ctl(srv.server.stats.snapshot)
        assert snap["CA"] == {"requests": 4, "codes": {"00": 3, "15": 1}, "dropped": 0, "closed": 0}
        assert snap["XX"]["codes"] == {"68": 1}
        assert snap["NC"]["dropped"] == 1 and snap["NC"]["requests"] == 1
        assert srv.ctl(srv.server.stats.requests, "CA") == 4
        assert srv.server.stats.connections == 1
        c.close()
    finally:
        srv.close()


# -- garbage ----------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([b"CA", b"CC", b"CI", b"DC", b"EC", b"DA", b"EA", b"CW", b"CY", b"M6",
                               b"M8", b"KQ", b"A0", b"BU", b"FA", b"B2", b"NC"]),
              st.binary(max_size=200)).map(lambda t: b"0000" + t[0] + t[1]),
))
def test_garbage_frames_never_crash(hsm_srv, payload):
    c = Client(hsm_srv.port)
    try:
        c.sock.sendall(struct.pack(">H", len(payload)) + payload)
        h = c.send(b"NC", b"9999")
        if payload:                      # a zero-length frame is a keep-alive: no answer
            msg = c.recv_raw()
            hdr, r = msg[:len(payload[:4])], msg[len(payload[:4]):]
            assert hdr == payload[:4]
            assert r == b"ZZ15" or (len(r) >= 4 and r[2:4].isdigit() and r[2:4] != b"41")
        hdr, r = c.recv()
        assert hdr == h and r[:4] == b"ND00"
    finally:
        c.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=400))
def test_unframed_garbage_then_disconnect(hsm_srv, data):
    c = Client(hsm_srv.port)
    c.sock.sendall(data)
    c.close()
    c2 = Client(hsm_srv.port)
    try:
        assert c2.call(CW_GOLDEN) == b"CX00561"
    finally:
        c2.close()


def test_client_that_does_not_read(srv):
    """Responses pile up; the server stops reading that client, others go on."""
    slow = Client(srv.port)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    _, frame = slow.frame(b"B2" + b"%04X" % 4000 + b"x" * 4000, b"0000")
    slow.sock.setblocking(False)
    sent = 0
    try:
        for _ in range(2000):
            try:
                sent += slow.sock.send(frame * 8)
            except BlockingIOError:
                break
    finally:
        slow.sock.setblocking(True)
    other = Client(srv.port)
    assert other.call(CW_GOLDEN) == b"CX00561"
    other.close()
    slow.close()


# -- run_hsm and the command line -------------------------------------------------------------------

def _network(port: int, lmk_file: str = "") -> Network:
    return Network(switch=SwitchConfig(), banks=(), merchants=(),
                   hsm=HsmConfig(listen=Endpoint("127.0.0.1", port), simulate=True, lmk_file=lmk_file))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_hsm_serves_until_cancelled(tmp_path):
    other = [fix_parity(bytes([0x01 + 2 * i]) * 8 + bytes([0x40 + 2 * i]) * 8) for i in range(20)]
    lmk_file = tmp_path / "lmk.txt"
    lmk_file.write_text("".join(f"{i:02d} {p.hex().upper()}\n" for i, p in enumerate(other)))
    port = _free_port()
    net = _network(port, str(lmk_file))

    async def main():
        ready = asyncio.Event()
        task = asyncio.create_task(run_hsm(net, ready))
        await asyncio.wait_for(ready.wait(), 10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00\x06" + b"0001NC")
        n = int.from_bytes(await reader.readexactly(2), "big")
        resp = await reader.readexactly(n)
        writer.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return resp

    resp = asyncio.run(main())
    assert resp[:8] == b"0001ND00"
    assert resp[8:24] == Lmk(other).check_value().encode() != Lmk.test().check_value().encode()
    with socket.socket() as s:      # the port is free again
        s.bind(("127.0.0.1", port))


def test_run_hsm_ready_callable():
    port = _free_port()
    net = _network(port)
    seen = []

    async def main():
        task = asyncio.create_task(run_hsm(net, lambda server: seen.append(server.port)))
        while not seen:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert seen == [port]


def test_module_entry_point(tmp_path):
    lmk_file = tmp_path / "lmk.txt"
    lmk_file.write_text("".join(f"{i:02d} {p}\n" for i, p in enumerate(TEST_LMK_PAIRS)))
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-m", "cardswitch.hsm_sim", "--port", "0", "--lmk-file",
                          str(lmk_file), "--fail", "CA=12", "--max-seconds", "60"],
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("ready ")
        c = Client(int(line.split()[1]))
        assert c.call(CW_GOLDEN) == b"CX00561"
        assert c.call(CA_GOLDEN) == b"CB12"
        c.close()
    finally:
        p.terminate()
        rc = p.wait(10)
        p.stdout.close()
    assert rc == 0


def test_module_entry_point_bad_lmk(tmp_path):
    bad = tmp_path / "lmk.txt"
    bad.write_text("00 0101\n")
    r = subprocess.run([sys.executable, "-m", "cardswitch.hsm_sim", "--port", "0", "--lmk-file", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "NN HEX32" in r.stderr


def test_module_entry_point_bad_option():
    r = subprocess.run([sys.executable, "-m", "cardswitch.hsm_sim", "--port", "0", "--fail", "CA=slow"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "failure mode" in r.stderr


def test_bench_script_runs(tmp_path):
    """bench/bench_hsm.py end to end, minimal: it starts the simulator, loads it, prints its table.
    (The figures are the bench's business; the exit code 2 means only "goal not met here".)"""
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_hsm.py"
    out = tmp_path / "hsm.json"
    r = subprocess.run([sys.executable, str(script), "--repeat", "1", "--duration", "0.2", "--warmup", "0.05",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 2), r.stderr
    assert "CA x1" in r.stdout and "M6 x4" in r.stdout
    res = json.loads(out.read_text())
    assert res["medians"]["CA x1"]["calls_per_s"] > 0 and res["medians"]["M6 x1"]["calls_per_s"] > 0


def test_under_uvloop_with_latency():
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with HsmServer(HsmOptions(latency_ms={"CA": 2})) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            c = Client.__new__(Client)
            c.header_len = 4
            frames = [c.frame(b, h)[1] for b, h in ((CA_GOLDEN, b"0001"), (b"NC", b"0002"))]
            writer.write(b"".join(frames))
            out = []
            for _ in frames:
                n = int.from_bytes(await reader.readexactly(2), "big")
                out.append(await reader.readexactly(n))
            writer.close()
            return out

    loop = uvloop.new_event_loop()
    try:
        first, second = loop.run_until_complete(main())
    finally:
        loop.close()
    assert first == b"0001CB0004F7808F2CBEC6316803"
    assert second[:8] == b"0002ND00"
