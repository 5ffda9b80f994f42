"""`cardswitch demo`: a business day on the demo network, start to finish.

Starts the built-in network (switch and simulated banks, on free ports, with
a fresh data directory) with `cardswitch up`, drives a scripted day from its
POS terminals and ATMs, closes the batches, and prints what happened.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cardswitch.config import Card, Network
from cardswitch.iso8583.constants import PROC_BATCH_UPLOAD_TRAILER, RC, RC_TEXT, F
from cardswitch.iso8583.dialect import Message
from cardswitch.pan import luhn_check_digit, mask_pan
from cardswitch.terminal import Sent, TerminalClient, TerminalState, batch_close_request, build_request
from cardswitch.txncmd import pin_block_for, terminal_state


@dataclass
class Step:
    title: str
    terminal: str
    kind: str
    pan: str
    amount: int = 0
    pin: str = ""
    expect: str = RC.APPROVED
    to_pan: str = ""
    original: str = ""          # name of an earlier step (void, completion, reversal)
    name: str = ""
    same_as: str = ""           # resend an earlier step's request unchanged (duplicate)


@dataclass
class Outcome:
    step: Step
    sent: Sent
    response: Message
    ms: float


@dataclass
class Cards:
    """The demo network's cards by the role they play."""

    rich: dict[str, Card] = field(default_factory=dict)     # per bank
    low_balance: Card | None = None
    expired: Card | None = None
    lost: Card | None = None
    stolen: Card | None = None
    blocked: Card | None = None
    small_limit: Card | None = None
    slow: Card | None = None


def pick_cards(net: Network) -> Cards:
    c = Cards()
    for bank in net.banks:
        normal = [k for k in bank.cards if k.status == "active" and k.delay_ms == 0 and k.expiry >= "2701"]
        if normal:
            c.rich[bank.id] = max(normal, key=lambda k: k.balance)
        for k in bank.cards:
            if k.status == "lost":
                c.lost = c.lost or k
            elif k.status == "stolen":
                c.stolen = c.stolen or k
            elif k.status == "blocked":
                c.blocked = c.blocked or k
            elif k.delay_ms > 0:
                c.slow = c.slow or k
            elif k.expiry < "2601":
                c.expired = c.expired or k
            elif k.balance < 100_000:
                c.low_balance = c.low_balance or k
            elif 0 < k.daily_withdrawal_limit < 100_000:
                c.small_limit = c.small_limit or k
    return c


