"""The events hook on the real pipeline: what ``stats.count(t, rc)`` hands over
makes the right events, and the trace bound for the request reaches the
events and the bank leg's log lines. No sockets, no broker: the publisher is
not started and its buffer is read.
"""

from __future__ import annotations

import asyncio
import io
import logging
from datetime import datetime, timezone

import orjson
import pytest

from cardswitch.iso8583.constants import RC, F, response_mti
from cardswitch.iso8583.fields import format_field90
from cardswitch.logs import JsonFormatter, bind_trace, current_trace
from cardswitch.merchants.registry import Registry
from cardswitch.netfile import load_network
from cardswitch.routing.bintable import BinTable
from cardswitch.switch.clock import RrnAllocator
from cardswitch.switch.events import EventPublisher, Fanout
from cardswitch.switch.index import TxnIndex
from cardswitch.switch.journal import Journal
from cardswitch.switch.pipeline import Pipeline
from cardswitch.switch.steps import Context

BUSINESS_DATE = "2026-03-14"
DAY = datetime(2026, 3, 14, 10, 0, tzinfo=timezone.utc)
POS, POS_MID = "POS00001", "898440158120001"      # default network: acquired by BANKA
CARD_A = "6221260000000018"                       # issued by BANKA

bank_log = logging.getLogger("cardswitch.test_events_pipeline.bank")


class FakeLink:
    """An always-online bank link answering from ``answer`` and logging a line
    in the caller's task, as BankLink.request runs."""

    online = True

    def __init__(self, bank_id: str) -> None:
        self.bank_id = bank_id
        self.answer = RC.APPROVED
        self.stan = 0

    def reserve_stan(self) -> str:
        self.stan += 1
        return f"{self.stan:06d}"

    async def wait_online(self, timeout: float | None = None) -> bool:
        return True

    async def request(self, msg: dict, timeout_s: float, stan: str | None = None) -> dict:
        msg[F.STAN] = stan or self.reserve_stan()
        bank_log.info("bank %s: %s stan %s sent", self.bank_id, msg[F.MTI], msg[F.STAN])
        await asyncio.sleep(0)
        resp = {F.MTI: response_mti(msg[F.MTI]), F.STAN: msg[F.STAN], F.RRN: msg.get(F.RRN, ""),
                F.RESPONSE_CODE: self.answer}
        if self.answer == RC.APPROVED:
            resp[F.AUTH_CODE] = "A" + msg[F.STAN][-5:]
        return resp


class Counter:
    def __init__(self) -> None:
        self.rcs: list[str] = []

    def count(self, t, rc: str) -> None:
        self.rcs.append(rc)


def request(stan: str, amount: int = 1000, **extra) -> dict:
    msg = {F.MTI: "0200", F.PROC: "000000", F.TRANSMISSION_DT: f"03141015{int(stan) % 60:02d}",
           F.STAN: stan, F.LOCAL_TIME: "181500", F.LOCAL_DATE: "0314", F.ENTRY_MODE: "021",
           F.CONDITION_CODE: "00", F.TERMINAL_ID: POS, F.MERCHANT_ID: POS_MID, F.CURRENCY: "156",
           F.BATCH_NUMBER: "000001", F.PAN: CARD_A, F.AMOUNT: f"{amount:012d}"}
    msg.update(extra)
    return msg


def reversal(orig: dict, stan: str) -> dict:
    f90 = format_field90(orig[F.MTI], orig[F.STAN], orig[F.TRANSMISSION_DT], "10000001", "0")
    return {F.MTI: "0400", F.PROC: orig[F.PROC], F.AMOUNT: orig[F.AMOUNT],
            F.TRANSMISSION_DT: f"03141020{int(stan) % 60:02d}", F.STAN: stan,
            F.TERMINAL_ID: POS, F.MERCHANT_ID: POS_MID, F.CURRENCY: "156",
            F.BATCH_NUMBER: orig[F.BATCH_NUMBER], F.ORIGINAL_DATA: f90}


