"""IssuerHost over real TCP (free ports), persistence across restarts, and the day export.

Each host verifies PINs through a real HSM simulator on a free port
(test_issuer_sim_hsm.py covers the security checks over TCP)."""

from __future__ import annotations

import asyncio
import csv
import sqlite3
from pathlib import Path

import iso8583
import iso8583.specs
import pytest
import uvloop

from cardswitch.config import Card, Endpoint, HsmConfig, LinkOptions, Network, SwitchConfig
from cardswitch.hsm_sim.server import HsmServer
from cardswitch.crypto import mac_alg3
from cardswitch.iso8583.constants import RC, F
from cardswitch.iso8583.dialect import get_dialect
from cardswitch.iso8583.framing import FrameReader, Framing
from cardswitch.issuer_sim import ExportError, IssuerHost, export_day, run_banks
from cardswitch.issuer_sim.linkmac import add_mac, verify_mac
from cardswitch.issuer_sim.store import db_path
from test_issuer_sim_support import (
    CARDS,
    FRIEND,
    LIMITED,
    NOW,
    OTHER_BANK,
    POOR,
    RICH,
    SLOW,
    ZAK,
    field90,
    make_bank,
    pan,
    request,
    reversal,
)

ASCII = get_dialect("ascii")


def clock():
    return NOW


class Client:
    """A switch-side link for tests: our Dialect codec and framing over asyncio streams."""

    def __init__(self, reader, writer, framing=Framing(), dialect=ASCII, header=b""):
        self.r, self.w = reader, writer
        self.framing, self.dialect, self.header = framing, dialect, header
        self.frames = FrameReader(framing)
        self.pending: list[tuple[bytes, bytes]] = []

    @classmethod
    async def connect(cls, port: int, **kw) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, **kw)

    def send_raw(self, data: bytes) -> None:
        self.w.write(data)

    def send(self, msg: dict, mac_key: bytes | None = None) -> None:
        raw = add_mac(msg, self.dialect, mac_key) if mac_key else self.dialect.encode(msg)
        self.w.write(self.framing.encode(raw, self.header))

    async def frame(self) -> tuple[bytes, bytes]:
        while not self.pending:
            data = await asyncio.wait_for(self.r.read(65536), 10)
            if not data:
                raise ConnectionError("closed")
            self.pending.extend(self.frames.feed(data))
        return self.pending.pop(0)

    async def recv(self) -> dict:
        _, payload = await self.frame()
        return self.dialect.decode(payload)

    async def call(self, msg: dict) -> dict:
        self.send(msg)
        return await self.recv()

    async def close(self) -> None:
        self.w.close()
        try:
            await self.w.wait_closed()
        except ConnectionError:
            pass


async def started(tmp_path: Path, bank=None, *, with_hsm: bool = True, **kw) -> IssuerHost:
    """A started host; ``with_hsm``: with its own HSM simulator (port 0), stopped with it."""
    hsm = None
    if with_hsm and "hsm" not in kw:
        hsm = HsmServer()
        await hsm.start()
        kw["hsm"] = Endpoint("127.0.0.1", hsm.port)
    host = IssuerHost(bank or make_bank(), tmp_path, clock=clock, **kw)
    try:
        await host.start()
    except BaseException:
        if hsm is not None:
            await hsm.stop()
        raise
    host.hsm_server = hsm
    if hsm is not None:
        stop = host.stop

        async def stop_both() -> None:
            await stop()
            await hsm.stop()

        host.stop = stop_both
    return host


def balance(host: IssuerHost, card: str) -> int:
    return host.logic.account_for(card).balance


# -- over TCP -------------------------------------------------------------------------

