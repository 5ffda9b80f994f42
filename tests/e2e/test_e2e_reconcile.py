"""End to end: two business days, settled and reconciled with every simulated bank.

`cardswitch up` runs the default network (free ports, a fresh data_dir, a
BANKB card whose answers come after the switch's timeout, for stand-in).
Day 1 has transactions of every kind, some undone the same day (reversal,
void, a void reversed); `cardswitch cutover`; day 2 reverses and voids day-1
transactions (a later-date undo, settlement.md 2) and has its own; another
cutover. Then, for each date, `cardswitch settle`, and for each bank
`cardswitch issuer-sim export` and `cardswitch reconcile`: each must exit 0
(everything matched), which needs the bank's record to list a later-date
reversal on its own date as the switch's clearing does.
"""

from __future__ import annotations

import csv
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from cardswitch.config import Card
from e2e_support import (
    BILL, DEPOSIT, PURCHASE, REFUND, TRANSFER, VOID, WITHDRAWAL,
    Driver, default_test_network, make_pan, reversal, with_cards,
)

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"    # BANKA, PIN 1234
A_CREDIT = "6221280000000016"   # BANKA, PIN 123456
B_DEBIT = "6228480000000015"    # BANKB
C_DEBIT = "6217000000000014"    # BANKC
B_SLOW = make_pan("622848", 77)  # BANKB, answered after the switch's timeout: stand-in
BANKS = ("BANKA", "BANKB", "BANKC")
CLI_TIMEOUT = 120.0
SAF_TIMEOUT = 60.0


def network(data_dir: Path):
    net = with_cards(default_test_network(data_dir), "BANKB",
                     Card(B_SLOW, "3012", "1234", 1_000_000, delay_ms=3_000))
    # No automatic cutover while the test runs: the business days are the test's own.
    now = datetime.now(ZoneInfo(net.switch.timezone))
    return replace(net, switch=replace(net.switch, cutover=(now + timedelta(hours=12)).strftime("%H:%M")))


@pytest.fixture(scope="module")
def run(launch, workdir):
    r = launch(network(workdir / "var"), workdir)
    yield r
    assert r.stop() == 0, "`cardswitch up` did not exit 0 on SIGTERM"


def cli(run, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cardswitch.cli", *args, "-c", str(run.netfile)],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=run.workdir)


def cutover(run) -> tuple[str, str]:
    """`cardswitch cutover` against the running switch: (old, new) business dates."""
    p = cli(run, "cutover")
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]           # "business date OLD -> NEW"
    old, new = line.removeprefix("business date ").split(" -> ")
    run.started_dates.add(mmdd(new))        # field 15 of the answers from now on
    return old, new


def wait_advices_delivered(run) -> None:
    """Every reversal and stand-in advice the switch queued has reached its bank."""
    path = run.data_dir / "journal.db"
    deadline = time.monotonic() + SAF_TIMEOUT
    while True:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            states = dict(con.execute("SELECT state, COUNT(*) FROM saf GROUP BY state").fetchall())
        finally:
            con.close()
        assert not states.get("parked"), f"advices refused by a bank: {states}"
        if not states.get("queued"):
            return
        assert time.monotonic() < deadline, f"advices still queued after {SAF_TIMEOUT:.0f}s: {states}"
        time.sleep(0.1)


