"""Bank links against a tiny fake issuer host written here with pyiso8583."""

from __future__ import annotations

import asyncio
import socket

import iso8583
import pytest
import uvloop
from iso8583.specs import default as binary_spec
from iso8583.specs import default_ascii as ascii_spec

from cardswitch.config import Endpoint, LinkOptions
from cardswitch.iso8583.constants import response_mti
from cardswitch.switch.backoff import Backoff
from cardswitch.switch.banklink import (
    CONNECTING, OFFLINE, ONLINE, STOPPED, BankLink, LinkDown, LinkTimeout,
)

SWITCH_ID = "99900001"
FAST_BACKOFF = dict(initial=0.01, maximum=0.05)


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


class FakeIssuer:
    """An issuer host: answers 0800 (sign-on rc configurable), answers requests 0x10 39=00.

    ``hold`` keeps answers back until ``release``; ``silent_echo`` ignores echo tests.
    """

    def __init__(self, port: int = 0, options: LinkOptions = LinkOptions(), signon_rc: str = "00") -> None:
        self.port = port
        self.signon_rc = signon_rc
        self.spec = binary_spec if options.dialect == "binary" else ascii_spec
        self.kind = options.framing
        self.header = bytes.fromhex(options.header) if options.header else b""
        self.received: list[dict] = []
        self.answers: list[dict] = []           # responses the switch sent us
        self.held: list[tuple[asyncio.StreamWriter, dict]] = []
        self.hold = False
        self.silent_echo = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None
        self.changed = asyncio.Event()

    async def start(self) -> "FakeIssuer":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()
        self.writers.clear()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    def netmgmt(self, code: str) -> list[dict]:
        return [m for m in self.received if m["t"] == "0800" and m.get("70") == code]

    async def wait_for(self, pred, timeout: float = 5.0) -> None:
        async def loop():
            while not pred():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)

    def frame(self, msg: dict) -> bytes:
        raw, _ = iso8583.encode(dict(msg), self.spec)
        body = self.header + bytes(raw)
        if self.kind == "2byte":
            return len(body).to_bytes(2, "big") + body
        return b"%04d" % len(body) + body

    def send(self, writer: asyncio.StreamWriter, msg: dict) -> None:
        writer.write(self.frame(msg))

    def release(self, order=None) -> None:
        held, self.held = self.held, []
        for w, m in (order(held) if order else held):
            self.send(w, m)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                if self.kind == "2byte":
                    n = int.from_bytes(await reader.readexactly(2), "big")
                else:
                    n = int(await reader.readexactly(4))
                if n == 0:
                    continue
                body = await reader.readexactly(n)
                assert body[:len(self.header)] == self.header
                msg, _ = iso8583.decode(body[len(self.header):], self.spec)
                msg.pop("p", None)
                msg.pop("1", None)
                self._on_message(writer, msg)
                self.changed.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _on_message(self, writer: asyncio.StreamWriter, msg: dict) -> None:
        mti = msg["t"]
        if mti[2] in "13":
            self.answers.append(msg)
            return
        self.received.append(msg)
        if mti == "0800":
            if msg["70"] == "301" and self.silent_echo:
                return
            rc = self.signon_rc if msg["70"] == "001" else "00"
            self.send(writer, {"t": "0810", "7": msg["7"], "11": msg["11"], "39": rc, "70": msg["70"]})
            return
        resp = {"t": response_mti(mti), "11": msg["11"], "39": "00"}
        for k in ("4", "37", "41"):
            if k in msg:
                resp[k] = msg[k]
        if self.hold:
            self.held.append((writer, resp))
        else:
            self.send(writer, resp)


def make_link(endpoints, options: LinkOptions = LinkOptions(), **kw) -> BankLink:
    kw.setdefault("echo_interval_s", 30.0)
    kw.setdefault("backoff", Backoff(**FAST_BACKOFF))
    kw.setdefault("connect_timeout_s", 1.0)
    return BankLink("BANKA", endpoints, options, switch_institution_id=SWITCH_ID, **kw)


async def wait_offline(link: BankLink) -> None:
    for _ in range(500):
        if not link.online:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("link still online")


def fin_request(amount: int, rrn: str) -> dict:
    return {"t": "0200", "2": "6221260000000018", "3": "000000", "4": "%012d" % amount,
            "7": "1128120000", "32": "10000001", "33": SWITCH_ID, "37": rrn,
            "41": "TERM0001", "49": "156", "100": "10000002"}


