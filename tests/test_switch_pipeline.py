"""The transaction pipeline end to end, without sockets.

A real ``Context`` from the default network, a real ``Journal`` on tmp_path,
and one fake bank link per bank: ``reserve_stan()`` gives the link's next
STAN (the pipeline journals it before sending), ``request(msg, timeout_s,
stan=)`` sends with it (as ``BankLink`` does), keeps a copy of what was sent
and answers from a script (an 0x10 dict, or it raises ``LinkDown`` /
``LinkTimeout``). Reversals go through the store-and-forward queue:
``pipeline.drain()`` waits for their delivery. pytest-asyncio is not
installed: each test runs one ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import pytest

from cardswitch.iso8583.constants import RC, F, response_mti
from cardswitch.iso8583.fields import format_field90, parse_field90
from cardswitch.merchants.registry import Registry
from cardswitch.netfile import load_network
from cardswitch.routing.bintable import BinTable
from cardswitch.switch import steps
from cardswitch.switch.banklink import LinkDown, LinkTimeout
from cardswitch.switch.clock import RrnAllocator
from cardswitch.switch.index import BatchTotals, TxnIndex
from cardswitch.switch.journal import Journal
from cardswitch.switch.pipeline import PinError, Pipeline
from cardswitch.switch.records import Cancel, Kind, Status
from cardswitch.switch.steps import Context

BUSINESS_DATE = "2026-03-14"
DAY = datetime(2026, 3, 14, 10, 0, tzinfo=timezone.utc)
SWITCH_INST = "99900001"
BANKA_INST, BANKB_INST = "10000001", "10000002"

POS, POS_MID = "POS00001", "898440158120001"      # acquired by BANKA
ATM, ATM_MID = "ATM00001", "898440160110001"
CARD_A = "6221260000000018"                       # BANKA
CARD_A2 = "6221260000000026"                      # BANKA
CARD_B = "6228480000000015"                       # BANKB
PIN_BLOCK = "0123456789ABCDEF"
ZPK_BLOCK = "FEDCBA9876543210"


@pytest.fixture(scope="module")
def network():
    return load_network(None)


# -- fakes ---------------------------------------------------------------------------------

Script = Callable[[dict], "dict | BaseException"]


def approve(msg: dict) -> dict:
    return {F.RESPONSE_CODE: RC.APPROVED, F.AUTH_CODE: "A" + msg[F.STAN][-5:]}


class FakeLink:
    """Stands in for BankLink: reserves and stamps 11, records what was sent,
    answers from a script. Always online (the store-and-forward worker asks)."""

    online = True

    def __init__(self, bank_id: str) -> None:
        self.bank_id = bank_id
        self.script: Script = approve
        self.sent: list[dict] = []
        self._stan = itertools.count(1)
        self.gate: asyncio.Event | None = None        # when set up: answers wait for it
        self.arrived: asyncio.Event | None = None     # set when a request arrives

    def mtis(self) -> list[str]:
        return [m[F.MTI] for m in self.sent]

    def advices(self) -> list[dict]:
        return [m for m in self.sent if m[F.MTI] in ("0420", "0421")]

    def reserve_stan(self) -> str:
        return f"{next(self._stan):06d}"

    async def wait_online(self, timeout: float | None = None) -> bool:
        return self.online

    async def request(self, msg: dict, timeout_s: float, stan: str | None = None) -> dict:
        msg[F.STAN] = stan or self.reserve_stan()
        result = self.script(msg)
        if isinstance(result, LinkDown):          # nothing sent
            raise result
        self.sent.append(dict(msg))
        if self.arrived is not None:
            self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(result, BaseException):
            raise result
        resp = {F.MTI: response_mti(msg[F.MTI]), F.STAN: msg[F.STAN], F.RRN: msg.get(F.RRN, "")}
        resp.update(result)
        return resp


class Harness:
    def __init__(self, tmp_path, network) -> None:
        self.tmp_path = tmp_path
        self.journal = Journal.open("sqlite:///" + str(tmp_path / "j.db"), str(tmp_path))
        index = TxnIndex()                         # rebuilt from the journal, as SwitchApp.start does
        index.mark_closed(self.journal.closed_batches())
        for rec in self.journal.load_for_recovery([BUSINESS_DATE]):
            index.add(rec)
        self.ctx = Context(network=network, registry=Registry.from_network(network),
                           bins=BinTable.from_network(network), index=index,
                           token_secret=b"pipeline-test-secret", business_date=BUSINESS_DATE)
        self.links = {b.id: FakeLink(b.id) for b in network.banks}
        self.pin_calls: list[tuple] = []
        self.pin_error: str | None = None
        marks: dict[str, int] = {}

        def reserve(prefix: str, wanted: int) -> int:
            marks[prefix] = max(marks.get(prefix, 0), wanted)
            return marks[prefix]

        rrn = RrnAllocator(reserve)
        self.pipeline = Pipeline(self.ctx, self.journal, self.links, rrn=lambda: rrn.next(DAY),
                                 translate_pin=self.translate_pin, issuer_timeout_s=0.5)

    async def translate_pin(self, block, info, bank, pan):
        self.pin_calls.append((block, info.terminal_id, bank.id, pan))
        if self.pin_error:
            raise PinError(self.pin_error)
        return ZPK_BLOCK

    async def handle(self, msg: dict) -> dict | None:
        return await self.pipeline.handle(dict(msg))

    def rows(self):
        return self.journal.rows()

    def row(self, rec_id: int):
        return self.journal.get(rec_id)

    def close(self) -> None:
        self.journal.close()


def run(tmp_path, network, body: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        h = Harness(tmp_path, network)
        try:
            await body(h)
        finally:
            await h.pipeline.drain()
            await h.pipeline.stop()
            h.close()

    asyncio.run(main())


# -- requests ----------------------------------------------------------------------------------


def request(mti: str = "0200", proc: str = "000000", *, stan: str = "000001", amount: int | None = 1000,
            pan: str | None = CARD_A, tid: str = POS, mid: str = POS_MID, batch: str = "000001",
            transmitted: str | None = None, **extra: str) -> dict[str, str]:
    msg = {
        F.MTI: mti, F.PROC: proc, F.TRANSMISSION_DT: transmitted or f"03141015{int(stan) % 60:02d}",
        F.STAN: stan, F.LOCAL_TIME: "181500", F.LOCAL_DATE: "0314", F.ENTRY_MODE: "021",
        F.CONDITION_CODE: "00", F.TERMINAL_ID: tid, F.MERCHANT_ID: mid, F.CURRENCY: "156",
        F.BATCH_NUMBER: batch,
    }
    if pan is not None:
        msg[F.PAN] = pan
    if amount is not None:
        msg[F.AMOUNT] = f"{amount:012d}"
    msg.update(extra)
    return msg


def original_of(req: dict) -> str:
    """Field 90 as the terminal writes it for its earlier request ``req``."""
    return format_field90(req[F.MTI], req[F.STAN], req[F.TRANSMISSION_DT], BANKA_INST, "0")


def reversal(orig: dict, stan: str, mti: str = "0400") -> dict:
    return {F.MTI: mti, F.PROC: orig[F.PROC], F.AMOUNT: orig.get(F.AMOUNT, "000000000000"),
            F.TRANSMISSION_DT: f"03141020{int(stan) % 60:02d}", F.STAN: stan,
            F.TERMINAL_ID: orig[F.TERMINAL_ID], F.MERCHANT_ID: orig[F.MERCHANT_ID],
            F.CURRENCY: "156", F.BATCH_NUMBER: orig[F.BATCH_NUMBER], F.ORIGINAL_DATA: original_of(orig)}


def void(orig: dict, stan: str, **kw) -> dict:
    args = dict(amount=int(orig[F.AMOUNT]), pan=orig.get(F.PAN)) | kw
    return request("0200", "020000", stan=stan, **args, **{F.ORIGINAL_DATA: original_of(orig)})


def completion(preauth: dict, stan: str, amount: int) -> dict:
    return request("0200", "000000", stan=stan, amount=amount,
                   **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: original_of(preauth)})


def batch_close(totals: tuple[int, int, int, int], stan: str, proc: str = "920000", batch: str = "000001",
                tid: str = POS, mid: str = POS_MID) -> dict:
    cn, ca, dn, da = totals
    return {F.MTI: "0500", F.PROC: proc, F.TRANSMISSION_DT: f"03142300{int(stan) % 60:02d}", F.STAN: stan,
            F.TERMINAL_ID: tid, F.MERCHANT_ID: mid, F.BATCH_NUMBER: batch,
            F.CREDITS_NUMBER: f"{cn:010d}", F.CREDITS_AMOUNT: f"{ca:016d}",
            F.DEBITS_NUMBER: f"{dn:010d}", F.DEBITS_AMOUNT: f"{da:016d}"}


def the_record(h: Harness, req: dict):
    """The in-memory record of a request the switch indexed."""
    return h.ctx.index.find(req[F.TERMINAL_ID], req[F.STAN], req[F.TRANSMISSION_DT], req[F.MTI])


async def settle_background(h: Harness) -> None:
    await h.pipeline.drain()


# -- approval and the issuer's answers ---------------------------------------------------------


def test_purchase_approved_and_journaled(tmp_path, network):
    async def body(h: Harness):
        req = request(stan="000011")
        resp = await h.handle(req)
        bank = h.links["BANKA"]
        assert bank.mtis() == ["0200"]
        out = bank.sent[0]
        assert out[F.PAN] == CARD_A and out[F.PROC] == "000000" and out[F.AMOUNT] == "000000001000"
        assert (out[F.ACQUIRER_ID], out[F.FORWARDER_ID], out[F.RECEIVING_ID]) == (BANKA_INST, SWITCH_INST,
                                                                                 BANKA_INST)
        assert out[F.SETTLEMENT_DATE] == "0314"
        assert out[F.MCC] == "5812" and len(out[F.CARD_ACCEPTOR_NAME]) == 40   # filled from the registry
        assert len(out[F.RRN]) == 12 and out[F.RRN].startswith("6073")
        assert not any(h.links[b].sent for b in ("BANKB", "BANKC"))

        assert resp[F.MTI] == "0210" and resp[F.RESPONSE_CODE] == RC.APPROVED
        assert resp[F.AUTH_CODE] == "A00001"
        assert resp[F.RRN] == out[F.RRN]
        assert resp[F.SETTLEMENT_DATE] == "0314"
        for k in (F.PAN, F.PROC, F.AMOUNT, F.TRANSMISSION_DT, F.STAN, F.LOCAL_TIME, F.LOCAL_DATE,
                  F.TERMINAL_ID, F.MERCHANT_ID, F.CURRENCY, F.BATCH_NUMBER):
            assert resp[k] == req[k], k

        (row,) = h.rows()
        assert row.status == Status.APPROVED and row.response_code == RC.APPROVED
        assert row.rrn == out[F.RRN] and row.auth_code == "A00001"
        assert row.issuer_stan == out[F.STAN] and row.issuer_transmitted == out[F.TRANSMISSION_DT]
        assert (row.kind, row.amount, row.issuer_id, row.acquirer_id) == \
            (Kind.PURCHASE, 1000, "BANKA", "BANKA")
        assert row.pan_masked == "622126******0018" and row.business_date == BUSINESS_DATE
        assert CARD_A not in repr(row)
        h.journal.flush()
        for name in os.listdir(h.tmp_path):
            if name.startswith("j.db"):
                assert CARD_A.encode() not in (h.tmp_path / name).read_bytes(), name

    run(tmp_path, network, body)


def test_pin_block_is_translated_for_the_issuer(tmp_path, network):
    async def body(h: Harness):
        resp = await h.handle(request(stan="000012", **{F.PIN_BLOCK: PIN_BLOCK}))
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        assert h.pin_calls == [(PIN_BLOCK, POS, "BANKA", CARD_A)]
        assert h.links["BANKA"].sent[0][F.PIN_BLOCK] == ZPK_BLOCK
        assert F.PIN_BLOCK not in resp

    run(tmp_path, network, body)


def test_pin_translation_failure_answers_its_code_and_sends_nothing(tmp_path, network):
    async def body(h: Harness):
        h.pin_error = RC.INCORRECT_PIN
        resp = await h.handle(request(stan="000013", **{F.PIN_BLOCK: PIN_BLOCK}))
        assert resp[F.RESPONSE_CODE] == RC.INCORRECT_PIN
        assert h.links["BANKA"].sent == []
        (row,) = h.rows()
        assert row.status == Status.DECLINED and row.response_code == RC.INCORRECT_PIN

    run(tmp_path, network, body)


def test_issuer_decline_is_passed_on_without_auth_code(tmp_path, network):
    async def body(h: Harness):
        h.links["BANKA"].script = lambda m: {F.RESPONSE_CODE: RC.INSUFFICIENT_FUNDS, F.AUTH_CODE: "XXXXXX"}
        resp = await h.handle(request(stan="000014"))
        assert resp[F.RESPONSE_CODE] == RC.INSUFFICIENT_FUNDS and F.AUTH_CODE not in resp
        (row,) = h.rows()
        assert (row.status, row.response_code, row.auth_code) == (Status.DECLINED, "51", "")

    run(tmp_path, network, body)


def test_balance_inquiry_returns_field_54(tmp_path, network):
    balance = "0002156C000000100000"

    async def body(h: Harness):
        h.links["BANKA"].script = lambda m: {F.RESPONSE_CODE: "00", F.ADDITIONAL_AMOUNTS: balance}
        resp = await h.handle(request(proc="300000", stan="000015", amount=None))
        assert resp[F.RESPONSE_CODE] == RC.APPROVED and resp[F.ADDITIONAL_AMOUNTS] == balance
        assert h.ctx.index.totals(POS, "000001") == BatchTotals()

    run(tmp_path, network, body)


def test_link_down_is_91_declined(tmp_path, network):
    async def body(h: Harness):
        h.links["BANKA"].script = lambda m: LinkDown("BANKA is offline")
        resp = await h.handle(request(stan="000021"))
        assert resp[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE and F.AUTH_CODE not in resp
        assert F.RRN in resp
        (row,) = h.rows()
        assert (row.status, row.response_code) == (Status.DECLINED, RC.ISSUER_INOPERATIVE)

    run(tmp_path, network, body)


def test_link_timeout_is_91_status_timeout(tmp_path, network):
    async def body(h: Harness):
        h.links["BANKA"].script = lambda m: LinkTimeout("no answer")
        resp = await h.handle(request(stan="000022"))
        assert resp[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
        (row,) = h.rows()
        assert (row.status, row.response_code) == (Status.TIMEOUT, RC.ISSUER_INOPERATIVE)
        assert row.issuer_stan == h.links["BANKA"].sent[0][F.STAN]     # sent: the issuer may have acted

    run(tmp_path, network, body)


def test_link_timeout_is_followed_by_a_reversal_advice(tmp_path, network):
    # The issuer may have approved what the terminal never saw: the switch undoes it
    # (default_network.toml issuer_timeout_ms: "91 to the terminal, then a reversal").
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.script = lambda m: LinkTimeout("no answer") if m[F.MTI] == "0200" else {F.RESPONSE_CODE: "00"}
        req = request(stan="000023")
        await h.handle(req)
        await settle_background(h)
        (adv,) = bank.advices()
        sent = bank.sent[0]
        assert adv[F.ORIGINAL_DATA] == ("0200" + sent[F.STAN] + sent[F.TRANSMISSION_DT]
                                        + BANKA_INST.zfill(11) + SWITCH_INST.zfill(11))
        assert the_record(h, req).cancelled == Cancel.REVERSED
        (row,) = h.rows()
        assert row.status == Status.TIMEOUT and row.cancelled == Cancel.REVERSED

    run(tmp_path, network, body)


def test_no_link_for_the_bank_is_91(tmp_path, network):
    async def body(h: Harness):
        del h.links["BANKA"]
        resp = await h.handle(request(stan="000024"))
        assert resp[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE

    run(tmp_path, network, body)


def test_track2_only_request(tmp_path, network):
    async def body(h: Harness):
        track2 = CARD_A + "=30121010000000000000"
        req = request(stan="000025", pan=None, **{F.TRACK2: track2})
        resp = await h.handle(req)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        out = h.links["BANKA"].sent[0]
        assert out[F.PAN] == CARD_A and out[F.EXPIRY] == "3012" and out[F.TRACK2] == track2
        assert F.PAN not in resp and F.TRACK2 not in resp
        (row,) = h.rows()
        assert row.pan_masked == "622126******0018" and track2 not in repr(row)

    run(tmp_path, network, body)


# -- local declines and the order of checks ------------------------------------------------------


@pytest.mark.parametrize("change, rc", [
    ({"tid": "POS99999", "pan": "6221260000000019"}, RC.INVALID_MERCHANT),      # 03 before 14
    ({"proc": "010000", "amount": 0}, RC.NOT_PERMITTED_TERMINAL),               # 58 before 13
    ({"pan": "6221260000000019", "amount": 0}, RC.INVALID_CARD),                # 14 before 13
    ({"pan": "4111111111111111"}, RC.NO_SUCH_ISSUER),
    ({"amount": 0}, RC.INVALID_AMOUNT),
    ({"proc": "400000", F.ACCOUNT_2: "4111111111111111"}, RC.NO_SUCH_ACCOUNT),
    ({"proc": "020000", "pan": "4111111111111111",
      F.ORIGINAL_DATA: format_field90("0200", "000999", "0314100000", BANKA_INST, "0")},
     RC.ORIGINAL_NOT_FOUND),                                                     # 25 before 15
    ({F.AMOUNT: "00000000ABCD"}, RC.FORMAT_ERROR),
    ({F.TRANSMISSION_DT: "0231101500"}, RC.FORMAT_ERROR),
])
def test_local_declines_never_reach_an_issuer(tmp_path, network, change, rc):
    async def body(h: Harness):
        args = {k: v for k, v in change.items() if k in ("tid", "proc", "amount", "pan")}
        extra = {k: v for k, v in change.items() if k not in args}
        req = request(stan="000031", **args)
        req.update(extra)
        resp = await h.handle(req)
        assert resp[F.MTI] == "0210" and resp[F.RESPONSE_CODE] == rc
        assert resp[F.STAN] == "000031"
        assert not any(link.sent for link in h.links.values())
        assert F.AUTH_CODE not in resp
        (row,) = h.rows()
        assert row.status == Status.DECLINED and row.response_code == rc

    run(tmp_path, network, body)


def test_format_error_echoes_what_it_could_read(tmp_path, network):
    async def body(h: Harness):
        req = request(stan="000032", **{F.AMOUNT: "00000000ABCD"})
        resp = await h.handle(req)
        assert resp[F.RESPONSE_CODE] == RC.FORMAT_ERROR
        for k in (F.PAN, F.PROC, F.AMOUNT, F.TRANSMISSION_DT, F.STAN, F.TERMINAL_ID, F.MERCHANT_ID,
                  F.BATCH_NUMBER):
            assert resp[k] == req[k], k
        missing = request(stan="000033")
        del missing[F.TERMINAL_ID]
        resp = await h.handle(missing)
        assert resp[F.RESPONSE_CODE] == RC.FORMAT_ERROR and resp[F.STAN] == "000033"

    run(tmp_path, network, body)


def test_closed_batch_is_12(tmp_path, network):
    async def body(h: Harness):
        h.ctx.index.close_batch(POS, "000001")
        resp = await h.handle(request(stan="000034"))
        assert resp[F.RESPONSE_CODE] == RC.INVALID_TRANSACTION
        resp = await h.handle(request(stan="000035", batch="000002"))
        assert resp[F.RESPONSE_CODE] == RC.APPROVED

    run(tmp_path, network, body)


# -- duplicates and repeats (wire.md 6a) ---------------------------------------------------------


def test_duplicate_is_94_and_not_sent(tmp_path, network):
    async def body(h: Harness):
        req = request(stan="000041")
        first = await h.handle(req)
        second = await h.handle(req)
        assert first[F.RESPONSE_CODE] == RC.APPROVED
        assert second[F.RESPONSE_CODE] == RC.DUPLICATE and F.AUTH_CODE not in second
        assert h.links["BANKA"].mtis() == ["0200"]
        assert the_record(h, req).status == Status.APPROVED
        # Same STAN, another field 7: a new transaction.
        third = await h.handle(request(stan="000041", transmitted="0314111111"))
        assert third[F.RESPONSE_CODE] == RC.APPROVED
        assert len(h.links["BANKA"].sent) == 2

    run(tmp_path, network, body)


def test_repeat_gets_the_very_same_response(tmp_path, network):
    async def body(h: Harness):
        req = request(stan="000042")
        first = await h.handle(req)
        rows_before = len(h.rows())
        again = await h.handle(dict(req, t="0201"))
        assert again == first
        assert again is not first
        assert h.links["BANKA"].mtis() == ["0200"]
        assert len(h.rows()) == rows_before

    run(tmp_path, network, body)


def test_repeat_of_a_declined_request_replays_the_decline(tmp_path, network):
    async def body(h: Harness):
        h.links["BANKA"].script = lambda m: {F.RESPONSE_CODE: RC.DO_NOT_HONOUR}
        req = request(stan="000043")
        first = await h.handle(req)
        h.links["BANKA"].script = approve
        again = await h.handle(dict(req, t="0201"))
        assert again == first and again[F.RESPONSE_CODE] == RC.DO_NOT_HONOUR
        assert len(h.links["BANKA"].sent) == 1

    run(tmp_path, network, body)


def test_repeat_never_received_is_processed_as_the_original(tmp_path, network):
    async def body(h: Harness):
        resp = await h.handle(request("0201", stan="000044"))
        assert resp[F.MTI] == "0210" and resp[F.RESPONSE_CODE] == RC.APPROVED
        assert h.links["BANKA"].mtis() == ["0200"]
        again = await h.handle(request("0201", stan="000044"))
        assert again == resp and len(h.links["BANKA"].sent) == 1

    run(tmp_path, network, body)


def test_repeat_while_the_original_is_in_flight_waits_for_its_answer(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.gate, bank.arrived = asyncio.Event(), asyncio.Event()
        req = request(stan="000045")
        first = asyncio.create_task(h.handle(req))
        await asyncio.wait_for(bank.arrived.wait(), 10)   # bounded: a broken pipeline fails, never hangs
        repeat = asyncio.create_task(h.handle(dict(req, t="0201")))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not repeat.done()
        bank.gate.set()
        assert await repeat == await first
        assert len(bank.sent) == 1

    run(tmp_path, network, body)


@pytest.mark.parametrize("change, rc", [
    ({"amount": 0}, RC.INVALID_AMOUNT),
    ({"pan": "6221260000000019"}, RC.INVALID_CARD),
    ({"proc": "010000"}, RC.NOT_PERMITTED_TERMINAL),
    ({"tid": "POS99999"}, RC.INVALID_MERCHANT),
    ({"pan": "4111111111111111"}, RC.NO_SUCH_ISSUER),
])
def test_resend_of_a_locally_declined_request_is_94(tmp_path, network, change, rc):
    # wire.md 6a: "as one already received that day", whatever its answer was.
    async def body(h: Harness):
        req = request(stan="000046", **change)
        first = await h.handle(req)
        assert first[F.RESPONSE_CODE] == rc
        second = await h.handle(req)
        assert second[F.RESPONSE_CODE] == RC.DUPLICATE
        assert not any(link.sent for link in h.links.values())
        repeat = await h.handle(dict(req, t="0201"))
        assert repeat == first

    run(tmp_path, network, body)


def test_repeat_after_batch_close_gets_the_same_response(tmp_path, network):
    # The replay comes before the batch check: a repeat changes nothing and answers as before.
    async def body(h: Harness):
        req = request(stan="000047")
        first = await h.handle(req)
        close = await h.handle(batch_close((0, 0, 1, 1000), stan="000048"))
        assert close[F.RESPONSE_CODE] == RC.APPROVED
        again = await h.handle(dict(req, t="0201"))
        assert again == first

    run(tmp_path, network, body)


def test_duplicate_does_not_hide_its_original_after_restart(tmp_path, network):
    # The 94 answer to a duplicate is journaled under its original's key; rebuilding the
    # index from the journal must keep the original findable (its reversal still undoes it).
    async def body(h: Harness):
        req = request(stan="000049")
        assert (await h.handle(req))[F.RESPONSE_CODE] == RC.APPROVED
        assert (await h.handle(req))[F.RESPONSE_CODE] == RC.DUPLICATE
        issuer_stan = h.links["BANKA"].sent[0][F.STAN]
        await h.pipeline.drain()
        await h.pipeline.stop()
        h.close()
        h2 = Harness(tmp_path, network)                      # restart on the same journal
        try:
            assert the_record(h2, req).status == Status.APPROVED
            resp = await h2.handle(reversal(req, stan="000050"))
            assert resp[F.RESPONSE_CODE] == RC.APPROVED
            await h2.pipeline.drain()
            (adv,) = h2.links["BANKA"].advices()
            assert parse_field90(adv[F.ORIGINAL_DATA]).stan == issuer_stan
        finally:
            await h2.pipeline.drain()
            await h2.pipeline.stop()
            h2.close()

    async def main():
        h = Harness(tmp_path, network)
        try:
            await body(h)
        finally:
            await h.pipeline.stop()
            h.close()

    asyncio.run(main())


def test_request_rrn_is_kept(tmp_path, network):
    # wire.md 4: 37 is "assigned by the switch when the request has none".
    async def body(h: Harness):
        resp = await h.handle(request(stan="000051", **{F.RRN: "123456789012"}))
        assert resp[F.RRN] == "123456789012"
        assert h.links["BANKA"].sent[0][F.RRN] == "123456789012"
        declined = await h.handle(request(stan="000052", amount=0, **{F.RRN: "123456789013"}))
        assert declined[F.RRN] == "123456789013"
        own = await h.handle(request(stan="000053"))
        assert own[F.RRN] != "123456789012" and len(own[F.RRN]) == 12

    run(tmp_path, network, body)


# -- reversals (wire.md 6a, 8) ------------------------------------------------------------------------


def test_reversal_sends_0420_naming_the_switch_to_issuer_original(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        req = request(stan="000061", amount=2500)
        await h.handle(req)
        orig_out = dict(bank.sent[0])
        rev = reversal(req, stan="000062")
        resp = await h.handle(rev)
        assert resp[F.MTI] == "0410" and resp[F.RESPONSE_CODE] == RC.APPROVED
        assert resp[F.ORIGINAL_DATA] == rev[F.ORIGINAL_DATA] and resp[F.STAN] == "000062"
        await settle_background(h)
        (adv,) = bank.advices()
        assert adv[F.MTI] == "0420"
        assert adv[F.ORIGINAL_DATA] == ("0200" + orig_out[F.STAN] + orig_out[F.TRANSMISSION_DT]
                                        + BANKA_INST.zfill(11) + SWITCH_INST.zfill(11))
        assert adv[F.AMOUNT] == "000000002500" and adv[F.PROC] == "000000"
        assert adv[F.RRN] == orig_out[F.RRN]
        assert (adv[F.ACQUIRER_ID], adv[F.FORWARDER_ID], adv[F.RECEIVING_ID]) == (BANKA_INST, SWITCH_INST,
                                                                                 BANKA_INST)
        assert (adv[F.TERMINAL_ID], adv[F.MERCHANT_ID]) == (POS, POS_MID)
        assert F.PAN not in adv
        orig = the_record(h, req)
        assert orig.cancelled == Cancel.REVERSED
        assert h.ctx.index.totals(POS, "000001") == BatchTotals()
        rows = {r.kind: r for r in h.rows()}
        assert rows[Kind.PURCHASE].cancelled == Cancel.REVERSED
        assert rows[Kind.PURCHASE].cancelled_by == rows[Kind.REVERSAL].id
        assert rows[Kind.REVERSAL].orig_id == rows[Kind.PURCHASE].id
        assert rows[Kind.REVERSAL].status == Status.APPROVED and rows[Kind.REVERSAL].amount == 2500

    run(tmp_path, network, body)


def test_reversal_twice_sends_one_0420(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        req = request(stan="000063")
        await h.handle(req)
        first = await h.handle(reversal(req, stan="000064"))
        second = await h.handle(reversal(req, stan="000065"))      # the terminal tries again
        repeat = await h.handle(reversal(req, stan="000064", mti="0401"))
        resend = await h.handle(reversal(req, stan="000064"))      # the identical 0400 again
        await settle_background(h)
        assert first[F.RESPONSE_CODE] == second[F.RESPONSE_CODE] == RC.APPROVED
        assert repeat == first
        # wire.md 6a says both "duplicate: 94" and "already reversed: 00 again"; either, never a 2nd 0420.
        assert resend[F.RESPONSE_CODE] in (RC.APPROVED, RC.DUPLICATE)
        assert len(bank.advices()) == 1
        assert the_record(h, req).cancelled == Cancel.REVERSED

    run(tmp_path, network, body)


def test_reversal_of_an_unknown_original_is_25(tmp_path, network):
    async def body(h: Harness):
        never_sent = request(stan="000066")
        resp = await h.handle(reversal(never_sent, stan="000067"))
        assert resp[F.MTI] == "0410" and resp[F.RESPONSE_CODE] == RC.ORIGINAL_NOT_FOUND
        assert not any(link.sent for link in h.links.values())

    run(tmp_path, network, body)


def test_reversal_of_a_declined_original_is_00_and_sends_nothing(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.script = lambda m: {F.RESPONSE_CODE: RC.INSUFFICIENT_FUNDS}
        req = request(stan="000068")
        await h.handle(req)
        bank.script = approve
        resp = await h.handle(reversal(req, stan="000069"))
        await settle_background(h)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        assert bank.mtis() == ["0200"]
        assert the_record(h, req).cancelled == Cancel.NONE

    run(tmp_path, network, body)


def test_reversal_of_a_locally_declined_original_is_00_and_sends_nothing(tmp_path, network):
    async def body(h: Harness):
        req = request(stan="000080", pan="6221260000000019")        # 14 at the switch
        assert (await h.handle(req))[F.RESPONSE_CODE] == RC.INVALID_CARD
        resp = await h.handle(reversal(req, stan="000081"))
        await settle_background(h)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        assert not any(link.sent for link in h.links.values())

    run(tmp_path, network, body)


def test_reversal_of_a_timed_out_original_is_sent(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.script = lambda m: LinkTimeout("late") if m[F.MTI] == "0200" else {F.RESPONSE_CODE: "00"}
        req = request(stan="000070")
        assert (await h.handle(req))[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
        resp = await h.handle(reversal(req, stan="000071"))
        await settle_background(h)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        # One 0420 in all: the switch's own after the timeout; the terminal's changes nothing.
        (adv,) = bank.advices()
        assert parse_field90(adv[F.ORIGINAL_DATA]).stan == bank.sent[0][F.STAN]

    run(tmp_path, network, body)


def test_reversal_before_the_original_is_answered(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.gate, bank.arrived = asyncio.Event(), asyncio.Event()
        req = request(stan="000072")
        purchase = asyncio.create_task(h.handle(req))
        await asyncio.wait_for(bank.arrived.wait(), 10)   # the original is at the issuer (bounded: never hangs)
        rev = asyncio.create_task(h.handle(reversal(req, stan="000073")))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not rev.done()                         # it waits for the original's outcome
        bank.gate.set()
        assert (await purchase)[F.RESPONSE_CODE] == RC.APPROVED
        assert (await rev)[F.RESPONSE_CODE] == RC.APPROVED
        await settle_background(h)
        assert bank.mtis() == ["0200", "0420"]
        assert the_record(h, req).cancelled == Cancel.REVERSED

    run(tmp_path, network, body)


def test_reversal_of_a_preauth(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        pre = request("0100", stan="000074", amount=5000)
        assert (await h.handle(pre))[F.MTI] == "0110"
        resp = await h.handle(reversal(pre, stan="000075"))
        await settle_background(h)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        (adv,) = bank.advices()
        assert adv[F.ORIGINAL_DATA][:4] == "0100"

    run(tmp_path, network, body)


def test_reversal_of_a_completed_preauth_changes_nothing(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        pre = request("0100", stan="000076", amount=5000)
        await h.handle(pre)
        assert (await h.handle(completion(pre, stan="000077", amount=4000)))[F.RESPONSE_CODE] == "00"
        resp = await h.handle(reversal(pre, stan="000078"))
        await settle_background(h)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        assert bank.advices() == []
        assert the_record(h, pre).cancelled == Cancel.COMPLETED
        assert h.ctx.index.totals(POS, "000001") == BatchTotals(0, 0, 1, 4000)

    run(tmp_path, network, body)


def test_repeat_after_restart_gets_the_same_response(tmp_path, network):
    # The response memory is gone after a restart: the answer is rebuilt from the journal,
    # 38 and 54 included.
    balance = "0002156C000000100000"

    async def main():
        h = Harness(tmp_path, network)
        h.links["BANKA"].script = lambda m: {F.RESPONSE_CODE: "00", F.AUTH_CODE: "B00001",
                                             F.ADDITIONAL_AMOUNTS: balance}
        req = request("0200", "011000", stan="000079", tid=ATM, mid=ATM_MID, amount=20000)
        first = await h.handle(req)
        await h.pipeline.drain()
        await h.pipeline.stop()
        h.close()
        h2 = Harness(tmp_path, network)
        try:
            again = await h2.handle(dict(req, t="0201"))
            assert again == first
            assert h2.links["BANKA"].sent == []
        finally:
            await h2.pipeline.drain()
            await h2.pipeline.stop()
            h2.close()

    asyncio.run(main())


# -- void and completion ----------------------------------------------------------------------------


def test_void_marks_the_purchase_voided(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        req = request(stan="000081", amount=1200)
        await h.handle(req)
        orig_out = dict(bank.sent[0])
        resp = await h.handle(void(req, stan="000082"))
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        out = bank.sent[1]
        assert out[F.MTI] == "0200" and out[F.PROC] == "020000" and out[F.AMOUNT] == "000000001200"
        assert out[F.ORIGINAL_DATA] == ("0200" + orig_out[F.STAN] + orig_out[F.TRANSMISSION_DT]
                                        + BANKA_INST.zfill(11) + SWITCH_INST.zfill(11))
        orig = the_record(h, req)
        assert orig.cancelled == Cancel.VOIDED
        assert h.ctx.index.totals(POS, "000001") == BatchTotals()
        rows = {r.kind: r for r in h.rows()}
        assert rows[Kind.PURCHASE].cancelled == Cancel.VOIDED
        assert rows[Kind.PURCHASE].cancelled_by == rows[Kind.VOID].id
        # A void of the voided purchase finds nothing to void.
        again = await h.handle(void(req, stan="000083"))
        assert again[F.RESPONSE_CODE] == RC.ORIGINAL_NOT_FOUND
        assert len(bank.sent) == 2

    run(tmp_path, network, body)


def test_void_declined_by_the_issuer_leaves_the_purchase(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        req = request(stan="000084")
        await h.handle(req)
        bank.script = lambda m: {F.RESPONSE_CODE: RC.DO_NOT_HONOUR}
        resp = await h.handle(void(req, stan="000085"))
        assert resp[F.RESPONSE_CODE] == RC.DO_NOT_HONOUR
        assert the_record(h, req).cancelled == Cancel.NONE
        assert h.ctx.index.totals(POS, "000001") == BatchTotals(0, 0, 1, 1000)

    run(tmp_path, network, body)


def test_reversal_of_a_voided_purchase_changes_nothing(tmp_path, network):
    # The void already credited the purchase back at the issuer: a 0420 would undo it twice.
    async def body(h: Harness):
        bank = h.links["BANKA"]
        req = request(stan="000086")
        await h.handle(req)
        await h.handle(void(req, stan="000087"))
        await h.handle(reversal(req, stan="000088"))
        await settle_background(h)
        assert bank.advices() == []
        assert the_record(h, req).cancelled == Cancel.VOIDED

    run(tmp_path, network, body)


def test_reversal_of_a_void_restores_the_purchase(tmp_path, network):
    # The issuer undoes the void, so it holds the purchase again: so must the batch totals.
    async def body(h: Harness):
        req = request(stan="000089", amount=700)
        await h.handle(req)
        v = void(req, stan="000090")
        await h.handle(v)
        resp = await h.handle(reversal(v, stan="000091"))
        await settle_background(h)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        (adv,) = h.links["BANKA"].advices()
        assert adv[F.PROC] == "020000"
        assert h.ctx.index.totals(POS, "000001") == BatchTotals(0, 0, 1, 700)
        rows = {r.kind: r for r in h.rows()}
        assert rows[Kind.PURCHASE].cancelled == Cancel.NONE
        assert rows[Kind.VOID].cancelled == Cancel.REVERSED

    run(tmp_path, network, body)


def test_completion_marks_the_preauth_completed(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        pre = request("0100", stan="000092", amount=5000)
        resp = await h.handle(pre)
        assert resp[F.MTI] == "0110" and resp[F.RESPONSE_CODE] == RC.APPROVED
        assert bank.sent[0][F.MTI] == "0100"
        pre_out = dict(bank.sent[0])
        assert h.ctx.index.totals(POS, "000001") == BatchTotals()       # a hold is not a debit
        resp = await h.handle(completion(pre, stan="000093", amount=4200))
        assert resp[F.MTI] == "0210" and resp[F.RESPONSE_CODE] == RC.APPROVED
        out = bank.sent[1]
        assert out[F.MTI] == "0200" and out[F.CONDITION_CODE] == "06" and out[F.AMOUNT] == "000000004200"
        assert out[F.ORIGINAL_DATA] == ("0100" + pre_out[F.STAN] + pre_out[F.TRANSMISSION_DT]
                                        + BANKA_INST.zfill(11) + SWITCH_INST.zfill(11))
        assert the_record(h, pre).cancelled == Cancel.COMPLETED
        assert h.ctx.index.totals(POS, "000001") == BatchTotals(0, 0, 1, 4200)
        rows = {r.kind: r for r in h.rows()}
        assert rows[Kind.PREAUTH].cancelled == Cancel.COMPLETED
        # Completed once: a second completion finds no open hold; above the hold is 13.
        assert (await h.handle(completion(pre, stan="000094", amount=100)))[F.RESPONSE_CODE] == \
            RC.ORIGINAL_NOT_FOUND
        pre2 = request("0100", stan="000095", amount=5000)
        await h.handle(pre2)
        assert (await h.handle(completion(pre2, stan="000096", amount=5001)))[F.RESPONSE_CODE] == \
            RC.INVALID_AMOUNT
        assert len(bank.sent) == 3

    run(tmp_path, network, body)


# -- transfers (wire.md 8) ----------------------------------------------------------------------------


def transfer(stan: str, to_pan: str, amount: int = 3000, **kw) -> dict:
    return request("0200", "401000", stan=stan, amount=amount, **{F.ACCOUNT_2: to_pan}, **kw)


def test_interbank_transfer_debits_then_credits(tmp_path, network):
    async def body(h: Harness):
        a, b = h.links["BANKA"], h.links["BANKB"]
        req = transfer("000101", CARD_B, **{F.PIN_BLOCK: PIN_BLOCK})
        resp = await h.handle(req)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        assert a.mtis() == ["0200"] and b.mtis() == ["0200"]
        debit, credit = a.sent[0], b.sent[0]
        assert debit[F.PROC] == "401000" and debit[F.PAN] == CARD_A and debit[F.PIN_BLOCK] == ZPK_BLOCK
        assert debit[F.RECEIVING_ID] == BANKA_INST
        assert credit[F.PROC] == "281000" and credit[F.PAN] == CARD_B
        assert credit[F.AMOUNT] == "000000003000" and credit[F.RECEIVING_ID] == BANKB_INST
        for k in (F.PIN_BLOCK, F.TRACK2, F.ACCOUNT_2, F.EXPIRY):
            assert k not in credit, k
        assert credit[F.RRN] == debit[F.RRN] and credit[F.ACQUIRER_ID] == BANKA_INST
        (row,) = h.rows()
        assert row.status == Status.APPROVED and (row.issuer_id, row.to_issuer_id) == ("BANKA", "BANKB")
        assert row.issuer_stan == debit[F.STAN] and row.to_issuer_stan == credit[F.STAN]
        assert row.to_auth_code == "A" + credit[F.STAN][-5:]
        assert row.to_pan_masked == "622848******0015" and CARD_B not in repr(row)
        assert h.ctx.index.totals(POS, "000001") == BatchTotals(0, 0, 1, 3000)   # a transfer-out

    run(tmp_path, network, body)


def test_on_us_transfer_is_one_request(tmp_path, network):
    async def body(h: Harness):
        resp = await h.handle(transfer("000102", CARD_A2))
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        assert h.links["BANKA"].mtis() == ["0200"] and h.links["BANKB"].sent == []
        assert h.links["BANKA"].sent[0][F.ACCOUNT_2] == CARD_A2

    run(tmp_path, network, body)


@pytest.mark.parametrize("credit_answer, rc", [
    ({F.RESPONSE_CODE: RC.NO_SUCH_ACCOUNT}, RC.NO_SUCH_ACCOUNT),
    (LinkDown("BANKB offline"), RC.ISSUER_INOPERATIVE),
])
def test_failed_credit_leg_reverses_the_debit(tmp_path, network, credit_answer, rc):
    async def body(h: Harness):
        a, b = h.links["BANKA"], h.links["BANKB"]
        b.script = lambda m: credit_answer
        req = transfer("000103", CARD_B)
        resp = await h.handle(req)
        assert resp[F.RESPONSE_CODE] == rc and F.AUTH_CODE not in resp
        await settle_background(h)
        debit = a.sent[0]
        (adv,) = a.advices()
        assert adv[F.ORIGINAL_DATA] == ("0200" + debit[F.STAN] + debit[F.TRANSMISSION_DT]
                                        + BANKA_INST.zfill(11) + SWITCH_INST.zfill(11))
        assert adv[F.PROC] == "401000" and adv[F.AMOUNT] == "000000003000"
        assert b.advices() == []                       # the credit surely did not happen
        (row,) = h.rows()
        assert row.status == Status.DECLINED and row.response_code == rc
        assert h.ctx.index.totals(POS, "000001") == BatchTotals()

    run(tmp_path, network, body)


def test_timed_out_credit_leg_reverses_both_legs(tmp_path, network):
    async def body(h: Harness):
        a, b = h.links["BANKA"], h.links["BANKB"]
        b.script = lambda m: LinkTimeout("late") if m[F.MTI] == "0200" else {F.RESPONSE_CODE: "00"}
        resp = await h.handle(transfer("000104", CARD_B))
        assert resp[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
        await settle_background(h)
        assert len(a.advices()) == 1
        (adv,) = b.advices()                           # the credit may have happened: undo it too
        credit = b.sent[0]
        assert adv[F.ORIGINAL_DATA][:20] == "0200" + credit[F.STAN] + credit[F.TRANSMISSION_DT]
        assert adv[F.PROC] == "281000"

    run(tmp_path, network, body)


# -- batch close and upload (wire.md 6) --------------------------------------------------------------


async def a_day_of_business(h: Harness) -> None:
    """purchase 1000 + refund 300 approved; a declined purchase; a reversed purchase; a voided one."""
    assert (await h.handle(request(stan="000201", amount=1000)))[F.RESPONSE_CODE] == "00"
    assert (await h.handle(request("0200", "200000", stan="000202", amount=300)))[F.RESPONSE_CODE] == "00"
    h.links["BANKA"].script = lambda m: {F.RESPONSE_CODE: RC.INSUFFICIENT_FUNDS}
    await h.handle(request(stan="000203", amount=500))
    h.links["BANKA"].script = approve
    reversed_one = request(stan="000204", amount=800)
    await h.handle(reversed_one)
    assert (await h.handle(reversal(reversed_one, stan="000205")))[F.RESPONSE_CODE] == "00"
    voided = request(stan="000206", amount=900)
    await h.handle(voided)
    assert (await h.handle(void(voided, stan="000207")))[F.RESPONSE_CODE] == "00"


def test_batch_close_with_equal_totals_closes_the_batch(tmp_path, network):
    async def body(h: Harness):
        await a_day_of_business(h)
        resp = await h.handle(batch_close((1, 300, 1, 1000), stan="000210"))
        assert resp[F.MTI] == "0510" and resp[F.RESPONSE_CODE] == RC.APPROVED
        assert resp[F.BATCH_NUMBER] == "000001" and resp[F.STAN] == "000210"
        assert h.ctx.index.is_closed(POS, "000001")
        assert h.journal.closed_batches() == {(POS, "000001")}
        late = await h.handle(request(stan="000211"))
        assert late[F.RESPONSE_CODE] == RC.INVALID_TRANSACTION
        again = await h.handle(batch_close((1, 300, 1, 1000), stan="000212"))
        assert again[F.RESPONSE_CODE] == RC.APPROVED
        # Another terminal's batch with the same number is still open.
        other = await h.handle(request(stan="000213", tid="POS00002"))
        assert other[F.RESPONSE_CODE] == RC.APPROVED

    run(tmp_path, network, body)


def test_batch_close_with_different_totals_is_95_then_upload(tmp_path, network):
    async def body(h: Harness):
        await a_day_of_business(h)
        resp = await h.handle(batch_close((1, 300, 2, 1900), stan="000220"))
        assert resp[F.MTI] == "0510" and resp[F.RESPONSE_CODE] == RC.RECONCILE_ERROR
        assert resp[F.CREDITS_NUMBER] == "0000000001" and resp[F.CREDITS_AMOUNT] == "0000000000000300"
        assert resp[F.DEBITS_NUMBER] == "0000000001" and resp[F.DEBITS_AMOUNT] == "0000000000001000"
        assert not h.ctx.index.is_closed(POS, "000001")
        # The batch stays open for the upload.
        upload = request("0320", "000000", stan="000221", amount=1000, **{F.RRN: "607300000000",
                                                                          F.AUTH_CODE: "A00001"})
        up = await h.handle(upload)
        assert up[F.MTI] == "0330" and up[F.RESPONSE_CODE] == RC.APPROVED
        trailer = await h.handle(batch_close((1, 300, 2, 1900), stan="000222", proc="960000"))
        assert trailer[F.MTI] == "0510" and trailer[F.RESPONSE_CODE] == RC.APPROVED
        assert h.ctx.index.is_closed(POS, "000001")
        assert (await h.handle(request(stan="000223")))[F.RESPONSE_CODE] == RC.INVALID_TRANSACTION
        closes = h.journal.batch_closes(POS, "000001")
        assert [c.result for c in closes] == ["95", "00"]
        assert closes[0].switch_totals == BatchTotals(1, 300, 1, 1000)
        assert closes[0].terminal_totals == BatchTotals(1, 300, 2, 1900)
        (row,) = h.journal.uploads(POS, "000001")
        assert (row.rrn, row.amount, row.auth_code, row.pan_masked) == ("607300000000", 1000, "A00001",
                                                                        "622126******0018")

    run(tmp_path, network, body)


@pytest.mark.parametrize("change, rc", [
    ({F.PROC: "930000"}, RC.INVALID_TRANSACTION),
    ({F.TERMINAL_ID: "POS99999"}, RC.INVALID_MERCHANT),
    ({F.DEBITS_AMOUNT: "00000000000010X0"}, RC.FORMAT_ERROR),
    ({F.CREDITS_NUMBER: None}, RC.FORMAT_ERROR),
])
def test_bad_batch_close(tmp_path, network, change, rc):
    async def body(h: Harness):
        msg = batch_close((0, 0, 0, 0), stan="000230")
        for k, v in change.items():
            if v is None:
                del msg[k]
            else:
                msg[k] = v
        resp = await h.handle(msg)
        assert resp[F.MTI] == "0510" and resp[F.RESPONSE_CODE] == rc
        assert not h.ctx.index.is_closed(POS, "000001")

    run(tmp_path, network, body)


# -- network management and other MTIs -------------------------------------------------------------


@pytest.mark.parametrize("code", ["301", "001", "002"])
def test_0800_is_answered(tmp_path, network, code):
    async def body(h: Harness):
        req = {F.MTI: "0800", F.TRANSMISSION_DT: "0314101500", F.STAN: "000301", F.TERMINAL_ID: POS,
               F.NETWORK_MGMT_CODE: code}
        resp = await h.handle(req)
        assert resp == {F.MTI: "0810", F.TRANSMISSION_DT: "0314101500", F.STAN: "000301", F.TERMINAL_ID: POS,
                        F.NETWORK_MGMT_CODE: code, F.RESPONSE_CODE: RC.APPROVED}
        assert not any(link.sent for link in h.links.values())

    run(tmp_path, network, body)


def test_unknown_request_class_is_12(tmp_path, network):
    async def body(h: Harness):
        req = {F.MTI: "0600", F.STAN: "000401", F.TERMINAL_ID: POS, F.TRANSMISSION_DT: "0314101500"}
        resp = await h.handle(req)
        assert resp[F.MTI] == "0610" and resp[F.RESPONSE_CODE] == RC.INVALID_TRANSACTION
        assert resp[F.STAN] == "000401"

    run(tmp_path, network, body)


@pytest.mark.parametrize("mti", ["0210", "0110", "0410", "0810", "0430", "XXXX", ""])
def test_responses_from_a_terminal_get_no_answer(tmp_path, network, mti):
    async def body(h: Harness):
        msg = request(stan="000402")
        msg[F.MTI] = mti
        if not mti:
            del msg[F.MTI]
        assert await h.handle(msg) is None
        assert h.rows() == []
        assert not any(link.sent for link in h.links.values())

    run(tmp_path, network, body)


def test_pipeline_format_error_hook():
    partial = {F.MTI: "0200", F.STAN: "000501"}
    # The acceptor calls this for frames that do not decode; it needs no state.
    resp = Pipeline.format_error(None, partial, "bad bitmap")
    assert resp == {F.MTI: "0210", F.STAN: "000501", F.RESPONSE_CODE: RC.FORMAT_ERROR}
    assert Pipeline.format_error(None, {F.MTI: "0200"}, "x") is None


def test_atm_withdrawal_and_pos_cash_refused(tmp_path, network):
    async def body(h: Harness):
        ok = await h.handle(request("0200", "011000", stan="000601", tid=ATM, mid=ATM_MID, amount=50000,
                                    **{F.PIN_BLOCK: PIN_BLOCK}))
        assert ok[F.RESPONSE_CODE] == RC.APPROVED
        refused = await h.handle(request("0200", "011000", stan="000602"))
        assert refused[F.RESPONSE_CODE] == RC.NOT_PERMITTED_TERMINAL
        assert h.ctx.index.totals(ATM, "000001") == BatchTotals(0, 0, 1, 50000)
        assert len(h.links["BANKA"].sent) == 1

    run(tmp_path, network, body)


def test_steps_module_names_the_required_fields():
    # The reversal needs 90 and its own key fields; a balance inquiry needs no amount.
    assert F.ORIGINAL_DATA in steps.REVERSAL_REQUIRED
    assert F.AMOUNT not in steps.BALANCE_REQUIRED and F.AMOUNT in steps.FINANCIAL_REQUIRED