@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_tcp_sign_on_purchase_and_out_of_order_answers(tmp_path, runner):
    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        try:
            r = await c.call({F.MTI: "0800", F.TRANSMISSION_DT: "0615100000", F.STAN: "000001",
                              F.NETWORK_MGMT_CODE: "001", F.FORWARDER_ID: "99900001"})
            assert r == {F.MTI: "0810", F.TRANSMISSION_DT: "0615100000", F.STAN: "000001",
                         F.NETWORK_MGMT_CODE: "001", F.FORWARDER_ID: "99900001", F.RESPONSE_CODE: "00"}
            buy = request("0200", "000000", RICH, 12_345, pin="1234")
            r = await c.call(buy)
            assert r[F.MTI] == "0210" and r[F.RESPONSE_CODE] == RC.APPROVED
            assert r[F.STAN] == buy[F.STAN] and r[F.RRN] == buy[F.RRN] and len(r[F.AUTH_CODE]) == 6
            assert balance(host, RICH) == 1_000_000 - 12_345
            # the slow card's answer waits; the other request's answer overtakes it
            slow = request("0200", "000000", SLOW, 100)
            fast = request("0200", "000000", RICH, 100)
            c.send(slow)
            c.send(fast)
            first, second = await c.recv(), await c.recv()
            assert (first[F.STAN], second[F.STAN]) == (fast[F.STAN], slow[F.STAN])
            assert first[F.RESPONSE_CODE] == second[F.RESPONSE_CODE] == RC.APPROVED
            # a pyiso8583 user sees a well-formed default_ascii response
            raw, _ = iso8583.encode(dict(request("0200", "000000", RICH, 5)), iso8583.specs.default_ascii)
            c.send_raw(Framing().encode(bytes(raw)))
            _, payload = await c.frame()
            doc, _ = iso8583.decode(payload, iso8583.specs.default_ascii)
            assert doc["t"] == "0210" and doc["39"] == "00" and len(doc["38"]) == 6
            # keep-alives get no answer
            c.send_raw(b"\x00\x00\x00\x00")
            r = await c.call(request("0200", "300000", RICH, None))
            assert r[F.RESPONSE_CODE] == RC.APPROVED and F.ADDITIONAL_AMOUNTS in r
        finally:
            await c.close()
            await host.stop()

    runner(main())


def test_tcp_many_in_flight_on_one_connection(tmp_path):
    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        try:
            msgs = [request("0200", "000000", RICH, 1) for _ in range(200)]
            for m in msgs:
                c.send(m)
            got = [await c.recv() for _ in msgs]
            assert sorted(r[F.STAN] for r in got) == sorted(m[F.STAN] for m in msgs)
            assert {r[F.RESPONSE_CODE] for r in got} == {RC.APPROVED}
            assert balance(host, RICH) == 1_000_000 - 200
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_tcp_bad_frames(tmp_path):
    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        other = await Client.connect(host.port)
        try:
            # MTI and field 11 readable, the rest truncated: 30
            raw = ASCII.encode(request("0200", "000000", RICH, 1, stan="000042"))
            cut = raw[:-5]
            c.send_raw(Framing().encode(cut))
            r = await c.recv()
            assert r[F.MTI] == "0210" and r[F.STAN] == "000042" and r[F.RESPONSE_CODE] == RC.FORMAT_ERROR
            # nothing readable: dropped, the connection stays usable
            c.send_raw(Framing().encode(b"hello"))
            r = await c.call(request("0200", "000000", RICH, 1, stan="000043"))
            assert r[F.STAN] == "000043" and r[F.RESPONSE_CODE] == RC.APPROVED
            # a handler failure answers 96 and serving goes on
            real = host.logic.handle
            host.logic.handle = lambda msg, now: 1 / 0
            r = await c.call(request("0200", "000000", RICH, 1, stan="000044"))
            assert r[F.STAN] == "000044" and r[F.RESPONSE_CODE] == RC.SYSTEM_MALFUNCTION
            host.logic.handle = real
            assert (await c.call(request("0200", "000000", RICH, 1)))[F.RESPONSE_CODE] == RC.APPROVED
            # an oversized frame closes that connection only
            c.send_raw(b"\xff\xff" + b"x" * 100)
            with pytest.raises(ConnectionError):
                await c.recv()
            assert (await other.call(request("0200", "000000", RICH, 1)))[F.RESPONSE_CODE] == RC.APPROVED
            assert host.bad_frames >= 3
        finally:
            await c.close()
            await other.close()
            await host.stop()

    asyncio.run(main())


def test_stop_answers_delayed_requests_first(tmp_path):
    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        slow = request("0200", "000000", SLOW, 100)
        c.send(slow)
        await asyncio.sleep(0.05)  # let the request arrive; its answer is due 300 ms after
        stopping = asyncio.ensure_future(host.stop())
        r = await c.recv()
        assert r[F.STAN] == slow[F.STAN] and r[F.RESPONSE_CODE] == RC.APPROVED
        await stopping
        with pytest.raises(ConnectionError):
            await c.recv()
        await c.close()

    asyncio.run(main())