# -- sign-on, echo, sign-off -----------------------------------------------------

@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_sign_on_then_online(loop_kind):
    async def main():
        issuer = await FakeIssuer().start()
        states = []
        link = make_link([issuer.endpoint], on_state=lambda bank, st: states.append((bank, st)))
        await link.start()
        assert await link.wait_online(5)
        assert link.online and link.state == ONLINE
        (signon,) = issuer.netmgmt("001")
        assert signon["33"] == SWITCH_ID
        assert len(signon["7"]) == 10 and signon["7"].isdigit()
        assert len(signon["11"]) == 6 and signon["11"].isdigit()
        assert ("BANKA", ONLINE) in states and ("BANKA", CONNECTING) in states
        await link.stop()
        await issuer.wait_for(lambda: issuer.netmgmt("002"))
        (signoff,) = issuer.netmgmt("002")
        assert signoff["11"] != signon["11"]
        assert link.state == STOPPED and states[-1] == ("BANKA", STOPPED)
        await issuer.stop()
    run(main(), loop_kind)


def test_refused_sign_on_keeps_the_link_offline_and_retries():
    async def main():
        issuer = await FakeIssuer(signon_rc="91").start()
        link = make_link([issuer.endpoint])
        await link.start()
        await issuer.wait_for(lambda: len(issuer.netmgmt("001")) >= 3)
        assert not link.online
        with pytest.raises(LinkDown):
            await link.request(fin_request(100, "000000000001"), 1.0)
        issuer.signon_rc = "00"
        assert await link.wait_online(5)
        await link.stop()
        await issuer.stop()
    run(main())


def test_echo_test_when_idle():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint], echo_interval_s=0.05)
        await link.start()
        assert await link.wait_online(5)
        await issuer.wait_for(lambda: len(issuer.netmgmt("301")) >= 3)
        assert link.online
        echo = issuer.netmgmt("301")[0]
        assert echo["33"] == SWITCH_ID and len(echo["7"]) == 10
        assert link.stats.echoes >= 3
        await link.stop()
        await issuer.stop()
    run(main())


def test_unanswered_echo_takes_the_link_offline_and_it_reconnects():
    async def main():
        issuer = await FakeIssuer().start()
        issuer.silent_echo = True
        states = []
        link = make_link([issuer.endpoint], echo_interval_s=0.05, netmgmt_timeout_s=0.1,
                         on_state=lambda b, s: states.append(s))
        await link.start()
        await issuer.wait_for(lambda: len(issuer.netmgmt("001")) >= 2)
        assert OFFLINE in states[states.index(ONLINE):]
        issuer.silent_echo = False
        assert await link.wait_online(5)
        await link.stop()
        await issuer.stop()
    run(main())


def test_issuer_0800_is_answered_0810():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        issuer.send(issuer.writers[0], {"t": "0800", "7": "1128101010", "11": "424242", "70": "301"})
        await issuer.wait_for(lambda: issuer.answers)
        (ans,) = issuer.answers
        assert ans == {"t": "0810", "7": "1128101010", "11": "424242", "39": "00", "70": "301"}
        assert link.online
        await link.stop()
        await issuer.stop()
    run(main())


def test_unsolicited_request_without_handler_is_declined_12():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        issuer.send(issuer.writers[0], {"t": "0200", "3": "000000", "4": "000000000100",
                                        "11": "000777", "37": "ABC123456789", "41": "TERM0001"})
        await issuer.wait_for(lambda: issuer.answers)
        (ans,) = issuer.answers
        assert ans["t"] == "0210" and ans["39"] == "12"
        assert ans["11"] == "000777" and ans["37"] == "ABC123456789" and ans["4"] == "000000000100"
        await link.stop()
        await issuer.stop()
    run(main())


def test_unsolicited_request_goes_to_the_callback():
    async def main():
        issuer = await FakeIssuer().start()
        seen = []

        async def on_unsolicited(msg):
            seen.append(msg)
            await asyncio.sleep(0)
            return {"t": "0430", "11": msg["11"], "39": "00"}
        link = make_link([issuer.endpoint], on_unsolicited=on_unsolicited)
        await link.start()
        assert await link.wait_online(5)
        issuer.send(issuer.writers[0], {"t": "0420", "11": "000555", "37": "RRN000000001"})
        await issuer.wait_for(lambda: issuer.answers)
        assert seen[0]["t"] == "0420"
        assert issuer.answers[0]["t"] == "0430" and issuer.answers[0]["11"] == "000555"
        await link.stop()
        await issuer.stop()
    run(main())


