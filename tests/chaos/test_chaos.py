"""Chaos: faults under load, then every card's money checked to the minor unit.

The network runs as three `cardswitch up --only` processes (HSM, banks,
switch). Simulated terminals (a load driver in this test, pyiso8583 on the
wire, recording every request and answer) send purchases (some with a PIN,
one terminal with MACs), refunds, interbank transfers, reversals of their own
approvals, and purchases on a card whose bank answers after the issuer
timeout. Meanwhile:

1. the banks' process is stopped and started again (Bank B stands in);
2. the banks' process is paused (SIGSTOP) past the issuer timeout, then
   continued (SIGCONT): timeouts, reversals, late answers;
3. the switch is killed (SIGKILL) under load and started again;
4. the HSM is stopped and started again (PIN and MAC requests get 96);
5. the banks are stopped, the switch is killed and restarted while they are
   down, then the banks return (advices owed across the crash).

A terminal that gets no answer (the switch died under it) sends a 0400 for
that request once it can reconnect, as terminals do.

Afterwards, with everything stopped: the store-and-forward queue is empty
(all delivered, nothing parked); no journal row is left without an outcome;
every approval a terminal received is in the journal, approved, and reversed
only if that terminal reversed it; for every card, its bank's balance change
equals the sum of the switch's approved, unreversed transactions for it
(debits negative, credits positive); and no bank holds two postings of one
request. The test prints what it checked.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import iso8583
import pytest

from chaos_support import Parts, wait_until
from e2e_support import (
    PURCHASE, REFUND, SPEC, TRANSFER, Term, add_mac, default_test_network, field90, frame, make_pan,
    pin_block, terminals_of, utc_field7,
)

from cardswitch.config import Card, StandIn
from cardswitch.pan import mask_pan, pan_token
from cardswitch.switch.records import Cancel, Kind, Status

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

ISSUER_TIMEOUT_MS = 1000
ANSWER_TIMEOUT_S = 10.0
BALANCE = 10_000_000
SEED = 20260314

# Chaos cards (unique masked PANs within each bank), PIN 1234.
CARDS = {
    "BANKA": [make_pan("622126", 7771), make_pan("622126", 7772), make_pan("622126", 7773)],
    "BANKB": [make_pan("622848", 7771), make_pan("622848", 7772), make_pan("622848", 7773)],
    "BANKC": [make_pan("621700", 7771), make_pan("621700", 7772)],
}
SLOW = make_pan("621700", 7779)          # Bank C answers it after the issuer timeout
ALL_CARDS = [p for ps in CARDS.values() for p in ps] + [SLOW]
BANK_OF = {p: b for b, ps in CARDS.items() for p in ps} | {SLOW: "BANKC"}

# (terminal, whether this worker sends PIN blocks)
WORKERS = [("POS00002", False), ("POS00002", True), ("POS00012", False), ("POS00013", False),
           ("POS00022", False), ("POS00001", False)]          # POS00001 MACs its requests


def chaos_network(workdir: Path):
    net = default_test_network(workdir / "var")
    banks = []
    for b in net.banks:
        extra = [Card(pan=p, expiry="3012", pin="1234", balance=BALANCE) for p in CARDS[b.id]]
        if b.id == "BANKC":
            extra.append(Card(pan=SLOW, expiry="3012", pin="1234", balance=BALANCE, delay_ms=1500))
        stand_in = StandIn(max_amount=50_000, allowed="00,20") if b.id == "BANKB" else b.stand_in
        banks.append(replace(b, cards=b.cards + tuple(extra), stand_in=stand_in))
    sw = replace(net.switch, issuer_timeout_ms=ISSUER_TIMEOUT_MS, echo_interval_ms=1000)
    return replace(net, switch=sw, banks=tuple(banks))


# -- the load driver ---------------------------------------------------------------------------


@dataclass
class Exchange:
    req: dict
    resp: dict | None = None


@dataclass
class Worker:
    term: Term
    port: int
    pins: bool
    stans: itertools.count
    rng: random.Random
    log: list[Exchange] = field(default_factory=list)
    unanswered: list[dict] = field(default_factory=list)      # originals to reverse
    approved: list[dict] = field(default_factory=list)        # purchases this terminal may reverse
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    connects: int = 0
    give_up_at: float = float("inf")        # once the load stops: how long to keep reversing

    def stan(self) -> str:
        return f"{next(self.stans) % 1_000_000:06d}"

    def base(self, mti: str, tt: str, pan: str | None, amount: int | None) -> dict:
        now = time.gmtime()
        doc = {"t": mti, "3": f"{tt}0000", "7": utc_field7(), "11": self.stan(),
               "12": time.strftime("%H%M%S", now), "13": time.strftime("%m%d", now), "22": "021",
               "25": "00", "41": self.term.tid, "42": self.term.mid, "49": self.term.currency,
               "60": "000001"}
        if pan is not None:
            doc["2"] = pan
        if amount is not None:
            doc["4"] = f"{amount:012d}"
        return doc

    def reversal_of(self, orig: dict) -> dict:
        doc = self.base("0400", orig["3"][:2], orig.get("2"), int(orig.get("4", "0")))
        doc["90"] = field90(orig["t"], orig["11"], orig["7"], self.term.acquirer_inst)
        return doc

    def next_request(self) -> dict:
        r = self.rng.random()
        if r < 0.08 and self.approved:
            return self.reversal_of(self.approved.pop(self.rng.randrange(len(self.approved))))
        if r < 0.14:
            return self.base("0200", PURCHASE, SLOW, self.rng.randint(100, 900))
        card = self.rng.choice(ALL_CARDS[:-1])
        amount = self.rng.randint(100, 3_000)
        if r < 0.24:
            return self.base("0200", REFUND, card, amount)
        if r < 0.32:
            to = self.rng.choice([p for p in ALL_CARDS[:-1] if BANK_OF[p] != BANK_OF[card]])
            doc = self.base("0200", TRANSFER, card, amount)
            doc["103"] = to
            return doc
        doc = self.base("0200", PURCHASE, card, amount)
        if self.pins and self.term.tpk is not None:
            doc["52"] = pin_block("1234", card, self.term.tpk)
            doc["22"] = "051"
        return doc

    def encode(self, doc: dict) -> bytes:
        if self.term.tak is not None:
            doc = add_mac(doc, self.term.tak)
        raw, _ = iso8583.encode(dict(doc), SPEC)
        return frame(bytes(raw))

    async def connect(self, stop: threading.Event) -> bool:
        while not stop.is_set() or self.unanswered:
            try:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
                self.connects += 1
                return True
            except OSError:
                await asyncio.sleep(0.2)
                if stop.is_set() and time.monotonic() > self.give_up_at:
                    return False
        return False

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, req: dict) -> dict | None:
        """Send, and the answer (matched by 41 + 11), or None when none came."""
        assert self.writer is not None and self.reader is not None
        try:
            self.writer.write(self.encode(req))
            await self.writer.drain()
            while True:
                head = await asyncio.wait_for(self.reader.readexactly(2), ANSWER_TIMEOUT_S)
                body = await asyncio.wait_for(self.reader.readexactly(int.from_bytes(head, "big")),
                                              ANSWER_TIMEOUT_S)
                doc, _ = iso8583.decode(body, SPEC)
                if doc.get("11") == req["11"] and doc.get("41") == req["41"]:
                    return doc
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            self.drop()
            return None

    async def send(self, req: dict) -> dict | None:
        resp = await self.exchange(req)
        self.log.append(Exchange(req, resp))
        if resp is None and req["t"] != "0400":
            self.unanswered.append(req)
        elif resp is not None and resp.get("39") == "00" and req["t"] == "0200" and req["3"][:2] == PURCHASE \
                and "2" in req and req["2"] != SLOW:
            self.approved.append(req)
        return resp

    async def reverse_unanswered(self) -> None:
        """What a terminal does after a request went unanswered: reverse it (0400)."""
        while self.unanswered and self.writer is not None:
            orig = self.unanswered[0]
            rev = self.reversal_of(orig)
            resp = await self.exchange(rev)
            self.log.append(Exchange(rev, resp))
            if resp is None:
                return
            self.unanswered.pop(0)

    async def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.writer is None and not await self.connect(stop):
                return
            await self.reverse_unanswered()
            if self.writer is None:
                continue
            await self.send(self.next_request())
            await asyncio.sleep(self.rng.uniform(0.005, 0.03))
        # Load stopped: settle what is still unanswered before leaving.
        self.give_up_at = time.monotonic() + 60
        while self.unanswered and time.monotonic() < self.give_up_at:
            if self.writer is None and not await self.connect(stop):
                break
            await self.reverse_unanswered()
        self.drop()


class Load:
    def __init__(self, net, port: int) -> None:
        terms = terminals_of(net)
        rng = random.Random(SEED)
        self.workers = [Worker(terms[tid], port, pins, itertools.count(100_000 * (i + 1)),
                               random.Random(rng.random())) for i, (tid, pins) in enumerate(WORKERS)]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.error: BaseException | None = None

    async def _main(self) -> None:
        try:
            await asyncio.gather(*(w.run(self.stop) for w in self.workers))
        except BaseException as e:          # surfaced by finish()
            self.error = e

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), "the load driver did not stop"
        if self.error is not None:
            raise self.error

    def answered(self) -> int:
        return sum(1 for w in self.workers for e in w.log if e.resp is not None)


# -- the test ------------------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path):
    p = Parts(chaos_network(tmp_path), tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def test_chaos(parts):
    parts.start_all()
    load = Load(parts.net, parts.net.switch.listen.port)
    load.start()
    t0 = time.monotonic()

    def progress(n: int, seconds: float) -> None:
        """Let the load run ``seconds`` and at least ``n`` more answers arrive (bounded)."""
        want = load.answered() + n
        end = time.monotonic() + seconds
        wait_until(lambda: load.answered() >= want and time.monotonic() >= end, seconds + 60,
                   f"{n} more answers under load")

    try:
        progress(50, 2)
        # 1. The banks go away and come back.
        parts.stop("banks")
        progress(20, 3)
        parts.start("banks")
        progress(50, 3)
        # 2. The banks freeze past the issuer timeout.
        pid = parts.pause("banks")
        time.sleep(2.5)
        parts.resume(pid)
        progress(50, 3)
        # 3. The switch dies under load.
        parts.crash("switch")
        parts.start("switch")
        progress(50, 3)
        # 4. The HSM goes away and comes back.
        parts.stop("hsm")
        progress(20, 3)
        parts.start("hsm")
        progress(50, 3)
        # 5. The banks go, the switch dies and restarts without them, the banks return.
        parts.stop("banks")
        progress(10, 2)
        parts.crash("switch")
        parts.start("switch")
        progress(10, 2)
        parts.start("banks")
        progress(50, 3)
    finally:
        load.finish()
    load_s = time.monotonic() - t0

    # Everything owed is delivered, then everything stops.
    wait_until(lambda: parts.saf_counts().get("queued", 0) == 0, 120, "the store-and-forward queue empty")
    parts.stop_all()
    check(parts, load, load_s)


def check(parts: Parts, load: Load, load_s: float) -> None:
    j = parts.journal()
    try:
        rows = j.rows()
        saf_entries = j.saf_entries()
        assert j.pending() == [], "journal rows left without an outcome"
    finally:
        j.close()
    states = {e.state for e in saf_entries}
    assert states <= {"delivered"}, f"advices not delivered: {[e.describe() for e in saf_entries if e.state != 'delivered']}"

    # Every approval a terminal saw is in the journal, approved; reversed only if that terminal reversed it.
    by_key = {(r.terminal_id, r.stan, r.transmitted, r.mti[:3]): r for r in rows}
    reversed_by_terminal = set()
    approvals = []
    for w in load.workers:
        for e in w.log:
            if e.resp is None or e.resp.get("39") != "00":
                continue
            if e.req["t"] == "0400":
                od = e.req["90"]
                reversed_by_terminal.add((e.req["41"], od[4:10], od[10:20], od[:3]))
            else:
                approvals.append(e)
    for e in approvals:
        key = (e.req["41"], e.req["11"], e.req["7"], e.req["t"][:3])
        row = by_key.get(key)
        assert row is not None, f"approved {key} is not in the journal"
        assert row.status == Status.APPROVED and row.rrn == e.resp["37"], (key, row.status)
        if key not in reversed_by_terminal:
            assert row.cancelled == Cancel.NONE, f"approved {key} was {row.cancelled} without the terminal"

    # Every card: the bank's balance change equals what the switch approved and did not undo.
    secret = bytes.fromhex((parts.data_dir / "token.key").read_text().strip())
    tokens = {pan_token(p, secret): p for p in ALL_CARDS}
    expected = dict.fromkeys(ALL_CARDS, 0)
    counted = 0
    for r in rows:
        if r.status != Status.APPROVED or r.cancelled in (Cancel.REVERSED, Cancel.VOIDED):
            continue
        sign = {Kind.PURCHASE: -1, Kind.REFUND: 1, Kind.TRANSFER: -1}.get(r.kind)
        if sign is None or r.pan_token not in tokens:
            continue
        counted += 1
        expected[tokens[r.pan_token]] += sign * r.amount
        if r.kind == Kind.TRANSFER:
            expected[tokens[r.to_pan_token]] += r.amount
    problems = []
    for pan in ALL_CARDS:
        change = parts.bank_balance(BANK_OF[pan], mask_pan(pan)) - BALANCE
        if change != expected[pan]:
            problems.append(f"{mask_pan(pan)}: bank moved {change}, switch approved {expected[pan]}")
    assert not problems, "\n".join(problems)

    # No bank holds two postings of one request.
    for bank in CARDS:
        con = parts.bank_db(bank)
        try:
            dupes = con.execute(
                "SELECT rrn, substr(mti, 1, 3), COUNT(*) FROM txns WHERE effects != '[]' "
                "GROUP BY rrn, substr(mti, 1, 3), pan_token HAVING COUNT(*) > 1").fetchall()
        finally:
            con.close()
        assert dupes == [], f"{bank} posted a request twice: {dupes}"

    sent = sum(len(w.log) for w in load.workers)
    stood_in = sum(1 for r in rows if r.stand_in and r.status == Status.APPROVED)
    reversals = sum(1 for e in saf_entries if e.kind == "reversal")
    late = sum(1 for r in rows if r.late_response_code)
    timeouts = sum(1 for r in rows if r.status == Status.TIMEOUT)
    print(f"\nchaos: {load_s:.0f} s of load, {sent} requests sent by {len(load.workers)} terminals "
          f"({len(approvals)} approvals received, {sum(w.connects for w in load.workers)} connections); "
          f"checked {len(ALL_CARDS)} cards and {counted} approved money transactions against the banks; "
          f"{reversals} reversal advices delivered ({len(reversed_by_terminal)} asked by terminals, "
          f"{timeouts} timeouts, {late} late answers), {stood_in} stand-in approvals, "
          f"{sum(1 for e in saf_entries if e.kind == 'stand_in')} stand-in advices delivered")
    assert approvals and reversals and stood_in and timeouts, "the chaos did not exercise what it should"
