"""HSM client over TCP against a tiny fake HSM written here: matching,
timeouts, late answers, unavailability, reconnection, the pool, and the
parsing of every typed command's answer (canned answers in the payShield
layout). The same behaviours against the real simulator are in
test_hsm_client_sim.py."""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

import pytest
import uvloop

from cardswitch.config import Endpoint
from cardswitch.hsm_sim.client import (
    GeneratedKey, HsmBusy, HsmClient, HsmError, HsmProtocolError, HsmRequestError, HsmTimeout,
    HsmUnavailable, response_code_of,
)
from cardswitch.iso8583.framing import FrameReader, Framing

FAST = dict(reconnect_initial_s=0.01, reconnect_max_s=0.05)
ZPK = "U1EF828AA8F6B80EB83E19FBC373F3A85"
TPK = "0406FBB23A5214DF"


def run(coro, loop_kind: str = "uvloop"):
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        errors: list[dict] = []
        runner.get_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        result = runner.run(asyncio.wait_for(coro, 20))
    assert errors == [], errors
    return result


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def default_answer(cmd: bytes) -> bytes:
    code = cmd[:2].decode()
    resp = response_code_of(code).encode()
    if code == "NC":
        return resp + b"00" + b"0123456789ABCDEF" + b"0007-E000"
    if code == "B2":
        return resp + b"00" + cmd[6:6 + int(cmd[2:6], 16)]
    return resp + b"00"


class FakeHsm:
    """Answers each frame with ``answer(command bytes)`` under its header.

    ``hold`` keeps answers back until ``release(reverse)``; ``drop`` never
    answers. Records the headers of requests in flight to check uniqueness.
    """

    def __init__(self, port: int = 0, header_len: int = 4,
                 answer: Callable[[bytes], bytes] = default_answer) -> None:
        self.port = port
        self.framing = Framing("2byte", header_len, 0xFFFF)
        self.answer = answer
        self.hold = False
        self.drop = False
        self.held: list[tuple[asyncio.Transport, bytes, bytes]] = []
        self.received: list[bytes] = []
        self.conns: list[asyncio.Transport] = []
        self.per_conn: dict[int, int] = {}
        self.dup_headers = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _FakeConn(self), "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.conns:
            t.close()
        await self.server.wait_closed()
        self.conns.clear()
        self.held.clear()

    def release(self, reverse: bool = False) -> None:
        held, self.held = self.held, []
        for t, header, cmd in (reversed(held) if reverse else held):
            if not t.is_closing():
                t.write(self.framing.encode(self.answer(cmd), header))

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)


class _FakeConn(asyncio.Protocol):
    def __init__(self, hsm: FakeHsm) -> None:
        self.hsm = hsm
        self.reader = FrameReader(hsm.framing)
        self.in_flight: set[bytes] = set()

    def connection_made(self, transport) -> None:
        self.t = transport
        self.hsm.conns.append(transport)

    def connection_lost(self, exc) -> None:
        if self.t in self.hsm.conns:
            self.hsm.conns.remove(self.t)

    def data_received(self, data: bytes) -> None:
        hsm = self.hsm
        for header, cmd in self.reader.feed(data):
            hsm.received.append(cmd)
            hsm.per_conn[id(self)] = hsm.per_conn.get(id(self), 0) + 1
            if hsm.drop:
                continue
            if hsm.hold:
                if any(h == header and t is self.t for t, h, _ in hsm.held):
                    hsm.dup_headers += 1
                hsm.held.append((self.t, header, cmd))
                continue
            self.t.write(hsm.framing.encode(hsm.answer(cmd), header))


async def started(hsm: FakeHsm, **kw) -> HsmClient:
    await hsm.start()
    opts = dict(FAST, timeout_s=2.0)
    opts.update(kw)
    c = HsmClient(hsm.endpoint, **opts)
    await c.start()
    assert c.available
    return c


# -- basics -----------------------------------------------------------------------

@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_echo_and_diagnostics(loop_kind: str) -> None:
    async def main():
        hsm = FakeHsm()
        c = await started(hsm)
        assert c.connections_up == 2
        assert await c.echo(b"\x00\x01binary\xff") == b"\x00\x01binary\xff"
        assert await c.echo("text") == "text"
        assert await c.diagnostics() == ("0123456789ABCDEF", "0007-E000")
        await c.stop()
        assert not c.available
        await hsm.stop()
    run(main(), loop_kind)