# -- requests ------------------------------------------------------------------------

def test_requests_are_matched_out_of_order():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        issuer.hold = True
        reqs = [fin_request(1000 + i, "%012d" % (500 + i)) for i in range(20)]
        tasks = [asyncio.ensure_future(link.request(r, 5.0)) for r in reqs]
        await issuer.wait_for(lambda: len(issuer.held) == 20)
        stans = [r["11"] for r in reqs]                       # stamped in place
        assert len(set(stans)) == 20 and all(len(s) == 6 and s.isdigit() for s in stans)
        assert link.in_flight == 20
        issuer.release(order=lambda held: list(reversed(held)))
        responses = await asyncio.gather(*tasks)
        for r, resp in zip(reqs, responses):
            assert resp["t"] == "0210"
            assert resp["11"] == r["11"] and resp["37"] == r["37"] and resp["4"] == r["4"]
        assert link.in_flight == 0 and link.stats.responses == 21     # with the sign-on's
        await link.stop()
        await issuer.stop()
    run(main())


def test_response_with_another_rrn_or_class_does_not_match():
    async def main():
        issuer = await FakeIssuer().start()
        late = []
        link = make_link([issuer.endpoint], on_late=late.append)
        await link.start()
        assert await link.wait_online(5)
        issuer.hold = True
        req = fin_request(100, "000000000777")
        task = asyncio.ensure_future(link.request(req, 5.0))
        await issuer.wait_for(lambda: issuer.held)
        w, resp = issuer.held.pop()
        issuer.send(w, dict(resp, **{"37": "000000000778"}))       # wrong RRN
        issuer.send(w, dict(resp, t="0430"))                       # a reversal's answer
        issuer.send(w, resp)                                       # the real one
        assert (await task)["37"] == "000000000777"
        assert [m["37"] for m in late] == ["000000000778", "000000000777"]
        assert late[1]["t"] == "0430"
        await link.stop()
        await issuer.stop()
    run(main())


def test_reversal_advice_expects_0430():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        adv = dict(fin_request(100, "000000000900"), t="0420")
        resp = await link.request(adv, 5.0)
        assert resp["t"] == "0430" and resp["11"] == adv["11"]
        await link.stop()
        await issuer.stop()
    run(main())


def test_timeout_raises_and_the_late_answer_goes_to_on_late():
    async def main():
        issuer = await FakeIssuer().start()
        late = []
        link = make_link([issuer.endpoint], on_late=late.append)
        await link.start()
        assert await link.wait_online(5)
        issuer.hold = True
        req = fin_request(100, "000000000123")
        with pytest.raises(LinkTimeout):
            await link.request(req, 0.05)
        assert link.in_flight == 0 and link.stats.timeouts == 1
        issuer.release()
        await issuer.wait_for(lambda: True)
        for _ in range(100):
            if late:
                break
            await asyncio.sleep(0.01)
        assert len(late) == 1 and late[0]["11"] == req["11"] and late[0]["37"] == "000000000123"
        assert link.online
        await link.stop()
        await issuer.stop()
    run(main())


def test_link_down_at_once_when_the_issuer_is_unreachable():
    async def main():
        link = make_link([Endpoint("127.0.0.1", free_port())])
        await link.start()
        assert not await link.wait_online(0.2)
        req = fin_request(100, "000000000001")
        with pytest.raises(LinkDown):
            link.request_future(req, 5.0)        # raised at the call: nothing waits
        with pytest.raises(LinkDown):
            await link.request(req, 5.0)
        assert "11" not in req                   # nothing was stamped or sent
        assert link.stats.connect_failures >= 1 and link.stats.link_down == 2
        await link.stop()
        assert link.state == STOPPED
    run(main())


def test_link_down_before_start():
    async def main():
        link = make_link([Endpoint("127.0.0.1", free_port())])
        with pytest.raises(LinkDown):
            await link.request(fin_request(1, "1"), 1.0)
    run(main())


def test_reconnects_after_the_issuer_restarts():
    async def main():
        issuer = await FakeIssuer().start()
        port = issuer.port
        states = []
        link = make_link([issuer.endpoint], on_state=lambda b, s: states.append(s))
        await link.start()
        assert await link.wait_online(5)
        await issuer.stop()
        await wait_offline(link)
        with pytest.raises(LinkDown):
            await link.request(fin_request(1, "000000000001"), 1.0)
        issuer2 = await FakeIssuer(port=port).start()
        assert await link.wait_online(5)
        resp = await link.request(fin_request(2, "000000000002"), 5.0)
        assert resp["39"] == "00"
        assert issuer2.netmgmt("001") and states.count(ONLINE) == 2
        assert link.stats.sign_ons == 2
        await link.stop()
        await issuer2.stop()
    run(main())


