"""End to end: a 0420 queued while its bank is down is delivered once the bank
is back, even with the switch restarted in between.

Three `cardswitch up --only` processes (HSM, banks, switch) on the default
network. A purchase is approved at Bank A (whose link carries MACs); the banks
are stopped; the terminal reverses the purchase (answered at once); the switch
is stopped and started again with the bank still down; the bank returns and
gets the 0420, once: its ledger is back where it started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "chaos"))

from chaos_support import Parts, wait_until  # noqa: E402
from e2e_support import PURCHASE, Driver, default_test_network, reversal  # noqa: E402

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"
TERMINAL = "POS00002"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    wd = tmp_path_factory.mktemp("saf_e2e")
    p = Parts(default_test_network(wd / "var"), wd)
    try:
        p.start_all()
        yield p
        p.stop_all()
    finally:
        p.kill_all()


def test_reversal_queued_while_the_bank_is_down_survives_a_switch_restart(parts):
    d = Driver(parts.runs["switch"])
    try:
        before = d.balance(A_DEBIT)
        sale = d.fin(TERMINAL, PURCHASE, A_DEBIT, 7_000)
        approved = d.ask(sale, "00")
        assert d.balance(A_DEBIT) == (before[0] - 7_000, before[1] - 7_000)

        parts.stop("banks")
        d.ask(reversal(d.T[TERMINAL], d.stan(), sale), "00")     # answered without the bank
        assert parts.saf_counts() == {"queued": 1}
        d.close()
        assert parts.stop("switch") == 0                          # the advice stays owed

        parts.start("switch")                                     # the bank is still down
        j = parts.journal()
        try:
            (owed,) = j.saf_queued()
            assert (owed.kind, owed.bank_id, owed.rrn, owed.amount) == ("reversal", "BANKA", approved["37"], 7_000)
            (row,) = [r for r in j.rows() if r.rrn == approved["37"] and r.kind == "purchase"]
            assert (row.status, row.cancelled) == ("approved", "reversed")
            assert (owed.orig_stan, owed.orig_transmitted) == (row.issuer_stan, row.issuer_transmitted)
        finally:
            j.close()

        parts.start("banks")
        wait_until(lambda: parts.saf_counts() == {"delivered": 1}, 30, "the 0420 delivered")
        d = Driver(parts.runs["switch"], d.stan)
        assert d.wait_balance(A_DEBIT, before) == before
        con = parts.bank_db("BANKA")
        try:
            rows = con.execute("SELECT mti, kind, reversed FROM txns WHERE rrn = ? ORDER BY id",
                               (approved["37"],)).fetchall()
        finally:
            con.close()
        assert [r[0][:3] for r in rows] == ["020", "042"]          # one reversal, however often sent
        assert rows[0][2] == 1
    finally:
        d.close()