def script(net: Network) -> list[Step]:
    cards = pick_cards(net)
    banks = [b.id for b in net.banks]
    a, b, c = (cards.rich[banks[i % len(banks)]] for i in range(3))
    pos = [t for t in net.terminals() if t.kind == "pos"]
    atm = [t for t in net.terminals() if t.kind == "atm"]
    p1, p2, p3 = pos[0].id, pos[len(pos) // 2].id, pos[-1].id
    a1, a2 = atm[0].id, atm[-1].id
    bad_luhn = a.pan[:-1] + str((int(a.pan[-1]) + 1) % 10)
    no_route = "999999000000000"
    no_route += luhn_check_digit(no_route)
    steps = [
        Step("purchase, on-us card", p1, "purchase", a.pan, 12_800, name="coffee"),
        Step("purchase, card of another bank", p1, "purchase", b.pan, 45_000),
        Step("purchase with PIN", p2, "purchase", c.pan, 238_50, pin=c.pin, name="groceries"),
        Step("purchase, wrong PIN", p2, "purchase", c.pan, 1_000, pin=_wrong(c.pin), expect=RC.INCORRECT_PIN),
        Step("void of the groceries", p2, "void", c.pan, 238_50, original="groceries"),
        Step("pre-authorization (fuel)", p3, "preauth", b.pan, 50_000, name="fuel-hold"),
        Step("completion of the fuel hold", p3, "completion", b.pan, 32_070, original="fuel-hold"),
        Step("refund", p1, "refund", b.pan, 4_500),
        Step("bill payment", p3, "bill", a.pan, 19_900),
        Step("transfer to a card at another bank", p1, "transfer", a.pan, 100_000, to_pan=c.pan),
        Step("balance inquiry at an ATM", a1, "balance", a.pan, pin=a.pin),
        Step("cash withdrawal", a1, "withdrawal", a.pan, 200_000, pin=a.pin),
        Step("cash withdrawal, card of another bank", a2, "withdrawal", b.pan, 50_000, pin=b.pin),
        Step("cash deposit", a2, "deposit", b.pan, 30_000, pin=b.pin),
        Step("purchase, reversed by the terminal", p2, "purchase", a.pan, 7_700, name="cancelled"),
        Step("reversal of that purchase", p2, "reversal", a.pan, 7_700, original="cancelled"),
        Step("resend of the same request", p1, "purchase", a.pan, 12_800, expect=RC.DUPLICATE, same_as="coffee"),
        Step("card number fails Luhn", p1, "purchase", bad_luhn, 1_000, expect=RC.INVALID_CARD),
        Step("no issuer for the BIN", p1, "purchase", no_route, 1_000, expect=RC.NO_SUCH_ISSUER),
        Step("cash withdrawal at a POS", p1, "withdrawal", a.pan, 1_000, expect=RC.NOT_PERMITTED_TERMINAL),
        Step("transfer to an unknown account", p1, "transfer", a.pan, 1_000, to_pan=no_route,
             expect=RC.NO_SUCH_ACCOUNT),
    ]
    if cards.low_balance:
        steps.append(Step("purchase beyond the balance", p1, "purchase", cards.low_balance.pan, 990_000,
                          expect=RC.INSUFFICIENT_FUNDS))
    if cards.expired:
        steps.append(Step("expired card", p1, "purchase", cards.expired.pan, 1_000, expect=RC.EXPIRED_CARD))
    if cards.lost:
        steps.append(Step("card reported lost", p2, "purchase", cards.lost.pan, 1_000, expect=RC.LOST_CARD))
    if cards.stolen:
        steps.append(Step("card reported stolen", p2, "purchase", cards.stolen.pan, 1_000, expect=RC.STOLEN_CARD))
    if cards.small_limit:
        steps.append(Step("withdrawal above the daily limit", a1, "withdrawal", cards.small_limit.pan,
                          cards.small_limit.daily_withdrawal_limit + 10_000, pin=cards.small_limit.pin,
                          expect=RC.EXCEEDS_WITHDRAWAL_LIMIT))
    if cards.slow:
        steps.append(Step("issuer answers too late", p3, "purchase", cards.slow.pan, 5_000,
                          expect=RC.ISSUER_INOPERATIVE, name="late"))
        steps.append(Step("terminal reverses the timed-out purchase", p3, "reversal", cards.slow.pan, 5_000,
                          original="late"))
    return steps


def _wrong(pin: str) -> str:
    return "".join(str((int(d) + 1) % 10) for d in pin)


class Day:
    """Runs the script against a live switch, one terminal state per terminal."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.terms: dict[str, TerminalState] = {}
        self.clients: dict[str, TerminalClient] = {}
        self.sent: dict[str, Sent] = {}
        self.requests: dict[str, Message] = {}
        self.outcomes: list[Outcome] = []

    async def client(self, tid: str) -> tuple[TerminalState, TerminalClient]:
        if tid not in self.clients:
            self.terms[tid] = terminal_state(self.net, tid)
            self.clients[tid] = await TerminalClient.connect(self.net.switch.listen, self.net.switch.link)
        return self.terms[tid], self.clients[tid]

    async def run(self, steps: list[Step]) -> None:
        for st in steps:
            term, client = await self.client(st.terminal)
            if st.same_as:
                req = dict(self.requests[st.same_as])
            else:
                pin = pin_block_for(term, st.pin, st.pan) if st.pin else ""
                orig = self.sent.get(st.original) if st.original else None
                req = build_request(term, st.kind, pan=st.pan, amount=st.amount, pin_block=pin,
                                    to_pan=st.to_pan, original=orig)
            t0 = time.perf_counter()
            resp = await client.send(req, tak=term.tak)
            ms = (time.perf_counter() - t0) * 1000
            sent = Sent(req[F.MTI], req[F.STAN], req[F.TRANSMISSION_DT], req[F.PROC], st.amount, st.pan,
                        resp.get(F.RRN, ""), resp.get(F.AUTH_CODE, ""), resp.get(F.RESPONSE_CODE, ""))
            if st.name:
                self.sent[st.name] = sent
                self.requests[st.name] = req
            self.outcomes.append(Outcome(st, sent, resp, ms))

    async def close_batches(self, out_of_balance: str) -> list[tuple[str, str, str]]:
        """Close every terminal's batch with the terminal's own totals; one terminal
        miscounts, gets 95, uploads its transactions and closes with 960000."""
        results = []
        for tid in sorted(self.terms):
            term, client = self.terms[tid], self.clients[tid]
            credits, debits = self.terminal_totals(tid)
            if tid == out_of_balance:
                debits = (debits[0] + 1, debits[1] + 1_000)   # a sale the terminal thinks it made
            resp = await client.send(batch_close_request(term, credits, debits), tak=term.tak)
            rc = resp[F.RESPONSE_CODE]
            detail = ""
            if rc == RC.RECONCILE_ERROR:
                await self.upload(tid)
                trailer = await client.send(batch_close_request(term, credits, debits, PROC_BATCH_UPLOAD_TRAILER),
                                            tak=term.tak)
                detail = f"uploaded, then closed with 960000: {trailer[F.RESPONSE_CODE]}"
            results.append((tid, rc, detail))
        return results

    def terminal_totals(self, tid: str) -> tuple[tuple[int, int], tuple[int, int]]:
        credit_kinds, debit_kinds = {"refund", "deposit"}, {"purchase", "completion", "withdrawal", "bill",
                                                             "transfer"}
        cancelled = set()
        for o in self.outcomes:
            if o.step.terminal == tid and o.step.kind in ("void", "reversal") and \
                    o.response.get(F.RESPONSE_CODE) == RC.APPROVED:
                cancelled.add(o.step.original)
        cn = ca = dn = da = 0
        for o in self.outcomes:
            if o.step.terminal != tid or o.response.get(F.RESPONSE_CODE) != RC.APPROVED or o.step.same_as:
                continue
            if o.step.name and o.step.name in cancelled:
                continue
            if o.step.kind in credit_kinds:
                cn, ca = cn + 1, ca + o.step.amount
            elif o.step.kind in debit_kinds:
                dn, da = dn + 1, da + o.step.amount
        return (cn, ca), (dn, da)

    async def upload(self, tid: str) -> None:
        term, client = self.terms[tid], self.clients[tid]
        for o in self.outcomes:
            if o.step.terminal != tid or o.response.get(F.RESPONSE_CODE) != RC.APPROVED or o.step.same_as:
                continue
            req = dict(self.requests.get(o.step.name) or {}) or build_request(term, o.step.kind, pan=o.step.pan,
                                                                               amount=o.step.amount)
            req[F.MTI] = "0320"
            req[F.RRN] = o.sent.rrn
            if o.sent.auth_code:
                req[F.AUTH_CODE] = o.sent.auth_code
            req[F.STAN] = term.next_stan()
            req.pop(F.PIN_BLOCK, None)
            await client.send(req, tak=term.tak)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def summary(outcomes: list[Outcome], batches: list[tuple[str, str, str]]) -> str:
    lines = []
    head = f"{'#':>2}  {'transaction':<42} {'terminal':<9} {'card':<17} {'amount':>11}  {'answer':<28} {'ms':>6}  ok"
    lines.append(head)
    lines.append("-" * len(head))
    ok_all = True
    for i, o in enumerate(outcomes, 1):
        rc = o.response.get(F.RESPONSE_CODE, "--")
        ok = rc == o.step.expect
        ok_all &= ok
        amount = f"{o.step.amount / 100:,.2f}" if o.step.amount else ""
        answer = f"{rc} {RC_TEXT.get(rc, '')}"
        lines.append(f"{i:>2}  {o.step.title:<42} {o.step.terminal:<9} {mask_pan(o.step.pan):<17} "
                     f"{amount:>11}  {answer:<28} {o.ms:>6.1f}  {'yes' if ok else 'NO (expected ' + o.step.expect + ')'}")
    lines.append("")
    mix = Counter(o.response.get(F.RESPONSE_CODE, "--") for o in outcomes)
    lines.append("answers: " + ", ".join(f"{rc} {RC_TEXT.get(rc, '')} x{n}" for rc, n in sorted(mix.items())))
    lines.append("")
    lines.append("batch close:")
    for tid, rc, detail in batches:
        ok_all &= rc in (RC.APPROVED, RC.RECONCILE_ERROR)
        lines.append(f"  {tid:<9} {rc} {RC_TEXT.get(rc, '')}{'; ' + detail if detail else ''}")
    lines.append("")
    lines.append("every answer as expected" if ok_all else "SOME ANSWERS DIFFER FROM WHAT WAS EXPECTED")
    return "\n".join(lines)


def _operator(net_file: Path, *argv: str) -> tuple[int, str]:
    """Run one `cardswitch` command as an operator would; its exit code and output."""
    p = subprocess.run([sys.executable, "-m", "cardswitch.cli", *argv, "-c", str(net_file)],
                       capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).rstrip()


def end_of_day(net: Network, net_file: Path) -> bool:
    """Cutover, settlement, and reconciliation of every simulated bank."""
    print("\n$ cardswitch cutover", flush=True)
    rc, out = _operator(net_file, "cutover")
    print(out)
    if rc != 0 or "->" not in out:
        return False
    day = out.split()[2]                         # "business date A -> B"
    print(f"\n$ cardswitch settle --date {day}", flush=True)
    rc, out = _operator(net_file, "settle", "--date", day)
    print(out)
    ok = rc == 0
    for bank in net.banks:
        if not bank.simulate:
            continue
        export = Path(net.switch.data_dir) / "settlement" / day / f"issuer_{bank.id}.csv"
        rc1, out1 = _operator(net_file, "issuer-sim", "export", "--issuer", bank.id, "--date", day,
                              "--out", str(export))
        rc2, out2 = _operator(net_file, "reconcile", "--date", day, "--issuer", bank.id, "--file", str(export))
        print(f"\n$ cardswitch reconcile --date {day} --issuer {bank.id} --file {export.name}")
        print(out2 if rc1 == 0 else out1)
        ok = ok and rc1 == 0 and rc2 == 0
    return ok


def run_demo(args) -> int:
    from cardswitch.netfile import dump_network, load_network, with_ports

    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path("var") / f"demo-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    net = with_ports(load_network(None), data_dir=str(work))
    netfile = work / "network.toml"
    netfile.write_text(dump_network(net))
    print(f"demo network: {len(net.banks)} banks, {len(net.merchants)} merchants, "
          f"{len(net.terminals())} terminals; switch on {net.switch.listen}; data in {work}", flush=True)
    log = open(work / "network.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cardswitch.cli", "up", "-c", str(netfile)],
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    code = 1
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            print(f"cardswitch: the demo network did not start; see {work / 'network.log'}", file=sys.stderr)
            return 1
        print("network ready; running the day ...", flush=True)
        code = asyncio.run(_day(net))
        if code == 0 and not end_of_day(net, netfile):
            code = 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    if code == 0:
        print(f"\nthe day's files (journal, bank ledgers, settlement, report) are in {work}")
    else:
        print(f"\nsomething differed from what was expected; logs in {work / 'network.log'}", file=sys.stderr)
    return code


async def _day(net: Network) -> int:
    day = Day(net)
    try:
        await day.run(script(net))
        pos = sorted(t for t in day.terms if t.startswith("POS"))
        batches = await day.close_batches(out_of_balance=pos[0] if pos else "")
    finally:
        day.close()
    text = summary(day.outcomes, batches)
    print(text)
    return 0 if text.endswith("every answer as expected") else 1
