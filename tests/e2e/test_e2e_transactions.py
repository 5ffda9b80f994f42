"""End to end: every transaction of wire.md 3 on the default network, over TCP.

`cardswitch up` runs the default network (free ports, a fresh data_dir) once
for this module; requests are built and read with pyiso8583 itself. Cards
are shared between tests, so money checks are differences between balance
inquiries taken just before and after.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import pytest

from e2e_support import (
    BALANCE, BILL, DEPOSIT, PURCHASE, REFUND, TRANSFER, VOID, WITHDRAWAL,
    Driver, batch_close, balances, default_test_network, network_mgmt, parse54, reversal,
)

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"    # BANKA, rich, PIN 1234
A_CREDIT = "6221280000000016"   # BANKA, PIN 123456
A_LOST = "6221260000000042"
B_DEBIT = "6228480000000015"    # BANKB, rich
C_DEBIT = "6217000000000014"    # BANKC, rich


@pytest.fixture(scope="module")
def run(launch, workdir):
    r = launch(default_test_network(workdir / "var"), workdir)
    yield r
    assert r.stop() == 0, "`cardswitch up` did not exit 0 on SIGTERM"


@pytest.fixture(scope="module")
def d(run):
    drv = Driver(run)
    yield drv
    drv.close()


# -- wire.md 3, row by row ------------------------------------------------------


def test_preauthorization_holds_then_completion_debits(d):
    ledger0, avail0 = d.balance(B_DEBIT)
    pre = d.fin("POS00012", PURCHASE, B_DEBIT, 50_000, mti="0100")
    resp = d.ask(pre, "00")
    assert resp["t"] == "0110"
    assert d.balance(B_DEBIT) == (ledger0, avail0 - 50_000)      # a hold: available only

    comp = d.fin("POS00012", PURCHASE, B_DEBIT, 32_070, condition="06", original=pre)
    d.ask(comp, "00")
    assert d.balance(B_DEBIT) == (ledger0 - 32_070, avail0 - 32_070)   # hold released, amount debited


def test_purchase_debits(d):
    before = d.balance(A_DEBIT)
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 12_800), "00")
    assert d.balance(A_DEBIT) == (before[0] - 12_800, before[1] - 12_800)


def test_purchase_with_pin_from_a_mac_terminal(d):
    before = d.balance(C_DEBIT)
    d.ask(d.fin("POS00001", PURCHASE, C_DEBIT, 4_321, pin="1234"), "00")
    assert d.balance(C_DEBIT) == (before[0] - 4_321, before[1] - 4_321)


def test_withdrawal_at_an_atm_debits_and_reports_balances(d):
    before = d.balance(A_DEBIT)
    resp = d.ask(d.fin("ATM00002", WITHDRAWAL, A_DEBIT, 20_000, pin="1234"), "00")
    after = d.balance(A_DEBIT)
    assert after == (before[0] - 20_000, before[1] - 20_000)
    assert balances(resp) == after                  # field 54 of the withdrawal: after it


def test_void_in_the_same_open_batch_gives_the_money_back(d):
    before = d.balance(C_DEBIT)
    sale = d.fin("POS00013", PURCHASE, C_DEBIT, 23_850, pin="1234", batch=4)
    d.ask(sale, "00")
    assert d.balance(C_DEBIT) == (before[0] - 23_850, before[1] - 23_850)
    void = d.fin("POS00013", VOID, C_DEBIT, 23_850, original=sale, batch=4)
    d.ask(void, "00")
    assert d.balance(C_DEBIT) == before


def test_refund_credits(d):
    before = d.balance(B_DEBIT)
    d.ask(d.fin("POS00012", REFUND, B_DEBIT, 4_500), "00")
    assert d.balance(B_DEBIT) == (before[0] + 4_500, before[1] + 4_500)


def test_deposit_at_an_atm_credits(d):
    before = d.balance(B_DEBIT)
    d.ask(d.fin("ATM00011", DEPOSIT, B_DEBIT, 30_000, pin="1234"), "00")
    assert d.balance(B_DEBIT) == (before[0] + 30_000, before[1] + 30_000)


def test_balance_inquiry_field54(d):
    for tt in (BALANCE, "31"):
        req = d.fin("ATM00002", tt, A_DEBIT, None, pin="1234")
        resp = d.ask(req, "00")
        assert "4" not in resp
        raw = resp["54"]
        assert len(raw) % 20 == 0 and len(raw) >= 40, raw
        entries = parse54(raw)
        assert {e.amount_type for e in entries} >= {"01", "02"}
        assert all(e.currency == "156" and e.account_type == "00" for e in entries)
    # Ledger 01 and available 02 differ by a hold, and move with it.
    ledger, avail = d.balance(A_CREDIT)
    pre = d.fin("POS00002", PURCHASE, A_CREDIT, 7_000, mti="0100")
    d.ask(pre, "00")
    assert d.balance(A_CREDIT) == (ledger, avail - 7_000)
    d.ask(reversal(d.T["POS00002"], d.stan(), pre), "00")
    assert d.wait_balance(A_CREDIT, (ledger, avail)) == (ledger, avail)


def test_transfer_across_banks_moves_money_between_both_cards(d):
    a0, c0 = d.balance(A_DEBIT), d.balance(C_DEBIT)
    d.ask(d.fin("POS00002", TRANSFER, A_DEBIT, 100_000, to_pan=C_DEBIT), "00")
    assert d.balance(A_DEBIT) == (a0[0] - 100_000, a0[1] - 100_000)
    assert d.balance(C_DEBIT) == (c0[0] + 100_000, c0[1] + 100_000)


def test_transfer_within_one_bank_moves_money_between_both_cards(d):
    a0, k0 = d.balance(A_DEBIT), d.balance(A_CREDIT)
    d.ask(d.fin("ATM00002", TRANSFER, A_DEBIT, 5_000, pin="1234", to_pan=A_CREDIT), "00")
    assert d.balance(A_DEBIT) == (a0[0] - 5_000, a0[1] - 5_000)
    assert d.balance(A_CREDIT) == (k0[0] + 5_000, k0[1] + 5_000)


def test_bill_payment_debits(d):
    before = d.balance(A_DEBIT)
    d.ask(d.fin("POS00031", BILL, A_DEBIT, 19_900, bill="CITYPOWER-2026-000123"), "00")
    assert d.balance(A_DEBIT) == (before[0] - 19_900, before[1] - 19_900)


def test_network_management_sign_on_sign_off_echo(d):
    for code in ("001", "301", "002"):
        req = network_mgmt(d.T["POS00012"], d.stan(), code)
        resp = d.conn.request(req)
        assert resp["t"] == "0810"
        assert resp["39"] == "00"
        assert resp["11"] == req["11"] and resp["70"] == code and resp["41"] == "POS00012"


def _track2(pan: str, **kw) -> str:
    """A track 2 as the card would carry it (its CVV made under the bank's CVK)."""
    from cardswitch.issuer_sim.cards import track2_for
    from cardswitch.netfile import load_network

    net = load_network(None)
    for bank in net.banks:
        for card in bank.cards:
            if card.pan == pan:
                return track2_for(card, bank, **kw)
    raise KeyError(pan)


def test_track2_instead_of_field_2(d):
    before = d.balance(A_DEBIT)
    req = d.fin("POS00002", PURCHASE, None, 1_300, extra={"35": _track2(A_DEBIT)})
    d.ask(req, "00")
    assert d.balance(A_DEBIT) == (before[0] - 1_300, before[1] - 1_300)
    wrong_expiry = d.fin("POS00002", PURCHASE, None, 1_300, extra={"35": _track2(A_DEBIT, expiry="2901")})
    d.ask(wrong_expiry, "54")
    bad_cvv = d.fin("POS00002", PURCHASE, None, 1_300, extra={"35": _track2(A_DEBIT, cvv="000")})
    d.ask(bad_cvv, "05")


def test_pin_block_hex_in_either_case(d):
    """wire.md 1: hex is accepted in either case on input."""
    req = d.fin("ATM00002", WITHDRAWAL, A_DEBIT, 1_000, pin="1234")
    req["52"] = req["52"].lower()
    assert req["52"] != req["52"].upper()
    d.ask(req, "00")


def test_rrn_of_the_request_is_kept(d):
    req = d.fin("POS00002", PURCHASE, A_DEBIT, 1_000, extra={"37": "ACQ123456789"})
    resp = d.ask(req, "00")
    assert resp["37"] == "ACQ123456789"


# -- reversals (wire.md 6a) -------------------------------------------------------


def test_reversal_undoes_once_and_a_second_one_changes_nothing(d):
    before = d.balance(A_DEBIT)
    sale = d.fin("POS00002", PURCHASE, A_DEBIT, 7_700)
    d.ask(sale, "00")
    assert d.balance(A_DEBIT) == (before[0] - 7_700, before[1] - 7_700)
    rev = reversal(d.T["POS00002"], d.stan(), sale)
    resp = d.ask(rev, "00")
    assert resp["t"] == "0410"
    assert d.wait_balance(A_DEBIT, before) == before
    again = reversal(d.T["POS00002"], d.stan(), sale)
    d.ask(again, "00")
    assert d.balance(A_DEBIT) == before


def test_reversal_of_an_unknown_original_is_25(d):
    ghost = d.fin("POS00002", PURCHASE, A_DEBIT, 1_000)      # never sent
    resp = d.ask(reversal(d.T["POS00002"], d.stan(), ghost), "25")
    assert resp["t"] == "0410"


def test_reversal_is_found_by_field_90_and_41_not_by_another_terminal(d):
    sale = d.fin("POS00012", PURCHASE, B_DEBIT, 1_100)
    d.ask(sale, "00")
    # The same field 90 from another terminal names nothing of that terminal's.
    d.ask(reversal(d.T["POS00013"], d.stan(), sale), "25")


def test_reversal_of_an_interbank_transfer_undoes_both_legs(d):
    a0, c0 = d.balance(A_DEBIT), d.balance(C_DEBIT)
    xfer = d.fin("POS00002", TRANSFER, A_DEBIT, 50_000, to_pan=C_DEBIT)
    d.ask(xfer, "00")
    assert d.balance(C_DEBIT) == (c0[0] + 50_000, c0[1] + 50_000)
    d.ask(reversal(d.T["POS00002"], d.stan(), xfer), "00")
    assert d.wait_balance(A_DEBIT, a0) == a0
    assert d.wait_balance(C_DEBIT, c0) == c0


def test_reversal_of_a_void_takes_the_money_again(d):
    before = d.balance(A_DEBIT)
    sale = d.fin("POS00002", PURCHASE, A_DEBIT, 1_400, batch=4)
    d.ask(sale, "00")
    void = d.fin("POS00002", VOID, A_DEBIT, 1_400, original=sale, batch=4)
    d.ask(void, "00")
    assert d.balance(A_DEBIT) == before
    d.ask(reversal(d.T["POS00002"], d.stan(), void), "00")
    charged = (before[0] - 1_400, before[1] - 1_400)
    assert d.wait_balance(A_DEBIT, charged) == charged


def test_reversal_of_a_void_puts_the_purchase_back_in_the_batch_totals(d):
    tid, batch = "POS00002", 12
    sale = d.fin(tid, PURCHASE, A_DEBIT, 1_600, batch=batch)
    d.ask(sale, "00")
    void = d.fin(tid, VOID, A_DEBIT, 1_600, original=sale, batch=batch)
    d.ask(void, "00")
    d.ask(reversal(d.T[tid], d.stan(), void), "00")
    resp = d.conn.request(batch_close(d.T[tid], d.stan(), batch, credits=(0, 0), debits=(1, 1_600)))
    assert resp["39"] == "00", resp


# -- repeats (wire.md 6a) ------------------------------------------------------------


def test_repeat_0201_of_an_answered_request_gets_the_same_answer(d):
    before = d.balance(A_DEBIT)
    req = d.fin("POS00002", PURCHASE, A_DEBIT, 3_300)
    first = d.ask(req, "00")
    rep = dict(req, t="0201")
    second = d.ask(rep, "00")
    assert second == first                       # the very same response, 37/38/39 and all
    assert d.balance(A_DEBIT) == (before[0] - 3_300, before[1] - 3_300)


def test_repeat_0201_whose_original_never_came_is_processed_once(d):
    before = d.balance(A_DEBIT)
    rep = d.fin("POS00002", PURCHASE, A_DEBIT, 2_200, mti="0201")
    first = d.ask(rep, "00")
    assert first["t"] == "0210"
    assert d.balance(A_DEBIT) == (before[0] - 2_200, before[1] - 2_200)
    second = d.ask(dict(rep), "00")
    assert second == first
    assert d.balance(A_DEBIT) == (before[0] - 2_200, before[1] - 2_200)


def test_repeat_0401_of_a_reversal_gets_the_same_answer_and_changes_nothing(d):
    before = d.balance(B_DEBIT)
    sale = d.fin("POS00012", PURCHASE, B_DEBIT, 6_600)
    d.ask(sale, "00")
    rev = reversal(d.T["POS00012"], d.stan(), sale)
    first = d.ask(rev, "00")
    assert d.wait_balance(B_DEBIT, before) == before
    second = d.ask(dict(rev, t="0401"), "00")
    assert second == first                       # 0410, same 37 and 39
    assert d.balance(B_DEBIT) == before


# -- batch close (wire.md 6) -----------------------------------------------------------


def test_batch_close_with_equal_totals_then_the_batch_is_closed(d):
    tid, batch = "POS00022", 7
    d.ask(d.fin(tid, PURCHASE, C_DEBIT, 1_000, batch=batch), "00")
    d.ask(d.fin(tid, PURCHASE, B_DEBIT, 2_000, batch=batch), "00")
    d.ask(d.fin(tid, REFUND, C_DEBIT, 500, batch=batch), "00")
    voided = d.fin(tid, PURCHASE, C_DEBIT, 3_000, batch=batch)
    d.ask(voided, "00")
    d.ask(d.fin(tid, VOID, C_DEBIT, 3_000, original=voided, batch=batch), "00")
    reversed_ = d.fin(tid, PURCHASE, A_DEBIT, 4_000, batch=batch)
    d.ask(reversed_, "00")
    d.ask(reversal(d.T[tid], d.stan(), reversed_), "00")
    d.ask(d.fin(tid, PURCHASE, A_LOST, 9_000, batch=batch), "41")       # declined: not counted
    d.ask(d.fin(tid, BALANCE, C_DEBIT, None, batch=batch), "00")         # moves nothing

    close = batch_close(d.T[tid], d.stan(), batch, credits=(1, 500), debits=(2, 3_000))
    resp = d.conn.request(close)
    assert resp["t"] == "0510" and resp["39"] == "00", resp
    assert resp["11"] == close["11"] and resp["41"] == tid and resp["60"] == close["60"]

    late = d.fin(tid, PURCHASE, C_DEBIT, 1_000, batch=batch)
    d.ask(late, "12")
    # The next batch is open.
    d.ask(d.fin(tid, PURCHASE, C_DEBIT, 1_000, batch=batch + 1), "00")


def test_batch_totals_count_each_kind_as_wire_md_6_says(d):
    pos, pb = "POS00013", 8
    pre = d.fin(pos, PURCHASE, C_DEBIT, 5_000, mti="0100", batch=pb)
    d.ask(pre, "00")                                                             # not counted
    d.ask(d.fin(pos, PURCHASE, C_DEBIT, 4_000, condition="06", original=pre, batch=pb), "00")   # debit
    d.ask(d.fin(pos, BILL, C_DEBIT, 1_000, bill="WATER-77", batch=pb), "00")           # debit
    d.ask(d.fin(pos, TRANSFER, C_DEBIT, 2_000, to_pan=B_DEBIT, batch=pb), "00")        # debit
    d.ask(d.fin(pos, REFUND, C_DEBIT, 300, batch=pb), "00")                            # credit
    resp = d.conn.request(batch_close(d.T[pos], d.stan(), pb, credits=(1, 300), debits=(3, 7_000)))
    assert resp["39"] == "00", resp

    atm, ab = "ATM00011", 9
    d.ask(d.fin(atm, WITHDRAWAL, B_DEBIT, 10_000, pin="1234", batch=ab), "00")       # debit
    d.ask(d.fin(atm, DEPOSIT, B_DEBIT, 5_000, pin="1234", batch=ab), "00")            # credit
    d.ask(d.fin(atm, BALANCE, B_DEBIT, None, pin="1234", batch=ab), "00")             # nothing
    resp = d.conn.request(batch_close(d.T[atm], d.stan(), ab, credits=(1, 5_000), debits=(1, 10_000)))
    assert resp["39"] == "00", resp


def test_batch_close_with_different_totals_95_then_upload_and_trailer(d):
    tid, batch = "POS00021", 3
    sale = d.fin(tid, PURCHASE, C_DEBIT, 1_500, batch=batch)
    sold = d.ask(sale, "00")
    refund = d.fin(tid, REFUND, B_DEBIT, 250, batch=batch)
    refunded = d.ask(refund, "00")

    close = batch_close(d.T[tid], d.stan(), batch, credits=(1, 250), debits=(2, 2_500))
    resp = d.conn.request(close)
    assert resp["t"] == "0510" and resp["39"] == "95", resp
    assert (resp["74"], resp["86"], resp["76"], resp["88"]) == \
        ("0000000001", "0000000000000250", "0000000001", "0000000000001500")

    # Still open: upload each transaction the terminal holds, then the trailer.
    for orig, answer in ((sale, sold), (refund, refunded)):
        up = dict(orig, t="0320", **{"11": d.stan(), "37": answer["37"], "38": answer["38"]})
        got = d.conn.request(up)
        assert got["t"] == "0330" and got["39"] == "00", got
        assert got["11"] == up["11"] and got["41"] == tid
    trailer = batch_close(d.T[tid], d.stan(), batch, credits=(1, 250), debits=(2, 2_500), proc="960000")
    resp = d.conn.request(trailer)
    assert resp["t"] == "0510" and resp["39"] == "00", resp

    d.ask(d.fin(tid, PURCHASE, C_DEBIT, 1_000, batch=batch), "12")


# -- the `cardswitch txn` command against the running network ---------------------------


def _txn(run, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cardswitch.cli", "txn", *args, "-c", str(run.netfile)],
                          capture_output=True, text=True, timeout=60, cwd=run.workdir)


def test_txn_command_approved_and_declined(run, d):
    before = d.balance(B_DEBIT)
    ok = _txn(run, "purchase", "--pan", B_DEBIT, "--amount", "1250", "--terminal", "POS00012",
              "--stan", "900001")
    assert ok.returncode == 0, ok.stderr
    assert "00" in ok.stdout and "approved" in ok.stdout
    assert B_DEBIT not in ok.stdout + ok.stderr
    assert "622848******0015" in ok.stdout
    assert d.balance(B_DEBIT) == (before[0] - 1_250, before[1] - 1_250)

    bad = _txn(run, "purchase", "--pan", A_LOST, "--amount", "1250", "--terminal", "POS00012",
               "--stan", "900002")
    assert bad.returncode != 0
    assert "41" in bad.stdout
    assert A_LOST not in bad.stdout + bad.stderr


# -- over the whole module ------------------------------------------------------------------


def test_rrns_are_unique_across_responses(d):
    """Every answer of this module so far: one RRN per request (a repeat shares its original's)."""
    by_rrn: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for req, resp in d.log:
        if resp.get("39") != "30":
            by_rrn[resp["37"]].add((req["41"], req["11"], req["7"]))
    assert len(d.log) > 50
    shared = {rrn: reqs for rrn, reqs in by_rrn.items() if len(reqs) > 1}
    assert not shared, f"RRNs given to different requests: {shared}"
