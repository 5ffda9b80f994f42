"""The store-and-forward shell: a real journal on tmp_path, scripted bank links.

Delivery in order, waiting for the link, repeats as 0421 with the same STAN,
the window, parking (maximum age, refusal) with its alert, a late answer,
and resuming after a restart. Backoff is shortened by the policy, never
slept through: no test waits on wall-clock timing for its result.
"""

from __future__ import annotations

import asyncio
import itertools
import os

from cardswitch.iso8583.constants import F, response_mti
from cardswitch.switch import saf
from cardswitch.switch.banklink import LinkDown, LinkTimeout
from cardswitch.switch.journal import Journal
from cardswitch.switch.saf import SafEntry, SafForwarder, SafPolicy

SECRET = b"forwarder-test-secret"
FAST = SafPolicy(initial_s=0.01, max_s=0.05, window=8)
PAN = "6228480000000015"


class Link:
    """A bank link: online or not, answers from a script (dict: fields of the answer)."""

    def __init__(self, online: bool = True) -> None:
        self.online = online
        self._up = asyncio.Event()
        if online:
            self._up.set()
        self.sent: list[dict] = []
        self.script = lambda msg: {F.RESPONSE_CODE: "00"}
        self.gate: asyncio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self._stan = itertools.count(1)

    def up(self) -> None:
        self.online = True
        self._up.set()

    def reserve_stan(self) -> str:
        return f"{next(self._stan):06d}"

    async def wait_online(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def request(self, msg: dict, timeout_s: float, stan: str | None = None) -> dict:
        if not self.online:
            raise LinkDown("offline")
        msg[F.STAN] = stan
        self.sent.append(dict(msg))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            result = self.script(msg)
        finally:
            self.in_flight -= 1
        if isinstance(result, BaseException):
            raise result
        return {F.MTI: response_mti(msg[F.MTI]), F.STAN: msg[F.STAN], F.RRN: msg[F.RRN], **result}


def make_entry(fw: SafForwarder, link: Link, n: int, *, kind: str = saf.REVERSAL, bank: str = "BANKB",
               created_at: str = "", pan: str = "") -> SafEntry:
    rrn = f"6073{n:08d}"
    return SafEntry(
        id=fw.next_id(), bank_id=bank, kind=kind, txn_id=n, leg=saf.DEBIT_LEG,
        mti="0420" if kind == saf.REVERSAL else "0220", proc="000000", amount=100 * n, currency="156",
        orig_mti="0200" if kind == saf.REVERSAL else "", orig_stan=f"{n:06d}" if kind == saf.REVERSAL else "",
        orig_transmitted="0314101500" if kind == saf.REVERSAL else "", stan=link.reserve_stan(),
        transmitted="0314101600", rrn=rrn, terminal_id="POS00011", merchant_id="898110054110001",
        acquirer_inst="10000002", business_date="2026-03-14", auth_code="S00001" if pan else "",
        pan_sealed=fw.seal(pan, rrn) if pan else "", created_at=created_at or saf.utc_iso(fw.clock()))


class World:
    def __init__(self, tmp_path, *, links: dict[str, Link] | None = None, policy: SafPolicy = FAST,
                 clock=None) -> None:
        self.tmp_path = tmp_path
        self.journal = Journal.open("sqlite:///" + str(tmp_path / "j.db"), str(tmp_path))
        self.links = links or {"BANKB": Link()}
        self.alerts: list[tuple[str, dict]] = []
        kw = {"clock": clock} if clock else {}
        self.fw = SafForwarder(self.journal, self.links, switch_inst="99900001",
                               issuer_insts={"BANKA": "10000001", "BANKB": "10000002"}, secret=SECRET,
                               timeout_s=0.2, policy=policy,
                               on_alert=lambda kind, detail: self.alerts.append((kind, detail)), **kw)

    async def close(self) -> None:
        await self.fw.stop()
        self.journal.close()


def arun(coro):
    asyncio.run(asyncio.wait_for(coro, 30))       # bounded: a broken worker fails, never hangs


def test_advices_are_delivered_in_order_and_marked_in_the_journal(tmp_path):
    async def main():
        w = World(tmp_path)
        link = w.links["BANKB"]
        entries = [make_entry(w.fw, link, n) for n in (1, 2, 3)]
        for e in entries:
            w.fw.enqueue(e)
        assert w.fw.depth() == {"BANKB": 3} and w.fw.total_depth == 3
        assert await w.fw.drain(10)
        assert [m[F.ORIGINAL_DATA][4:10] for m in link.sent] == ["000001", "000002", "000003"]
        assert [m[F.MTI] for m in link.sent] == ["0420"] * 3
        assert [m[F.STAN] for m in link.sent] == [e.stan for e in entries]
        rows = w.journal.saf_entries()
        assert [(r.state, r.attempts) for r in rows] == [("delivered", 1)] * 3
        assert w.fw.depth() == {"BANKB": 0} and w.fw.delivered == 3 and w.alerts == []
        await w.close()

    arun(main())


def test_nothing_is_sent_while_the_link_is_down_then_all_of_it(tmp_path):
    async def main():
        link = Link(online=False)
        w = World(tmp_path, links={"BANKB": link})
        for n in (1, 2):
            w.fw.enqueue(make_entry(w.fw, link, n))
        assert await w.fw.drain(0.1) is True            # nothing deliverable: the bank is down
        await asyncio.sleep(0.05)
        assert link.sent == [] and w.fw.total_depth == 2
        link.up()
        for _ in range(400):
            if not w.fw.total_depth:
                break
            await asyncio.sleep(0.01)
        assert [m[F.MTI] for m in link.sent] == ["0420", "0420"] and w.fw.total_depth == 0
        await w.close()

    arun(main())


def test_unanswered_advice_is_repeated_as_0421_with_the_same_stan(tmp_path):
    async def main():
        w = World(tmp_path)
        link = w.links["BANKB"]
        answers = iter([LinkTimeout("no answer"), {F.RESPONSE_CODE: "96"}, {F.RESPONSE_CODE: "00"}])
        link.script = lambda msg: next(answers)
        e = make_entry(w.fw, link, 1)
        w.fw.enqueue(e)
        assert await w.fw.drain(10)
        assert [m[F.MTI] for m in link.sent] == ["0420", "0421", "0421"]
        assert len({m[F.STAN] for m in link.sent}) == 1 and len({m[F.TRANSMISSION_DT] for m in link.sent}) == 1
        (row,) = w.journal.saf_entries()
        assert (row.state, row.attempts, row.last_error) == ("delivered", 3, "")
        assert w.fw.retries == 2
        await w.close()

    arun(main())


def test_at_most_a_window_of_advices_in_flight(tmp_path):
    async def main():
        w = World(tmp_path, policy=SafPolicy(initial_s=0.01, max_s=0.05, window=3))
        link = w.links["BANKB"]
        link.gate = asyncio.Event()
        for n in range(1, 11):
            w.fw.enqueue(make_entry(w.fw, link, n))
        for _ in range(100):
            await asyncio.sleep(0.005)
            if link.in_flight == 3:
                break
        assert link.in_flight == 3 and len(link.sent) == 3       # no flood for a bank just back
        link.gate.set()
        assert await w.fw.drain(10)
        assert link.max_in_flight == 3 and len(link.sent) == 10
        assert [int(m[F.ORIGINAL_DATA][4:10]) for m in link.sent] == list(range(1, 11))
        await w.close()

    arun(main())


def test_banks_are_served_independently(tmp_path):
    async def main():
        a, b = Link(online=False), Link()
        w = World(tmp_path, links={"BANKA": a, "BANKB": b})
        w.fw.enqueue(make_entry(w.fw, a, 1, bank="BANKA"))
        w.fw.enqueue(make_entry(w.fw, b, 2, bank="BANKB"))
        assert await w.fw.drain(10)
        assert len(b.sent) == 1 and a.sent == [] and w.fw.depth() == {"BANKA": 1, "BANKB": 0}
        assert b.sent[0][F.RECEIVING_ID] == "10000002"
        await w.close()

    arun(main())


def test_refused_advice_is_parked_with_an_alert(tmp_path):
    async def main():
        w = World(tmp_path)
        link = w.links["BANKB"]
        link.script = lambda msg: {F.RESPONSE_CODE: "30"}
        w.fw.enqueue(make_entry(w.fw, link, 1))
        w.fw.enqueue(make_entry(w.fw, link, 2))
        assert await w.fw.drain(10)
        assert [r.state for r in w.journal.saf_entries()] == ["parked", "parked"]
        assert [k for k, _ in w.alerts] == ["saf", "saf"]
        detail = w.alerts[0][1]
        assert detail["reason"] == "refused" and detail["bank"] == "BANKB" and detail["txn"] == 1
        assert w.fw.alerts == 2 and w.fw.alert_counts == {"refused": 2} and w.fw.parked == 2
        await w.close()

    arun(main())


def test_advice_past_the_maximum_age_is_parked_at_load(tmp_path, caplog):
    now = [1_800_000_000.0]

    async def main():
        link = Link(online=False)
        w = World(tmp_path, links={"BANKB": link}, clock=lambda: now[0],
                  policy=SafPolicy(initial_s=0.01, max_age_s=3600))
        w.fw.enqueue(make_entry(w.fw, link, 1, created_at=saf.utc_iso(now[0] - 4000)))
        w.fw.enqueue(make_entry(w.fw, link, 2, created_at=saf.utc_iso(now[0] - 60)))
        await w.close()
        # The next start: the old one is parked, the young one still owed.
        w2 = World(tmp_path, links={"BANKB": link}, clock=lambda: now[0],
                   policy=SafPolicy(initial_s=0.01, max_age_s=3600))
        with caplog.at_level("ERROR", logger="cardswitch.saf"):
            assert w2.fw.load() == 2
        assert w2.fw.total_depth == 1
        assert [(r.txn_id, r.state) for r in w2.journal.saf_entries()] == [(1, "parked"), (2, "queued")]
        assert [(k, d["reason"], d["txn"]) for k, d in w2.alerts] == [("saf", "max_age", 1)]
        assert any("parked" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        # Time passes with the bank still down: the other one ages out too.
        now[0] += 3600
        w2.fw.start()
        for _ in range(200):
            if not w2.fw.total_depth:
                break
            await asyncio.sleep(0.01)
        assert w2.fw.total_depth == 0 and len(w2.alerts) == 2
        await w2.close()

    arun(main())


def test_queue_resumes_after_a_restart(tmp_path):
    async def main():
        link = Link()
        link.script = lambda msg: LinkTimeout("bank is slow")
        w = World(tmp_path, links={"BANKB": link})
        entries = [make_entry(w.fw, link, n) for n in (1, 2)]
        for e in entries:
            w.fw.enqueue(e)
        for _ in range(200):                     # at least one round sent and failed
            if len(link.sent) >= 2 and w.fw.retries >= 2:
                break
            await asyncio.sleep(0.005)
        await w.close()
        # Restart: a new journal object, a new forwarder, the same file.
        link2 = Link()
        w2 = World(tmp_path, links={"BANKB": link2})
        assert w2.fw.load() == 2
        w2.fw.start()
        assert await w2.fw.drain(10)
        assert [m[F.STAN] for m in link2.sent] == [e.stan for e in entries]    # same STANs as before
        assert {m[F.MTI] for m in link2.sent} == {"0421"}                      # they were sent before
        assert [r.state for r in w2.journal.saf_entries()] == ["delivered", "delivered"]
        # Ids go on after the restart.
        assert w2.fw.next_id() == 3
        await w2.close()

    arun(main())


def test_stand_in_advice_opens_its_sealed_pan_only_to_send(tmp_path):
    async def main():
        w = World(tmp_path)
        link = w.links["BANKB"]
        e = make_entry(w.fw, link, 1, kind=saf.STAND_IN, pan=PAN)
        w.fw.enqueue(e)
        assert await w.fw.drain(10)
        (msg,) = link.sent
        assert msg[F.MTI] == "0220" and msg[F.PAN] == PAN and msg[F.AUTH_CODE] == "S00001"
        (row,) = w.journal.saf_entries()
        assert row.state == "delivered" and PAN not in row.pan_sealed
        await w.close()
        for name in os.listdir(tmp_path):
            if name.startswith("j.db"):
                assert PAN.encode() not in (tmp_path / name).read_bytes(), name

    arun(main())


def test_a_late_answer_delivers_the_advice(tmp_path):
    async def main():
        link = Link()
        w = World(tmp_path, links={"BANKB": link}, policy=SafPolicy(initial_s=30, max_s=60))
        link.script = lambda msg: LinkTimeout("no answer")
        e = make_entry(w.fw, link, 1)
        w.fw.enqueue(e)
        for _ in range(200):
            if w.fw.retries:
                break
            await asyncio.sleep(0.005)
        assert w.fw.total_depth == 1                       # backing off for 30 s
        late = {F.MTI: "0430", F.STAN: e.stan, F.RRN: e.rrn, F.RESPONSE_CODE: "00"}
        assert w.fw.on_late("BANKB", late) is True
        assert w.fw.total_depth == 0
        assert w.fw.on_late("BANKB", dict(late, **{F.STAN: "999999"})) is False
        (row,) = w.journal.saf_entries()
        assert row.state == "delivered"
        await w.close()

    arun(main())


def test_enqueue_before_start_waits_for_start(tmp_path):
    # Entries queued while no loop runs the workers (start-up recovery) wait for start().
    w = World(tmp_path)
    link = w.links["BANKB"]
    e = make_entry(w.fw, link, 1)
    w.fw.enqueue(e)

    async def main():
        w.fw.start()
        assert await w.fw.drain(10)
        assert len(link.sent) == 1
        await w.close()

    arun(main())