def test_link_options_binary_4ascii_tpdu(tmp_path):
    link = LinkOptions(dialect="binary", framing="4ascii", header="6000010002")
    bank = make_bank(link=link)

    async def main():
        host = await started(tmp_path, bank)
        binary = get_dialect("binary")
        framing = Framing("4ascii", header_len=5)
        c = await Client.connect(host.port, framing=framing, dialect=binary, header=bytes.fromhex("6000010002"))
        try:
            c.send(request("0200", "000000", RICH, 100, pin="1234"))
            header, payload = await c.frame()
            assert header == bytes.fromhex("6000020001")  # source and destination swapped
            r = binary.decode(payload)
            assert r[F.RESPONSE_CODE] == RC.APPROVED
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_mac_on_the_link(tmp_path):
    bank = make_bank(zak=True)

    async def main():
        host = await started(tmp_path, bank)
        c = await Client.connect(host.port)
        try:
            # right MAC: processed, and the answer carries a MAC (128: it has a secondary bitmap)
            c.send(request("0200", "000000", RICH, 100), mac_key=ZAK)
            _, payload = await c.frame()
            r = ASCII.decode(payload)
            assert r[F.RESPONSE_CODE] == RC.APPROVED
            assert F.MAC_SECONDARY in r and verify_mac(payload, r, ASCII, ZAK)
            assert r[F.MAC_SECONDARY] == mac_alg3(ZAK, payload[:-16]).hex().upper()
            # wrong MAC: 63, nothing moves
            m = request("0200", "000000", RICH, 100)
            raw = bytearray(add_mac(m, ASCII, ZAK))
            raw[-1:] = b"0" if raw[-1:] != b"0" else b"1"
            c.send_raw(Framing().encode(bytes(raw)))
            r = await c.recv()
            assert r[F.RESPONSE_CODE] == RC.SECURITY_VIOLATION
            assert balance(host, RICH) == 1_000_000 - 100
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_run_banks_starts_every_simulated_bank(tmp_path):
    banks = (make_bank(bank_id="BANKA"), make_bank(bank_id="BANKB"),
             make_bank(bank_id="BANKC", simulate=False))

    async def main():
        hsm = HsmServer()
        await hsm.start()
        net = Network(switch=SwitchConfig(data_dir=str(tmp_path)),
                      hsm=HsmConfig(listen=Endpoint("127.0.0.1", hsm.port)), banks=banks, merchants=())
        seen = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(run_banks(net, ready=lambda hosts: seen.set_result(hosts)))
        hosts = await asyncio.wait_for(seen, 10)
        assert [h.bank.id for h in hosts] == ["BANKA", "BANKB"]
        for h in hosts:
            assert h.hsm == net.hsm.listen        # each bank verifies with the network's HSM
            c = await Client.connect(h.port)
            assert (await c.call(request("0200", "000000", RICH, 1)))[F.RESPONSE_CODE] == RC.APPROVED
            assert (await c.call(request("0200", "000000", RICH, 1, pin="1234")))[F.RESPONSE_CODE] == RC.APPROVED
            await c.close()
        assert hsm.stats.requests("EC") == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert db_path(tmp_path, "BANKA").exists() and db_path(tmp_path, "BANKB").exists()
        assert not db_path(tmp_path, "BANKC").exists()
        # a zero-argument ready and a subset of banks
        called = asyncio.Event()
        task = asyncio.ensure_future(run_banks(net, tmp_path, bank_ids=["BANKB"], ready=called.set))
        await asyncio.wait_for(called.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ValueError):
            await run_banks(net, tmp_path, bank_ids=["NOPE"])
        await hsm.stop()

    asyncio.run(main())


def test_port_in_use_is_a_clear_error(tmp_path):
    async def main():
        first = await started(tmp_path)
        try:
            bank = make_bank(port=first.port, bank_id="BANKB")
            with pytest.raises(OSError, match=f"BANKB: cannot listen on 127.0.0.1:{first.port}"):
                await IssuerHost(bank, tmp_path, hsm=first.hsm).start()
        finally:
            await first.stop()

    asyncio.run(main())


# -- persistence ----------------------------------------------------------------------