@pytest.mark.parametrize("header_len", [1, 4, 6])
def test_many_concurrent_requests_over_the_pool_matched_out_of_order(header_len: int) -> None:
    async def main():
        hsm = FakeHsm(header_len=header_len)
        c = await started(hsm, header_len=header_len, pool_size=2)
        hsm.hold = True
        n = 24 if header_len == 1 else 400          # one hex digit allows 16 in flight per connection
        tasks = [asyncio.ensure_future(c.echo(b"req-%d" % i)) for i in range(n)]
        while len(hsm.held) < n:
            await asyncio.sleep(0.001)
        assert c.in_flight == n
        assert sorted(hsm.per_conn.values()) == [n // 2, n // 2]    # least in flight spreads evenly
        hsm.release(reverse=True)                                   # answers in the opposite order
        got = await asyncio.gather(*tasks)
        assert got == [b"req-%d" % i for i in range(n)]
        assert hsm.dup_headers == 0 and c.in_flight == 0 and c.late_answers == 0
        await c.stop()
        await hsm.stop()
    run(main())


def test_in_flight_cap_raises_busy() -> None:
    async def main():
        hsm = FakeHsm()
        c = await started(hsm, pool_size=1, max_in_flight=3)
        hsm.hold = True
        tasks = [asyncio.ensure_future(c.echo(b"x")) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(HsmBusy):
            await c.echo(b"y")
        while len(hsm.held) < 3:
            await asyncio.sleep(0.001)
        hsm.release()
        assert await asyncio.gather(*tasks) == [b"x"] * 3
        await c.stop()
        await hsm.stop()
    run(main())


# -- failure semantics ------------------------------------------------------------

def test_unavailable_at_once_when_nothing_listens() -> None:
    async def main():
        c = HsmClient(Endpoint("127.0.0.1", free_port()), connect_timeout_s=0.5, **FAST)
        await c.start()
        assert not c.available
        coro = c.translate_pin(TPK, ZPK, "0" * 16, "1" * 12)
        with pytest.raises(HsmUnavailable):
            coro.send(None)          # raised on the first step: nothing was awaited
        coro.close()
        await c.stop()
        # before start and after stop too
        c2 = HsmClient(Endpoint("127.0.0.1", free_port()))
        with pytest.raises(HsmUnavailable):
            await c2.echo(b"x")
    run(main())


def test_timeout_then_late_answer_discarded_then_normal_service() -> None:
    async def main():
        hsm = FakeHsm()
        c = await started(hsm, pool_size=1, timeout_s=0.05)
        hsm.hold = True
        with pytest.raises(HsmTimeout) as e:
            await c.echo(b"slow")
        assert e.value.command == "B2" and c.in_flight == 0 and c.timeouts == 1
        hsm.hold = False
        hsm.release()                                  # the late answer arrives
        assert await c.echo(b"fresh") == b"fresh"      # and is not taken for this one
        assert c.late_answers == 1
        await c.stop()
        await hsm.stop()
    run(main())


def test_consecutive_timeouts_replace_a_dead_connection() -> None:
    async def main():
        hsm = FakeHsm()
        c = await started(hsm, pool_size=1, timeout_s=0.03, drop_after_timeouts=2)
        assert c.connects == 1
        hsm.drop = True
        for _ in range(2):
            with pytest.raises(HsmTimeout):
                await c.echo(b"x")
        hsm.drop = False
        assert await c.wait_available(2.0)
        while c.connects < 2:
            await asyncio.sleep(0.005)
        assert await c.echo(b"back") == b"back"
        await c.stop()
        await hsm.stop()
    run(main())


def test_server_restart_fails_in_flight_then_recovers() -> None:
    async def main():
        hsm = FakeHsm()
        c = await started(hsm)
        hsm.hold = True
        pending = asyncio.ensure_future(c.echo(b"in flight"))
        while not hsm.held:
            await asyncio.sleep(0.001)
        await hsm.stop()
        with pytest.raises(HsmUnavailable):
            await pending
        while c.available:
            await asyncio.sleep(0.001)
        with pytest.raises(HsmUnavailable):
            await c.echo(b"down")
        hsm2 = FakeHsm(port=hsm.port)
        await hsm2.start()
        assert await c.wait_available(5.0)
        assert await c.echo(b"up again") == b"up again"
        await c.stop()
        await hsm2.stop()
    run(main())


def test_stop_fails_requests_in_flight() -> None:
    async def main():
        hsm = FakeHsm()
        c = await started(hsm)
        hsm.hold = True
        pending = asyncio.ensure_future(c.echo(b"x"))
        while not hsm.held:
            await asyncio.sleep(0.001)
        await c.stop()
        with pytest.raises(HsmUnavailable):
            await pending
        await hsm.stop()
    run(main())


def test_error_codes_and_verification_results() -> None:
    answers = {b"CA": b"CB10", b"CC": b"ZZ15", b"CY": b"CZ01", b"DC": b"DD00", b"M8": b"M901",
               b"EC": b"ED02", b"NC": b"XX00", b"CW": b"CX0012", b"KQ": b"KR01"}

    async def main():
        hsm = FakeHsm(answer=lambda cmd: answers[cmd[:2]])
        c = await started(hsm)
        with pytest.raises(HsmError) as e:
            await c.translate_pin(TPK, ZPK, "0" * 16, "1" * 12)
        assert (e.value.command, e.value.code, e.value.meaning) == ("CA", "10", "source key parity error")
        with pytest.raises(HsmError) as e:
            await c.translate_pin_zpk(ZPK, ZPK, "0" * 16, "1" * 12)
        assert e.value.code == "15"
        assert await c.verify_cvv(ZPK, "123", "4111111111111111", "2512", "101") is False
        assert await c.verify_pin_pvv_tpk(TPK, ZPK, "0" * 16, "01", "1" * 12, 1, "1234") is True
        assert await c.verify_mac("008", ZPK, b"data", "0" * 16) is False
        with pytest.raises(HsmError) as e:          # 02 is an error, not a result, for verify commands
            await c.verify_pin_pvv_zpk(ZPK, ZPK, "0" * 16, "01", "1" * 12, 1, "1234")
        assert e.value.code == "02"
        with pytest.raises(HsmProtocolError):
            await c.diagnostics()
        with pytest.raises(HsmProtocolError):
            await c.generate_cvv(ZPK, "4111111111111111", "2512", "101")
        assert await c.verify_arqc(1, 0, ZPK, b"\0" * 8, b"\0\1", b"\0" * 4, b"", b"\0" * 8, b"\0\0") is False
        with pytest.raises(HsmRequestError):
            await c.translate_pin(TPK, ZPK, "0" * 15, "1" * 12)
        assert len(hsm.received) == 9                     # the bad request never left
        await c.stop()
        await hsm.stop()
    run(main())


def test_typed_commands_send_payshield_layout_and_parse_answers() -> None:
    arpc = b"\x00\x11\x22\x33\x44\x55\x66\x77"
    answers = {
        b"CA": b"CB0004F7808F2CBEC6316801", b"CC": b"CD00041111222233334444" + b"01",
        b"CI": b"CJ000599998888777766660" + b"1", b"CW": b"CX00561", b"CY": b"CZ00",
        b"DA": b"DB00", b"EA": b"EB01", b"EC": b"ED00",
        b"M6": b"M7000123456789ABCDEF", b"M8": b"M900",
        b"BU": b"BV000123456789ABCDEF", b"FA": b"FB00U" + b"A" * 32 + b"ABCDEF",
        b"KQ": b"KR00" + arpc,
    }

    def answer(cmd: bytes) -> bytes:
        if cmd[:2] == b"A0":
            body = b"U" + b"B" * 32 + (b"X" + b"C" * 32 if cmd[2:3] == b"1" else b"") + b"FEDCBA"
            return b"A100" + body
        if cmd[:2] == b"KQ" and cmd[2:3] == b"0":
            return b"KR00"
        return answers[cmd[:2]]

    async def main():
        hsm = FakeHsm(answer=answer)
        c = await started(hsm)
        pb = "0123456789ABCDEF"
        assert await c.translate_pin(TPK, ZPK, pb, "550000025321", "03", "01") == "F7808F2CBEC63168"
        assert await c.translate_pin_zpk(ZPK, ZPK, pb, "550000025321") == "1111222233334444"
        assert await c.translate_pin_dukpt("U" + "1" * 32, ZPK, "FFFF9876543210E00001", pb,
                                           "400000123456") == "9999888877776666"
        assert await c.generate_cvv(ZPK, "4123456789012345", "8701", "101") == "561"
        assert await c.verify_cvv(ZPK, "561", "4123456789012345", "8701", "101") is True
        assert await c.verify_pin_ibm_tpk(TPK, TPK, 12, pb, "01", 4, "1" * 12, "0123456789012345",
                                          "40000012345N", "1234") is True
        assert await c.verify_pin_ibm_zpk(ZPK, TPK, 12, pb, "01", 4, "1" * 12, "0123456789012345",
                                          "40000012345N", "1234") is False
        assert await c.verify_pin_pvv_zpk(ZPK, TPK, pb, "01", "1" * 12, "1", "1234") is True
        assert await c.generate_mac("003", TPK, b"\x02\x00msg") == "0123456789ABCDEF"
        assert await c.verify_mac("003", TPK, b"\x02\x00msg", "0123456789ABCDEF") is True
        assert await c.key_check_value("01", ZPK) == "0123456789ABCDEF"
        assert await c.import_zpk("U" + "4" * 32, "U" + "5" * 32) == ("U" + "A" * 32, "ABCDEF")
        assert await c.generate_key("001") == GeneratedKey("U" + "B" * 32, None, "FEDCBA")
        assert await c.generate_key("001", export_under="U" + "4" * 32) == \
            GeneratedKey("U" + "B" * 32, "X" + "C" * 32, "FEDCBA")
        args = ("U" + "6" * 32, b"\x12" * 8, b"\x00\x01", b"\xde\xad\xbe\xef", b"\x00;\xff", b"\x01" * 8, b"00")
        assert await c.verify_arqc(0, 0, *args) is True
        assert await c.verify_arqc(1, 0, *args) == arpc
        kq = [r for r in hsm.received if r[:2] == b"KQ"][-1]
        assert kq.endswith(b"\xde\xad\xbe\xef03\x00;\xff;" + b"\x01" * 8 + b"00")        # raw bytes on the wire
        m6 = [r for r in hsm.received if r[:2] == b"M6"][-1]
        assert m6 == b"M600131003" + TPK.encode() + b"0005\x02\x00msg"
        await c.stop()
        await hsm.stop()
    run(main())