def test_cycles_through_endpoints():
    async def main():
        issuer = await FakeIssuer().start()
        dead = Endpoint("127.0.0.1", free_port())
        link = make_link([dead, issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        assert link.endpoint == issuer.endpoint
        assert link.stats.connect_failures >= 1
        await link.stop()
        await issuer.stop()
    run(main())


def test_a_request_in_flight_survives_a_reconnect():
    """An answer may come on the next connection; until its timeout the request waits."""
    async def main():
        issuer = await FakeIssuer().start()
        port = issuer.port
        link = make_link([issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        issuer.hold = True
        task = asyncio.ensure_future(link.request(fin_request(5, "000000000005"), 10.0))
        await issuer.wait_for(lambda: issuer.held)
        _, resp = issuer.held.pop()
        await issuer.stop()
        await wait_offline(link)
        issuer2 = await FakeIssuer(port=port).start()
        assert await link.wait_online(5)
        assert not task.done()
        issuer2.send(issuer2.writers[0], resp)
        assert (await task)["37"] == "000000000005"
        await link.stop()
        await issuer2.stop()
    run(main())


def test_stop_fails_requests_still_in_flight():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        issuer.hold = True
        task = asyncio.ensure_future(link.request(fin_request(5, "000000000005"), 10.0))
        await issuer.wait_for(lambda: issuer.held)
        await link.stop(signoff_timeout_s=0.05)
        with pytest.raises(LinkTimeout):
            await task
        with pytest.raises(LinkDown):
            await link.request(fin_request(6, "000000000006"), 1.0)
        await issuer.stop()
    run(main())


def test_binary_dialect_4ascii_framing_and_tpdu_on_the_link():
    async def main():
        opts = LinkOptions(dialect="binary", framing="4ascii", header="6000010002")
        issuer = await FakeIssuer(options=opts).start()
        link = make_link([issuer.endpoint], options=opts)
        await link.start()
        assert await link.wait_online(5)
        req = dict(fin_request(42, "000000000042"), **{"52": "0123456789ABCDEF"})
        resp = await link.request(req, 5.0)
        assert resp["4"] == "000000000042"
        assert issuer.received[-1]["52"] == "0123456789ABCDEF"
        await link.stop()
        await issuer.stop()
    run(main())


def test_oversized_frame_from_the_issuer_drops_the_connection_and_it_reconnects():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        issuer.writers[0].write((5000).to_bytes(2, "big") + b"0810")
        await issuer.wait_for(lambda: len(issuer.netmgmt("001")) == 2)
        assert await link.wait_online(5)
        assert link.stats.framing_errors == 1
        await link.stop()
        await issuer.stop()
    run(main())


def test_many_concurrent_requests_have_unique_stans():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint], first_stan=999_950)
        await link.start()
        assert await link.wait_online(5)
        reqs = [fin_request(i, "%012d" % i) for i in range(300)]
        resps = await asyncio.gather(*(link.request(r, 5.0) for r in reqs))
        assert len({r["11"] for r in reqs}) == 300
        assert "000001" in {r["11"] for r in reqs}          # wrapped past 999999
        assert all(resp["37"] == r["37"] for r, resp in zip(reqs, resps))
        await link.stop()
        await issuer.stop()
    run(main())


def test_undecodable_request_from_the_issuer_is_answered_30():
    async def main():
        issuer = await FakeIssuer().start()
        link = make_link([issuer.endpoint])
        await link.start()
        assert await link.wait_online(5)
        raw, _ = iso8583.encode({"t": "0200", "3": "000000", "11": "000321", "41": "TERM0001",
                                 "60": "000001"}, ascii_spec)
        body = bytes(raw)[:-3]                                  # cut inside field 60
        issuer.writers[0].write(len(body).to_bytes(2, "big") + body)
        await issuer.wait_for(lambda: issuer.answers)
        (ans,) = issuer.answers
        assert ans["t"] == "0210" and ans["39"] == "30" and ans["11"] == "000321"
        assert link.stats.decode_errors == 1 and link.online
        await link.stop()
        await issuer.stop()
    run(main())