def test_restart_keeps_balances_holds_pin_tries_and_answers(tmp_path):
    newcomer = pan("622126000000010")

    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        buy = request("0200", "000000", RICH, 25_000)
        first = await c.call(buy)
        pre = request("0100", "000000", RICH, 100_000)
        assert (await c.call(pre))[F.RESPONSE_CODE] == RC.APPROVED
        for _ in range(2):
            assert (await c.call(request("0200", "000000", POOR, 1, pin="0000")))[F.RESPONSE_CODE] == RC.INCORRECT_PIN
        wd = request("0200", "010000", LIMITED, 40_000, pin="4321")
        assert (await c.call(wd))[F.RESPONSE_CODE] == RC.APPROVED
        await c.close()
        await host.stop()

        # restart with one more card in the file; balances in the file are ignored for known cards
        changed = tuple(Card(x.pan, x.expiry, x.pin, 5, x.currency, x.status, x.daily_withdrawal_limit,
                             x.delay_ms) for x in CARDS) + (Card(newcomer, "2812", "1234", 777),)
        host = await started(tmp_path, make_bank(cards=changed))
        c = await Client.connect(host.port)
        try:
            a = host.logic.account_for(RICH)
            assert (a.balance, a.held) == (975_000, 100_000)
            assert balance(host, newcomer) == 777
            # the repeat gets the very same answer (same auth code), nothing moves
            assert await c.call(dict(buy, **{F.MTI: "0201"})) == first
            assert balance(host, RICH) == 975_000
            # the third wrong PIN in a row still counts from before the restart
            assert (await c.call(request("0200", "000000", POOR, 1, pin="0000")))[F.RESPONSE_CODE] == RC.INCORRECT_PIN
            assert (await c.call(request("0200", "000000", POOR, 1, pin="1111")))[F.RESPONSE_CODE] == RC.PIN_TRIES_EXCEEDED
            # today's withdrawals too
            assert (await c.call(request("0200", "010000", LIMITED, 10_001, pin="4321")))[F.RESPONSE_CODE] \
                == RC.EXCEEDS_WITHDRAWAL_LIMIT
            # the hold completes, the purchase reverses
            comp = request("0200", "000000", RICH, 100_000, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
            assert (await c.call(comp))[F.RESPONSE_CODE] == RC.APPROVED
            assert (await c.call(reversal(buy)))[F.RESPONSE_CODE] == RC.APPROVED
            assert (a.balance, a.held) == (900_000, 0)
        finally:
            await c.close()
            await host.stop()

        host = await started(tmp_path)
        a = host.logic.account_for(RICH)
        assert (a.balance, a.held) == (900_000, 0)
        await host.stop()

    asyncio.run(main())


def test_evicted_records_are_found_in_storage(tmp_path):
    async def main():
        host = await started(tmp_path, max_cached=4)
        c = await Client.connect(host.port)
        try:
            buy = request("0200", "000000", RICH, 5_000)
            first = await c.call(buy)
            for _ in range(10):
                await c.call(request("0200", "000000", RICH, 1))
            assert len(host.logic._cache) <= 4
            assert await c.call(dict(buy, **{F.MTI: "0201"})) == first
            assert (await c.call(reversal(buy)))[F.RESPONSE_CODE] == RC.APPROVED
            assert balance(host, RICH) == 1_000_000 - 10
            assert (await c.call(reversal(buy)))[F.RESPONSE_CODE] == RC.APPROVED
            assert balance(host, RICH) == 1_000_000 - 10
            late = request("0200", "000000", RICH, 7)
            late_answer = await c.call(late)
        finally:
            await c.close()
            await host.stop()
        # after a restart that loads only the newest records, older ones are still found
        host = await started(tmp_path, max_cached=4)
        assert not host.logic.complete
        c = await Client.connect(host.port)
        try:
            assert await c.call(dict(buy, **{F.MTI: "0201"})) == first
            assert await c.call(dict(late, **{F.MTI: "0201"})) == late_answer
            assert balance(host, RICH) == 1_000_000 - 17
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_read_timeout_closes_a_stalled_connection(tmp_path):
    bank = make_bank(link=LinkOptions(read_timeout_ms=100))

    async def main():
        host = await started(tmp_path, bank)
        c = await Client.connect(host.port)
        try:
            c.send_raw(b"\x00\x40" + b"0200")  # a frame begun, never finished
            with pytest.raises(ConnectionError):
                await c.recv()
            other = await Client.connect(host.port)
            assert (await other.call(request("0200", "000000", RICH, 1)))[F.RESPONSE_CODE] == RC.APPROVED
            await other.close()
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_database_holds_no_full_pan_pin_or_pin_block(tmp_path):
    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        m = request("0200", "400000", RICH, 100, pin="1234", **{F.ACCOUNT_2: FRIEND})
        await c.call(m)
        await c.close()
        await host.stop()
        return m[F.PIN_BLOCK]

    block = asyncio.run(main())
    blob = b"".join(p.read_bytes() for p in (tmp_path / "banks").iterdir())
    for card in CARDS:
        assert card.pan.encode() not in blob
    assert block.encode() not in blob and block.lower().encode() not in blob
    con = sqlite3.connect(db_path(tmp_path, "BANKA"))
    cols = [r[1] for r in con.execute("PRAGMA table_info(cards)")]
    assert "pin" not in cols and "pvv" in cols and "pin_offset" in cols
    con.close()
    # nor a clear key (the PVK, CVK and MK-AC are used at start-up or handed to the HSM)
    bank = make_bank()
    for k in (bank.zpk, bank.pvk, bank.cvk, bank.mk_ac):
        assert k.text[6:].encode() not in blob and k.text[6:].lower().encode() not in blob


# -- export -----------------------------------------------------------------------------

def test_export_day(tmp_path):
    out = tmp_path / "out" / "BANKA.csv"

    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        try:
            async def ok(m):
                r = await c.call(m)
                assert r[F.RESPONSE_CODE] == RC.APPROVED, (m[F.PROC], r[F.RESPONSE_CODE])
                return r

            def req(proc, card, amount, rrn, **kw):
                return request("0200", proc, card, amount, rrn=rrn, **kw)

            expected = {}
            buy = req("000000", RICH, 1_000, "000000000009")
            r = await ok(buy)
            expected["000000000009"] = ("1000", r[F.AUTH_CODE], buy[F.STAN], "000000", "purchase")
            voided = req("000000", RICH, 2_000, "000000000002")
            await ok(voided)
            await ok(req("020000", RICH, 2_000, "000000000003", **{F.ORIGINAL_DATA: field90(voided)}))
            reversed_ = req("000000", RICH, 3_000, "000000000004")
            await ok(reversed_)
            await ok(reversal(reversed_))
            pre = request("0100", "000000", RICH, 5_000, rrn="000000000005")
            await ok(pre)
            comp = req("000000", RICH, 4_500, "000000000006",
                       **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
            r = await ok(comp)
            expected["000000000006"] = ("4500", r[F.AUTH_CODE], comp[F.STAN], "000000", "completion")
            for rrn, proc, kind, kw in (
                ("000000000007", "010000", "withdrawal", {"pin": "1234"}),
                ("000000000008", "500000", "bill_payment", {}),
                ("000000000001", "200000", "refund", {}),
                ("000000000010", "210000", "deposit", {"pin": "1234"}),
                ("000000000011", "400000", "transfer_out", {F.ACCOUNT_2: OTHER_BANK}),
            ):
                m = req(proc, RICH, 600, rrn, **kw)
                r = await ok(m)
                expected[rrn] = ("600", r[F.AUTH_CODE], m[F.STAN], proc, kind)
            m = req("280000", FRIEND, 700, "000000000012")
            r = await ok(m)
            expected["000000000012"] = ("700", r[F.AUTH_CODE], m[F.STAN], "280000", "transfer_in")
            adv = request("0220", "000000", POOR, 9_000, rrn="000000000013", **{F.AUTH_CODE: "S00001"})
            await ok(adv)
            expected["000000000013"] = ("9000", "S00001", adv[F.STAN], "000000", "purchase")
            # not exported: declines, balance inquiries, another business date
            assert (await c.call(req("000000", POOR, 99_999, "000000000014")))[F.RESPONSE_CODE] == RC.INSUFFICIENT_FUNDS
            await ok(req("300000", RICH, None, "000000000015"))
            await ok(req("000000", RICH, 10, "000000000016", f15="0614"))
            # exported while the bank runs
            n = export_day(tmp_path, "BANKA", "2025-06-15", out)
            assert n == len(expected)
        finally:
            await c.close()
            await host.stop()
        return expected

    expected = asyncio.run(main())
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["rrn", "amount", "auth_code", "stan", "pan_masked", "processing_code", "business_date", "kind"]
    body = rows[1:]
    assert [r[0] for r in body] == sorted(expected)
    for r in body:
        amount, auth, stan, proc, kind = expected[r[0]]
        assert r[1:4] == [amount, auth, stan]
        assert r[5:] == [proc, "2025-06-15", kind]
        assert "*" in r[4] and len(r[4]) == 16
    # and once more with the bank stopped: the same bytes
    first = out.read_bytes()
    assert export_day(tmp_path, "BANKA", "2025-06-15", out) == len(expected)
    assert out.read_bytes() == first
    assert export_day(tmp_path, "BANKA", "2025-06-14", tmp_path / "d14.csv") == 1


def test_export_errors(tmp_path):
    with pytest.raises(ExportError, match="NOBANK"):
        export_day(tmp_path, "NOBANK", "2025-06-15", tmp_path / "x.csv")
    with pytest.raises(ExportError, match="YYYY-MM-DD"):
        export_day(tmp_path, "BANKA", "15/06/2025", tmp_path / "x.csv")
    assert not (tmp_path / "banks").exists()
