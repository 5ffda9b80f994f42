"""End to end: stand-in while a bank is stopped, and its 0220 after it returns.

The HSM, the simulated banks and the switch run as three `cardswitch up
--only` processes on the default network (Bank B stands in up to 500.00 for
purchases without PIN). Bank B's process is stopped: the switch approves on
its behalf, declines what stand-in may not approve, and once the bank is
back delivers the 0220, so the bank's ledger moves once, by the amount the
terminal saw approved.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "chaos"))

from chaos_support import Parts, wait_until  # noqa: E402
from e2e_support import BALANCE, PURCHASE, Driver, default_test_network, reversal  # noqa: E402

pytestmark = pytest.mark.e2e

B_DEBIT = "6228480000000015"
B_STOLEN = "6228480000000023"
A_DEBIT = "6221260000000018"
B_TERMINAL = "POS00012"           # acquired by Bank B, no MAC key


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    wd = tmp_path_factory.mktemp("standin_e2e")
    p = Parts(default_test_network(wd / "var"), wd)
    try:
        p.start_all()
        yield p
        p.stop_all()
    finally:
        p.kill_all()


def test_stand_in_while_the_bank_is_stopped_then_its_advice(parts):
    d = Driver(parts.runs["switch"])
    try:
        ledger0, available0 = d.balance(B_DEBIT)
        parts.stop("banks")
        # The switch sees the bank go: a balance inquiry (never stood in) gets 91.
        wait_until(lambda: d.ask(d.fin("POS00002", BALANCE, B_DEBIT, None, batch=99))["39"] == "91",
                   15, "Bank B's link down")

        sale = d.fin(B_TERMINAL, PURCHASE, B_DEBIT, 12_345)
        approved = d.ask(sale, "00")
        assert approved["38"].startswith("S") and len(approved["38"]) == 6
        d.ask(d.fin(B_TERMINAL, PURCHASE, B_DEBIT, 1_000, pin="1234"), "91")    # a PIN: no stand-in
        d.ask(d.fin(B_TERMINAL, PURCHASE, B_STOLEN, 1_000), "43")               # as the bank would
        d.ask(d.fin(B_TERMINAL, PURCHASE, B_DEBIT, 50_001), "91")               # above max_amount
        d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 1_000), "91")                # Bank A: no profile

        j = parts.journal()
        try:
            rows = [r for r in j.rows() if r.stand_in]
            assert [(r.rrn, r.auth_code, r.status, r.amount) for r in rows] == \
                [(approved["37"], approved["38"], "approved", 12_345)]
            (advice,) = j.saf_queued()
            assert advice.kind == "stand_in" and advice.bank_id == "BANKB" and B_DEBIT not in advice.pan_sealed
        finally:
            j.close()

        parts.start("banks")
        wait_until(lambda: parts.saf_counts() == {"delivered": 1}, 30, "the 0220 delivered")
        assert d.wait_balance(B_DEBIT, (ledger0 - 12_345, available0 - 12_345)) == \
            (ledger0 - 12_345, available0 - 12_345)
        con = parts.bank_db("BANKB")
        try:
            posted = con.execute("SELECT mti, amount, auth_code FROM txns WHERE rrn = ?",
                                 (approved["37"],)).fetchall()
        finally:
            con.close()
        assert posted == [("0220", 12_345, approved["38"])]                     # once

        # The terminal cancels the stand-in sale: the 0420 names the 0220 and undoes it.
        d.ask(reversal(d.T[B_TERMINAL], d.stan(), sale), "00")
        wait_until(lambda: parts.saf_counts() == {"delivered": 2}, 30, "the 0420 delivered")
        assert d.wait_balance(B_DEBIT, (ledger0, available0)) == (ledger0, available0)
    finally:
        d.close()
