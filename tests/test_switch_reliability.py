"""The pipeline's reliability paths, without sockets (harness of test_switch_pipeline).

Write-ahead with the issuer STAN, reversals through the persistent queue,
late answers, stand-in and its 0220, recovery of what a crash left open,
and the cross-process duplicate guard.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from cardswitch.config import StandIn
from cardswitch.iso8583.constants import RC, F
from cardswitch.iso8583.fields import parse_field90
from cardswitch.netfile import load_network
from cardswitch.switch import saf
from cardswitch.switch.banklink import LinkDown, LinkTimeout
from cardswitch.switch.dedupe import duplicate_key
from cardswitch.switch.index import BatchTotals
from cardswitch.switch.records import Cancel, Kind, Status

from test_switch_pipeline import (
    BANKA_INST,
    CARD_B,
    PIN_BLOCK,
    POS,
    Harness,
    approve,
    request,
    reversal,
    the_record,
    transfer,
)

B_POS, B_MID = "POS00012", "898110054110001"      # acquired by BANKB
B_STOLEN = "6228480000000023"
PROFILE = StandIn(max_amount=50_000, daily_count=2, daily_amount=0, allowed="00")


@pytest.fixture(scope="module")
def network():
    net = load_network(None)
    banks = tuple(replace(b, stand_in=PROFILE) if b.id == "BANKB" else
                  replace(b, stand_in=StandIn()) for b in net.banks)
    return replace(net, banks=banks)


def b_request(stan: str, **kw) -> dict:
    kw.setdefault("pan", CARD_B)
    return request(stan=stan, tid=B_POS, mid=B_MID, **kw)


def run(tmp_path, network, body) -> None:
    async def main() -> None:
        h = Harness(tmp_path, network)
        try:
            await asyncio.wait_for(body(h), 30)       # bounded: a broken pipeline fails, never hangs
        finally:
            await h.pipeline.drain()
            await h.pipeline.stop()
            h.close()

    asyncio.run(main())


async def restart(h: Harness, tmp_path, network) -> Harness:
    """Stop as a crash would leave things (nothing drained), open again."""
    await h.pipeline.stop()
    h.close()
    return Harness(tmp_path, network)


# -- write-ahead -------------------------------------------------------------------------------


def test_write_ahead_row_holds_the_stan_and_field_7_the_issuer_sees(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.gate, bank.arrived = asyncio.Event(), asyncio.Event()
        req = request(stan="000011")
        task = asyncio.create_task(h.handle(req))
        await bank.arrived.wait()
        (sent,) = bank.sent
        (row,) = h.rows()                                  # committed before the issuer saw it
        assert row.status == Status.PENDING
        assert (row.issuer_stan, row.issuer_transmitted, row.rrn) == \
            (sent[F.STAN], sent[F.TRANSMISSION_DT], sent[F.RRN])
        bank.gate.set()
        assert (await task)[F.RESPONSE_CODE] == RC.APPROVED

    run(tmp_path, network, body)


def test_transfer_credit_leg_is_written_ahead_too(tmp_path, network):
    async def body(h: Harness):
        b = h.links["BANKB"]
        b.gate, b.arrived = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(h.handle(transfer("000012", CARD_B)))
        await b.arrived.wait()
        (row,) = h.rows()
        assert row.status == Status.PENDING and row.to_issuer_stan == b.sent[0][F.STAN]
        assert row.issuer_stan == h.links["BANKA"].sent[0][F.STAN]
        b.gate.set()
        assert (await task)[F.RESPONSE_CODE] == RC.APPROVED

    run(tmp_path, network, body)


def test_link_down_sends_nothing_and_keeps_no_issuer_stan(tmp_path, network):
    async def body(h: Harness):
        h.links["BANKA"].script = lambda m: LinkDown("offline")
        resp = await h.handle(request(stan="000013"))
        assert resp[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
        (row,) = h.rows()
        assert (row.status, row.issuer_stan, row.cancelled) == (Status.DECLINED, "", Cancel.NONE)
        assert h.journal.saf_entries() == []

    run(tmp_path, network, body)


# -- reversals through the queue ---------------------------------------------------------------


def test_timeout_queues_a_persistent_0420_without_pan(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.script = lambda m: LinkTimeout("no answer") if m[F.MTI] == "0200" else {F.RESPONSE_CODE: "00"}
        req = request(stan="000021", amount=4321)
        assert (await h.handle(req))[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
        (entry,) = h.journal.saf_entries()
        sent = bank.sent[0]
        assert (entry.kind, entry.bank_id, entry.orig_mti, entry.orig_stan, entry.orig_transmitted) == \
            (saf.REVERSAL, "BANKA", "0200", sent[F.STAN], sent[F.TRANSMISSION_DT])
        assert (entry.amount, entry.currency, entry.proc, entry.rrn, entry.terminal_id) == \
            (4321, "156", "000000", sent[F.RRN], POS)
        assert entry.acquirer_inst == BANKA_INST and entry.pan_sealed == ""
        await h.pipeline.drain()
        (adv,) = bank.advices()
        assert F.PAN not in adv and adv[F.STAN] == entry.stan
        assert h.journal.saf_entries()[0].state == saf.DELIVERED
        assert the_record(h, req).cancelled == Cancel.REVERSED

    run(tmp_path, network, body)


def test_bad_mac_answer_is_treated_as_no_answer(tmp_path, network):
    # BankLink raises LinkTimeout for an answer whose MAC fails: 91, then a 0420.
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.script = lambda m: LinkTimeout("response has a wrong MAC") if m[F.MTI] == "0200" \
            else {F.RESPONSE_CODE: "00"}
        assert (await h.handle(request(stan="000022")))[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
        await h.pipeline.drain()
        assert len(bank.advices()) == 1

    run(tmp_path, network, body)


def test_reversal_waits_in_the_queue_while_the_bank_is_down(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        req = request(stan="000023")
        await h.handle(req)
        bank.online = False
        bank.script = lambda m: LinkDown("offline")
        assert (await h.handle(reversal(req, stan="000024")))[F.RESPONSE_CODE] == RC.APPROVED
        assert await h.pipeline.drain(0.2)        # nothing deliverable while the bank is down
        assert bank.advices() == [] and h.pipeline.saf.depth()["BANKA"] == 1
        bank.online = True
        bank.script = approve
        h.pipeline.saf._kick("BANKA")
        assert await h.pipeline.drain(10)
        (adv,) = bank.advices()
        assert parse_field90(adv[F.ORIGINAL_DATA]).stan == bank.sent[0][F.STAN]

    run(tmp_path, network, body)


def test_reversal_queued_while_down_is_delivered_after_a_restart(tmp_path, network):
    async def main():
        h = Harness(tmp_path, network)
        req = request(stan="000025")
        await h.handle(req)
        first_stan = h.links["BANKA"].sent[0][F.STAN]
        h.links["BANKA"].online = False
        h.links["BANKA"].script = lambda m: LinkDown("offline")
        await h.handle(reversal(req, stan="000026"))
        h2 = await restart(h, tmp_path, network)
        try:
            assert h2.pipeline.saf.load() == 1
            assert h2.pipeline.recover_pending() == (0, 0)
            h2.pipeline.saf.start()
            assert await h2.pipeline.drain(10)
            (adv,) = h2.links["BANKA"].advices()
            assert adv[F.MTI] == "0420" and parse_field90(adv[F.ORIGINAL_DATA]).stan == first_stan
            assert [e.state for e in h2.journal.saf_entries()] == [saf.DELIVERED]
        finally:
            await h2.pipeline.stop()
            h2.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- late answers ------------------------------------------------------------------------------


def test_late_approval_is_journaled_and_a_repeat_gets_68(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKA"]
        bank.script = lambda m: LinkTimeout("no answer") if m[F.MTI] == "0200" else {F.RESPONSE_CODE: "00"}
        req = request(stan="000031")
        first = await h.handle(req)
        assert first[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
        # Before the late answer, a repeat gets the very same 91.
        assert await h.handle(dict(req, t="0201")) == first
        sent = bank.sent[0]
        h.pipeline.on_late("BANKA", {F.MTI: "0210", F.STAN: sent[F.STAN], F.RRN: sent[F.RRN],
                                     F.RESPONSE_CODE: "00", F.AUTH_CODE: "123456"})
        rec = the_record(h, req)
        assert rec.late_response_code == "00" and rec.status == Status.TIMEOUT
        assert rec.cancelled == Cancel.REVERSED
        assert h.journal.get(rec.id).late_response_code == "00"
        again = await h.handle(dict(req, t="0201"))
        assert again[F.RESPONSE_CODE] == RC.RESPONSE_TOO_LATE and F.AUTH_CODE not in again
        await h.pipeline.drain()
        assert len(bank.advices()) == 1                    # reversed once, late answer or not
        # An answer matching nothing is only logged.
        h.pipeline.on_late("BANKA", {F.MTI: "0210", F.STAN: "999999", F.RRN: "x", F.RESPONSE_CODE: "00"})
        assert h.pipeline.late_answers == 1

    run(tmp_path, network, body)


# -- stand-in ----------------------------------------------------------------------------------


def test_stand_in_approves_while_the_bank_is_down_and_delivers_a_0220(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKB"]
        bank.online = False
        bank.script = lambda m: LinkDown("offline")
        req = b_request("000041", amount=12_345)
        resp = await h.handle(req)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED and resp[F.AUTH_CODE].startswith("S")
        rec = the_record(h, req)
        assert rec.stand_in and rec.status == Status.APPROVED and rec.cancelled == Cancel.NONE
        row = h.journal.get(rec.id)
        assert row.stand_in and row.auth_code == resp[F.AUTH_CODE] and row.rrn == resp[F.RRN]
        (entry,) = h.journal.saf_entries()
        assert entry.kind == saf.STAND_IN and CARD_B not in entry.pan_sealed
        assert h.ctx.index.totals(B_POS, "000001") == BatchTotals(0, 0, 1, 12_345)
        bank.online = True
        bank.script = approve
        h.pipeline.saf._kick("BANKB")
        assert await h.pipeline.drain(10)
        (adv,) = bank.sent
        assert adv[F.MTI] == "0220" and adv[F.PAN] == CARD_B and adv[F.AMOUNT] == "000000012345"
        assert adv[F.AUTH_CODE] == resp[F.AUTH_CODE] and adv[F.RRN] == resp[F.RRN]
        assert (adv[F.STAN], adv[F.TRANSMISSION_DT]) == (rec.issuer_stan, rec.issuer_transmitted)

    run(tmp_path, network, body)


def test_stand_in_after_a_timeout_reverses_the_request_then_advises(tmp_path, network):
    async def body(h: Harness):
        bank = h.links["BANKB"]
        bank.script = lambda m: LinkTimeout("no answer") if m[F.MTI] == "0200" else {F.RESPONSE_CODE: "00"}
        req = b_request("000042", amount=2_000)
        resp = await h.handle(req)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED
        await h.pipeline.drain()
        assert bank.mtis() == ["0200", "0420", "0220"]             # the request undone, then the advice
        assert parse_field90(bank.sent[1][F.ORIGINAL_DATA]).stan == bank.sent[0][F.STAN]
        rec = the_record(h, req)
        assert rec.stand_in and rec.status == Status.APPROVED and rec.cancelled == Cancel.NONE
        # The terminal cancels it: the 0420 names the 0220, the issuer-side original.
        assert (await h.handle(reversal(req, stan="000043")))[F.RESPONSE_CODE] == RC.APPROVED
        await h.pipeline.drain()
        last = bank.sent[-1]
        od = parse_field90(last[F.ORIGINAL_DATA])
        assert last[F.MTI] == "0420" and (od.mti, od.stan) == ("0220", bank.sent[2][F.STAN])

    run(tmp_path, network, body)


@pytest.mark.parametrize("change, rc", [
    ({"amount": 50_001}, RC.ISSUER_INOPERATIVE),
    ({F.PIN_BLOCK: PIN_BLOCK}, RC.ISSUER_INOPERATIVE),
    ({"pan": B_STOLEN}, RC.STOLEN_CARD),
    ({"proc": "300000", "amount": None}, RC.ISSUER_INOPERATIVE),
])
def test_stand_in_declines(tmp_path, network, change, rc):
    async def body(h: Harness):
        bank = h.links["BANKB"]
        bank.online = False
        bank.script = lambda m: LinkDown("offline")
        resp = await h.handle(b_request("000044", **change))
        assert resp[F.RESPONSE_CODE] == rc and F.AUTH_CODE not in resp
        (row,) = h.rows()
        assert not row.stand_in and row.status == Status.DECLINED
        assert h.journal.saf_entries() == []

    run(tmp_path, network, body)


def test_no_stand_in_for_a_bank_without_a_profile(tmp_path, network):
    async def body(h: Harness):
        h.links["BANKA"].script = lambda m: LinkDown("offline")
        assert (await h.handle(request(stan="000045")))[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE

    run(tmp_path, network, body)


def test_stand_in_daily_count_per_card_survives_a_restart(tmp_path, network):
    async def main():
        h = Harness(tmp_path, network)
        h.links["BANKB"].script = lambda m: LinkDown("offline")
        h.links["BANKB"].online = False
        assert (await h.handle(b_request("000046")))[F.RESPONSE_CODE] == RC.APPROVED
        h2 = await restart(h, tmp_path, network)
        # As SwitchApp does: counters from the journal.
        h2.pipeline.standin.counters.load("2026-03-14", h2.journal.standin_usage("2026-03-14"))
        h2.links["BANKB"].script = lambda m: LinkDown("offline")
        h2.links["BANKB"].online = False
        try:
            assert (await h2.handle(b_request("000047")))[F.RESPONSE_CODE] == RC.APPROVED
            assert (await h2.handle(b_request("000048")))[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
            assert (await h2.handle(b_request("000049", pan="5200480000000019")))[F.RESPONSE_CODE] == \
                RC.APPROVED                                   # another card has its own count
        finally:
            await h2.pipeline.stop()
            h2.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- recovery at start --------------------------------------------------------------------------


def test_request_in_flight_at_a_crash_is_timed_out_and_reversed_at_start(tmp_path, network):
    async def main():
        h = Harness(tmp_path, network)
        bank = h.links["BANKA"]
        bank.gate, bank.arrived = asyncio.Event(), asyncio.Event()
        req = request(stan="000051")
        task = asyncio.create_task(h.handle(req))
        await bank.arrived.wait()
        sent = dict(bank.sent[0])
        task.cancel()                                     # the process dies here
        with pytest.raises(asyncio.CancelledError):
            await task
        h2 = await restart(h, tmp_path, network)
        try:
            assert h2.pipeline.saf.load() == 0
            assert h2.pipeline.recover_pending() == (1, 1)
            rec = the_record(h2, req)
            assert (rec.status, rec.response_code, rec.cancelled) == \
                (Status.TIMEOUT, RC.ISSUER_INOPERATIVE, Cancel.REVERSED)
            row = h2.journal.get(rec.id)
            assert (row.status, row.cancelled) == (Status.TIMEOUT, Cancel.REVERSED)
            assert h2.journal.pending() == []
            h2.pipeline.saf.start()
            assert await h2.pipeline.drain(10)
            (adv,) = h2.links["BANKA"].advices()
            od = parse_field90(adv[F.ORIGINAL_DATA])
            assert (od.mti, od.stan, od.transmitted) == ("0200", sent[F.STAN], sent[F.TRANSMISSION_DT])
            # The terminal's repeat gets the 91 the row now holds; its reversal changes nothing.
            again = await h2.handle(dict(req, t="0201"))
            assert again[F.RESPONSE_CODE] == RC.ISSUER_INOPERATIVE
            assert (await h2.handle(reversal(req, stan="000052")))[F.RESPONSE_CODE] == RC.APPROVED
            await h2.pipeline.drain(10)
            assert len(h2.links["BANKA"].advices()) == 1
            # Once settled, a second start has nothing left to do.
            assert h2.pipeline.recover_pending() == (0, 0)
        finally:
            await h2.pipeline.stop()
            h2.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_recovery_does_not_queue_a_reversal_twice(tmp_path, network):
    async def main():
        h = Harness(tmp_path, network)
        bank = h.links["BANKA"]
        bank.online = False                               # the queued 0420 stays queued
        bank.script = lambda m: LinkTimeout("no answer") if m[F.MTI] == "0200" else LinkDown("x")
        req = request(stan="000053")
        await h.handle(req)
        rec = the_record(h, req)
        # As if the outcome had not reached the disk: the row back to pending.
        rec.status, rec.cancelled = Status.PENDING, Cancel.NONE
        h.journal.finish(rec)
        h.journal.mark_cancelled(rec.id, Cancel.NONE, None)
        h2 = await restart(h, tmp_path, network)
        try:
            assert h2.pipeline.saf.load() == 1
            assert h2.pipeline.recover_pending() == (1, 0)       # its 0420 is queued already
            assert the_record(h2, req).cancelled == Cancel.REVERSED
            assert len(h2.journal.saf_entries()) == 1
        finally:
            await h2.pipeline.stop()
            h2.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_stand_in_without_its_outcome_is_undone_after_its_0220(tmp_path, network):
    async def main():
        h = Harness(tmp_path, network)
        bank = h.links["BANKB"]
        bank.online = False
        bank.script = lambda m: LinkDown("offline")
        req = b_request("000054", amount=3_000)
        assert (await h.handle(req))[F.RESPONSE_CODE] == RC.APPROVED
        rec = the_record(h, req)
        rec.status = Status.PENDING                        # the approval never reached the disk
        h.journal.finish(rec)
        h2 = await restart(h, tmp_path, network)
        try:
            h2.links["BANKB"].online = False
            assert h2.pipeline.saf.load() == 1
            assert h2.pipeline.recover_pending() == (1, 1)
            entries = h2.journal.saf_entries()
            assert [e.kind for e in entries] == [saf.STAND_IN, saf.REVERSAL]
            assert (entries[1].orig_mti, entries[1].orig_stan) == ("0220", entries[0].stan)
            h2.links["BANKB"].online = True
            h2.pipeline.saf.start()
            assert await h2.pipeline.drain(10)
            assert h2.links["BANKB"].mtis() == ["0220", "0420"]      # posted, then undone
            assert the_record(h2, req).status == Status.TIMEOUT
        finally:
            await h2.pipeline.stop()
            h2.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_interrupted_transfer_reverses_both_legs_at_start(tmp_path, network):
    async def main():
        h = Harness(tmp_path, network)
        b = h.links["BANKB"]
        b.gate, b.arrived = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(h.handle(transfer("000055", CARD_B)))
        await b.arrived.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        h2 = await restart(h, tmp_path, network)
        try:
            h2.pipeline.saf.load()
            assert h2.pipeline.recover_pending() == (1, 2)
            h2.pipeline.saf.start()
            assert await h2.pipeline.drain(10)
            (a_adv,) = h2.links["BANKA"].advices()
            (b_adv,) = h2.links["BANKB"].advices()
            assert a_adv[F.PROC] == "401000" and b_adv[F.PROC] == "281000"
        finally:
            await h2.pipeline.stop()
            h2.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- duplicates across processes ---------------------------------------------------------------


class Guard:
    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.fail = False

    async def claim(self, key: str) -> bool:
        if self.fail:
            raise ConnectionError("redis down")
        first = key not in self.seen
        self.seen.add(key)
        return first


def test_shared_duplicate_guard_is_asked_before_anything_is_sent(tmp_path, network):
    async def body(h: Harness):
        guard = Guard()
        h.pipeline.dedupe = guard
        req = request(stan="000061")
        guard.seen.add(duplicate_key(POS, "000061", req[F.TRANSMISSION_DT], "0200", "2026-03-14"))
        resp = await h.handle(req)                       # another process had it first
        assert resp[F.RESPONSE_CODE] == RC.DUPLICATE and h.links["BANKA"].sent == []
        ok = await h.handle(request(stan="000062"))
        assert ok[F.RESPONSE_CODE] == RC.APPROVED and len(guard.seen) == 2
        guard.fail = True                                 # a broken guard lets requests through
        assert (await h.handle(request(stan="000063")))[F.RESPONSE_CODE] == RC.APPROVED
        # A local duplicate never reaches the guard.
        guard.fail = False
        assert (await h.handle(request(stan="000062")))[F.RESPONSE_CODE] == RC.DUPLICATE
        assert len(guard.seen) == 2
        rows = {r.stan: r for r in h.rows() if r.kind == Kind.PURCHASE}
        assert rows["000061"].response_code == RC.DUPLICATE

    run(tmp_path, network, body)


def test_saf_depth_for_metrics(tmp_path, network):
    async def body(h: Harness):
        depth = h.pipeline.saf.depth()
        assert set(depth) == {"BANKA", "BANKB", "BANKC"} and sum(depth.values()) == 0
        h.links["BANKC"].online = False
        h.links["BANKC"].script = lambda m: LinkTimeout("x") if m[F.MTI] == "0200" else LinkDown("x")
        await h.handle(request(stan="000071", pan="6217000000000014"))
        assert h.pipeline.saf.depth()["BANKC"] == 1 and h.pipeline.saf.total_depth == 1

    run(tmp_path, network, body)


def test_mac_failure_towards_the_bank_is_96_and_nothing_to_reverse(tmp_path, network):
    # No MAC for the request (the HSM is away): nothing was sent, so nothing is reversed.
    from cardswitch.switch.security import SecurityError

    async def body(h: Harness):
        h.links["BANKA"].script = lambda m: LinkDown("unused")

        async def no_mac(msg, timeout_s, stan=None):
            raise SecurityError(RC.SYSTEM_MALFUNCTION, "HSM: HsmUnavailable")

        h.links["BANKA"].request = no_mac
        resp = await h.handle(request(stan="000081"))
        assert resp[F.RESPONSE_CODE] == RC.SYSTEM_MALFUNCTION
        (row,) = h.rows()
        assert (row.status, row.issuer_stan, row.cancelled) == (Status.DECLINED, "", Cancel.NONE)
        assert h.journal.saf_entries() == []

    run(tmp_path, network, body)


def test_late_advice_answer_settles_only_on_a_link_without_macs(tmp_path, network):
    async def body(h: Harness):
        link = h.links["BANKB"]
        link.online = False
        link.script = lambda m: LinkDown("offline")
        assert (await h.handle(b_request("000083")))[F.RESPONSE_CODE] == RC.APPROVED
        (entry,) = h.journal.saf_entries()                       # the stand-in 0220
        late = {F.MTI: "0230", F.STAN: entry.stan, F.RRN: entry.rrn, F.RESPONSE_CODE: "00"}
        link.mac = object()                                      # a link with MACs: not trusted late
        h.pipeline.on_late("BANKB", dict(late))
        assert h.pipeline.saf.total_depth == 1
        link.mac = None
        h.pipeline.on_late("BANKB", dict(late))
        assert h.pipeline.saf.total_depth == 0
        assert h.journal.saf_entries()[0].state == saf.DELIVERED

    run(tmp_path, network, body)