@pytest.fixture
def bank_lines():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    bank_log.handlers[:] = [handler]
    bank_log.setLevel(logging.INFO)
    bank_log.propagate = False
    yield lambda: [orjson.loads(x) for x in buf.getvalue().splitlines()]
    bank_log.handlers[:] = []


def test_pipeline_hook_publishes_txn_and_notices_with_the_request_trace(tmp_path, bank_lines):
    network = load_network(None)

    async def main():
        journal = Journal.open("sqlite:///" + str(tmp_path / "j.db"), str(tmp_path))
        ctx = Context(network=network, registry=Registry.from_network(network),
                      bins=BinTable.from_network(network), index=TxnIndex(),
                      token_secret=b"events-test-secret", business_date=BUSINESS_DATE)
        links = {b.id: FakeLink(b.id) for b in network.banks}
        rrn = RrnAllocator(lambda prefix, wanted: wanted)
        metrics = Counter()
        events = EventPublisher("mqtt://127.0.0.1:1", merchant_names={POS_MID: "Test Shop"})

        async def no_pin(*a):
            raise AssertionError("no PIN here")

        pipeline = Pipeline(ctx, journal, links, rrn=lambda: rrn.next(DAY), translate_pin=no_pin,
                            issuer_timeout_s=0.5, stats=Fanout(metrics, events))

        async def handle(req: dict) -> tuple[str, dict]:
            # Pipeline.handle binds a new trace first; read it back in the same task.
            async def task() -> tuple[str, dict]:
                resp = await pipeline.handle(dict(req))
                return current_trace(), resp
            return await asyncio.get_running_loop().create_task(task())

        try:
            purchase = request("000011")
            t1, r1 = await handle(purchase)
            links["BANKA"].answer = "51"
            t2, r2 = await handle(request("000012", amount=999_999))
            links["BANKA"].answer = RC.APPROVED
            t3, r3 = await handle(reversal(purchase, "000013"))
            t4, r4 = await handle(reversal(purchase, "000014"))     # already reversed: no change
            for drain in (getattr(pipeline, "drain", None), getattr(pipeline, "stop", None)):
                if drain is not None:
                    await drain()
        finally:
            journal.close()
        return events, metrics, (t1, t2, t3, t4), (r1, r2, r3, r4)

    events, metrics, traces, resps = asyncio.run(main())
    t1, t2, t3, t4 = traces
    assert [r[F.RESPONSE_CODE] for r in resps] == ["00", "51", "00", "00"]
    assert metrics.rcs == ["00", "51", "00", "00"]          # both hooks saw every transaction

    out = [(e.topic, orjson.loads(e.payload)) for e in events._buf]
    txns = [ev for topic, ev in out if topic == f"cardswitch/txn/{POS_MID}"]
    notices = [ev for topic, ev in out if topic == "cardswitch/notify/BANKA"]
    assert len(out) == len(txns) + len(notices)
    assert [ev["trace"] for ev in txns] == [t1, t2, t3, t4]
    assert [(ev["kind"], ev["response_code"], ev["amount"]) for ev in txns] == [
        ("purchase", "00", 1000), ("purchase", "51", 999_999), ("reversal", "00", 1000), ("reversal", "00", 1000)]
    assert all(ev["pan_masked"] in ("622126******0018", "") for ev in txns)
    assert txns[0]["rrn"] and txns[0]["auth_code"] and txns[0]["pan_token"]

    # Approved purchase: a debit; its reversal: the credit back; the repeat reversal: nothing.
    assert [(ev["trace"], ev["direction"], ev["amount"], ev["kind"]) for ev in notices] == [
        (t1, "debit", 1000, "purchase"), (t3, "credit", 1000, "reversal")]
    assert notices[0]["merchant_name"] == "Test Shop" and notices[0]["pan_masked"] == "622126******0018"
    assert notices[1]["reverses"]["id"] == txns[0]["id"]
    assert all(CARD_A not in e.payload.decode() for e in events._buf)

    # The bank leg logged inside the transaction's task: its lines carry the trace.
    sent = [line for line in bank_lines() if "0200 stan" in line["msg"]]
    assert [line["trace"] for line in sent] == [t1, t2]