def mmdd(day: str) -> str:
    return day[5:7] + day[8:10]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_business_days_reconcile_for_every_bank_and_date(run):
    d = Driver(run)
    T = d.T
    try:
        def ok(req: dict) -> dict:
            return d.ask(req, "00")

        def rev(tid: str, orig: dict) -> dict:
            return ok(reversal(T[tid], d.stan(), orig))

        # -- day 1 -------------------------------------------------------------------------
        kept = ok(d.fin("POS00002", PURCHASE, A_DEBIT, 10_000))
        day1 = {kept["15"]}
        # undone the same day: neither side counts them
        p = d.fin("POS00002", PURCHASE, B_DEBIT, 20_000)
        ok(p)
        rev("POS00002", p)
        p = d.fin("POS00022", PURCHASE, C_DEBIT, 30_000, batch=2)
        ok(p)
        ok(d.fin("POS00022", VOID, C_DEBIT, 30_000, original=p, batch=2))
        # undone on day 2
        to_reverse = d.fin("POS00012", PURCHASE, A_DEBIT, 11_000)
        to_reverse_r = ok(to_reverse)
        to_void = d.fin("POS00002", PURCHASE, C_DEBIT, 12_000, batch=3)
        ok(to_void)
        # voided on day 1, the void reversed on day 2: the purchase stands again on day 2
        reinstated = d.fin("POS00022", PURCHASE, B_DEBIT, 13_000, batch=4)
        ok(reinstated)
        void_1 = d.fin("POS00022", VOID, B_DEBIT, 13_000, original=reinstated, batch=4)
        void_1_r = ok(void_1)
        # voided on day 2 and the void reversed on day 2: day 2 changes nothing
        back_and_forth = d.fin("POS00002", PURCHASE, A_DEBIT, 14_000, batch=5)
        ok(back_and_forth)
        # every other kind, each reversed on day 2 (a completion, a refund, a withdrawal,
        # transfers on us and between banks) or left standing (deposit, bill payment)
        pre = d.fin("POS00012", PURCHASE, B_DEBIT, 50_000, mti="0100")
        ok(pre)
        completion = d.fin("POS00012", PURCHASE, B_DEBIT, 40_000, condition="06", original=pre)
        ok(completion)
        refund = d.fin("POS00022", REFUND, C_DEBIT, 5_000)
        ok(refund)
        ok(d.fin("ATM00002", DEPOSIT, A_DEBIT, 6_000, pin="1234"))
        withdrawal = d.fin("ATM00002", WITHDRAWAL, B_DEBIT, 7_000, pin="1234")
        ok(withdrawal)
        ok(d.fin("POS00031", BILL, C_DEBIT, 8_000, bill="CITYPOWER-2026-000777"))
        on_us = d.fin("ATM00002", TRANSFER, A_DEBIT, 9_000, pin="1234", to_pan=A_CREDIT)
        ok(on_us)
        ok(d.fin("POS00002", TRANSFER, A_DEBIT, 9_500, to_pan=B_DEBIT))
        between = d.fin("POS00002", TRANSFER, C_DEBIT, 9_900, to_pan=A_DEBIT)
        ok(between)
        d.ask(d.fin("POS00002", PURCHASE, "6221260000000042", 1_000), "41")     # declined: lost card
        # stand-in: BANKB answers this card too late; the switch approves and tells it by 0220
        stand_in = d.fin("POS00002", PURCHASE, B_SLOW, 20_000)
        ok(stand_in)
        stand_in_reversed = d.fin("POS00002", PURCHASE, B_SLOW, 15_000)
        stand_in_reversed_r = ok(stand_in_reversed)

        old, new = cutover(run)
        assert mmdd(old) in day1, (old, day1)
        day_1, day_2 = old, new

        # -- day 2 -------------------------------------------------------------------------
        r = rev("POS00012", to_reverse)
        assert r["15"] == mmdd(day_2)
        void_2 = d.fin("POS00002", VOID, C_DEBIT, 12_000, original=to_void, batch=3)
        void_2_r = ok(void_2)
        rev("POS00022", void_1)
        void_3 = d.fin("POS00002", VOID, A_DEBIT, 14_000, original=back_and_forth, batch=5)
        ok(void_3)
        rev("POS00002", void_3)
        for tid, orig in (("POS00012", completion), ("POS00022", refund), ("ATM00002", withdrawal),
                          ("ATM00002", on_us), ("POS00002", between), ("POS00002", stand_in_reversed)):
            rev(tid, orig)
        ok(d.fin("POS00011", PURCHASE, C_DEBIT, 15_000))
        p = d.fin("POS00011", PURCHASE, A_DEBIT, 16_000)
        ok(p)
        rev("POS00011", p)

        old, new = cutover(run)
        assert old == day_2
        wait_advices_delivered(run)
    finally:
        d.close()

    # -- settle, export, reconcile ---------------------------------------------------------------
    out = run.workdir / "exports"
    for day in (day_1, day_2):
        p = cli(run, "settle", "--date", day)
        assert p.returncode == 0, p.stderr
        for bank in BANKS:
            f = out / f"{bank}-{day}.csv"
            p = cli(run, "issuer-sim", "export", "--issuer", bank, "--date", day, "--out", str(f))
            assert p.returncode == 0, p.stderr
            p = cli(run, "reconcile", "--date", day, "--issuer", bank, "--file", str(f))
            recon = run.data_dir / "settlement" / day / f"recon_{bank}.csv"
            exceptions = [r for r in read_csv(recon) if r["status"] != "matched"]
            assert p.returncode == 0, (bank, day, p.stdout, p.stderr, exceptions)
            assert not exceptions

    # The day-2 records hold the later-date undos, named as the switch names them.
    def rows(bank: str, day: str) -> list[dict[str, str]]:
        return read_csv(out / f"{bank}-{day}.csv")

    a2 = rows("BANKA", day_2)
    assert {"rrn": to_reverse_r["37"], "amount": "-11000", "kind": "reversal"}.items() \
        <= next(r for r in a2 if r["rrn"] == to_reverse_r["37"]).items()
    c2 = {r["rrn"]: r for r in rows("BANKC", day_2)}
    assert c2[void_2_r["37"]]["amount"] == "-12000" and c2[void_2_r["37"]]["kind"] == "reversal"
    b1 = {r["rrn"] for r in rows("BANKB", day_1)}
    b2 = {r["rrn"]: r for r in rows("BANKB", day_2)}
    assert void_1_r["37"] not in b1
    assert b2[void_1_r["37"]]["amount"] == "13000"                 # the purchase stands again
    assert stand_in_reversed_r["37"] in b1
    assert b2[stand_in_reversed_r["37"]]["amount"] == "-15000"
    assert all(r["business_date"] == day_2 for r in a2)
    # the switch's clearing agrees row for row on what moved
    clearing = read_csv(run.data_dir / "settlement" / day_2 / "clearing_BANKA.csv")
    assert any(r["rrn"] == to_reverse_r["37"] and r["amount"] == "-11000" and r["kind"] == "reversal"
               for r in clearing)
