"""End to end: each response code of wire.md 5 this issue owns, provoked over TCP.

The network is the default one plus what the codes need: a short issuer
timeout (500 ms) and a card whose issuer answers after 1.5 s (91), a card to
lock with wrong PINs (75), a member bank whose host is a closed port (91,
bank down), and a terminal without a PIN key (96).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cardswitch.config import BinRange, Card, Endpoint, Terminal
from cardswitch.netfile import free_ports

from e2e_support import (
    DEPOSIT, PURCHASE, REFUND, TRANSFER, VOID, WITHDRAWAL, Driver, break_luhn, default_test_network,
    financial, make_pan, reversal, with_cards, with_terminal,
)

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"
A_LOW = "6221260000000026"       # balance 50.00
A_EXPIRED = "6221260000000034"
A_LOST = "6221260000000042"
A_SMALL_LIMIT = "6221260000000059"   # 500.00 a day in cash
B_DEBIT = "6228480000000015"
B_STOLEN = "6228480000000023"
B_BLOCKED = "6228480000000031"
C_DEBIT = "6217000000000014"

A_PINLOCK = make_pan("622126", 9001)
A_UNKNOWN = make_pan("622126", 9002)      # inside BANKA's BIN, not one of its cards
C_UNKNOWN = make_pan("621700", 9004)      # inside BANKC's BIN, not one of its cards
C_SLOW = make_pan("621700", 9003)          # the issuer answers after 1.5 s; the switch waits 0.5 s
D_DOWN = make_pan("625999", 1)             # BANKD: its host is a port nobody listens on
NO_ROUTE = make_pan("999999", 1)
NO_TPK_TERMINAL = "POS00099"


def codes_network(data_dir):
    net = default_test_network(data_dir)
    net = replace(net, switch=replace(net.switch, issuer_timeout_ms=500))
    net = with_cards(net, "BANKA", Card(pan=A_PINLOCK, expiry="3012", pin="1234", balance=1_000_000))
    net = with_cards(net, "BANKC", Card(pan=C_SLOW, expiry="3012", pin="1234", balance=1_000_000,
                                        delay_ms=1_500))
    # BANKD's host is a loopback port that was free a moment ago and that nothing
    # of the network listens on: connections to it are refused.
    closed = free_ports(1)[0]
    down = replace(net.banks[0], id="BANKD", institution_id="10000009", name="Bank D (down)",
                   simulate=False, zak=None, bins=(BinRange("625999", "625999"),), cards=(),
                   hosts=(Endpoint("127.0.0.1", closed),))
    net = replace(net, banks=net.banks + (down,))
    return with_terminal(net, "898440158120001", Terminal(id=NO_TPK_TERMINAL, kind="pos",
                                                          merchant_id="898440158120001"))


@pytest.fixture(scope="module")
def run(launch, workdir):
    r = launch(codes_network(workdir / "var"), workdir)
    yield r
    assert r.stop() == 0, "`cardswitch up` did not exit 0 on SIGTERM"


@pytest.fixture(scope="module")
def d(run):
    drv = Driver(run)
    yield drv
    drv.close()


def test_00_approved(d):
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 1_000), "00")


def test_03_unknown_merchant(d):
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 1_000, extra={"42": "999999999999999"}), "03")


def test_03_unknown_terminal(d):
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 1_000, extra={"41": "POS09999"}), "03")


def test_03_terminal_of_another_merchant(d):
    # POS00012 belongs to 898110054110001; sent with POS00002's merchant.
    d.ask(d.fin("POS00012", PURCHASE, A_DEBIT, 1_000, extra={"42": d.T["POS00002"].mid}), "03")


def test_05_blocked_card(d):
    d.ask(d.fin("POS00002", PURCHASE, B_BLOCKED, 1_000), "05")


def test_12_unknown_processing_code(d):
    d.ask(d.fin("POS00002", "99", A_DEBIT, 1_000), "12")


def test_12_preauthorization_of_a_refund(d):
    d.ask(d.fin("POS00002", REFUND, A_DEBIT, 1_000, mti="0100"), "12")


def test_13_zero_amount(d):
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 0), "13")


def test_14_luhn_failure(d):
    d.ask(d.fin("POS00002", PURCHASE, break_luhn(A_DEBIT), 1_000), "14")


def test_14_card_unknown_at_its_issuer(d):
    d.ask(d.fin("POS00002", PURCHASE, A_UNKNOWN, 1_000), "14")


def test_15_no_route_for_the_bin(d):
    d.ask(d.fin("POS00002", PURCHASE, NO_ROUTE, 1_000), "15")


def test_25_original_not_found(d):
    ghost = d.fin("POS00002", PURCHASE, A_DEBIT, 1_000)          # never sent
    d.ask(d.fin("POS00002", VOID, A_DEBIT, 1_000, original=ghost), "25")
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 1_000, condition="06", original=dict(ghost, t="0100")), "25")
    d.ask(reversal(d.T["POS00002"], d.stan(), ghost), "25")


def test_25_void_of_a_purchase_in_another_batch(d):
    sale = d.fin("POS00002", PURCHASE, A_DEBIT, 1_000, batch=5)
    d.ask(sale, "00")
    d.ask(d.fin("POS00002", VOID, A_DEBIT, 1_000, original=sale, batch=6), "25")


def test_41_lost_card(d):
    d.ask(d.fin("POS00002", PURCHASE, A_LOST, 1_000), "41")


def test_43_stolen_card(d):
    d.ask(d.fin("POS00002", PURCHASE, B_STOLEN, 1_000), "43")


def test_51_insufficient_funds(d):
    d.ask(d.fin("POS00002", PURCHASE, A_LOW, 6_000), "51")
    d.ask(d.fin("POS00002", PURCHASE, A_LOW, 5_000), "00")     # exactly the balance is fine


def test_52_transfer_target_without_a_route(d):
    d.ask(d.fin("POS00002", TRANSFER, A_DEBIT, 1_000, to_pan=NO_ROUTE), "52")


def test_52_transfer_target_unknown_at_its_bank(d):
    before = d.balance(A_DEBIT)
    d.ask(d.fin("POS00002", TRANSFER, A_DEBIT, 1_000, to_pan=A_UNKNOWN), "52")
    assert d.balance(A_DEBIT) == before


def test_54_expired_card(d):
    d.ask(d.fin("POS00002", PURCHASE, A_EXPIRED, 1_000), "54")


def test_54_expiry_in_field_14_differs_from_the_card(d):
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 1_000, extra={"14": "2901"}), "54")


def test_52_interbank_transfer_target_unknown_at_its_bank_reverses_the_debit(d):
    before = d.balance(A_DEBIT)
    d.ask(d.fin("POS00002", TRANSFER, A_DEBIT, 3_000, to_pan=C_UNKNOWN), "52")
    assert d.wait_balance(A_DEBIT, before) == before


def test_55_incorrect_pin(d):
    d.ask(d.fin("POS00002", PURCHASE, C_DEBIT, 1_000, pin="9999"), "55")
    d.ask(d.fin("POS00002", PURCHASE, C_DEBIT, 1_000, pin="1234"), "00")   # a right one resets


def test_58_withdrawal_at_a_pos(d):
    d.ask(d.fin("POS00002", WITHDRAWAL, A_DEBIT, 1_000, pin="1234"), "58")


def test_58_purchase_at_an_atm(d):
    d.ask(d.fin("ATM00002", PURCHASE, A_DEBIT, 1_000, pin="1234"), "58")


def test_58_preauthorization_at_an_atm(d):
    d.ask(d.fin("ATM00002", PURCHASE, A_DEBIT, 1_000, mti="0100"), "58")


def test_58_other_kinds_a_terminal_may_not_send(d):
    d.ask(d.fin("POS00002", DEPOSIT, A_DEBIT, 1_000), "58")
    d.ask(d.fin("ATM00002", REFUND, A_DEBIT, 1_000), "58")
    sale = d.fin("POS00002", PURCHASE, A_DEBIT, 1_000)
    d.ask(sale, "00")
    d.ask(d.fin("ATM00002", VOID, A_DEBIT, 1_000, original=sale), "58")


def test_61_withdrawal_above_the_daily_limit(d):
    d.ask(d.fin("ATM00002", WITHDRAWAL, A_SMALL_LIMIT, 60_000, pin="1234"), "61")
    cash = d.fin("ATM00002", WITHDRAWAL, A_SMALL_LIMIT, 30_000, pin="1234")
    d.ask(cash, "00")
    d.ask(d.fin("ATM00002", WITHDRAWAL, A_SMALL_LIMIT, 30_000, pin="1234"), "61")   # 600.00 today
    # A reversed withdrawal gives back its share of the day's limit.
    before = d.balance(A_SMALL_LIMIT)
    d.ask(reversal(d.T["ATM00002"], d.stan(), cash), "00")
    restored = (before[0] + 30_000, before[1] + 30_000)
    assert d.wait_balance(A_SMALL_LIMIT, restored) == restored
    d.ask(d.fin("ATM00002", WITHDRAWAL, A_SMALL_LIMIT, 45_000, pin="1234"), "00")


def test_75_three_wrong_pins_lock_the_card(d):
    before = d.balance(A_PINLOCK)
    for _ in range(3):
        d.ask(d.fin("POS00002", PURCHASE, A_PINLOCK, 1_000, pin="4321"), "55")
    d.ask(d.fin("POS00002", PURCHASE, A_PINLOCK, 1_000, pin="1234"), "75")   # even the right PIN
    assert d.balance(A_PINLOCK) == before


def test_91_issuer_answers_after_the_timeout(d):
    before = d.balance(A_DEBIT)
    d.ask(d.fin("POS00002", PURCHASE, C_SLOW, 1_000), "91")
    # Other cards are not held up by the slow one.
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 1_000), "00")
    assert d.balance(A_DEBIT) == (before[0] - 1_000, before[1] - 1_000)


def test_91_issuer_down(d):
    d.ask(d.fin("POS00002", PURCHASE, D_DOWN, 1_000), "91")
    d.ask(d.fin("POS00002", PURCHASE, A_DEBIT, 1_000), "00")


def test_94_duplicate_transmission(d):
    before = d.balance(B_DEBIT)
    req = d.fin("POS00012", PURCHASE, B_DEBIT, 2_500)
    first = d.ask(req, "00")
    again = d.ask(dict(req), "94")
    assert again["37"] != first["37"]
    assert d.balance(B_DEBIT) == (before[0] - 2_500, before[1] - 2_500)   # sent once to the issuer


def test_94_needs_the_same_mti_class(d):
    """Same 41 + 11 + 7 but another MTI class is not a duplicate."""
    req = d.fin("POS00012", PURCHASE, B_DEBIT, 700)
    d.ask(req, "00")
    d.ask(dict(req, t="0100"), "00")


def test_96_pin_block_from_a_terminal_without_a_pin_key(d):
    term = d.T[NO_TPK_TERMINAL]
    assert term.tpk is None
    req = financial(term, d.stan(), PURCHASE, A_DEBIT, 1_000, pin="1234",
                    pin_key=bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"))
    d.ask(req, "96")
    # The same terminal without a PIN is served.
    d.ask(financial(term, d.stan(), PURCHASE, A_DEBIT, 1_000), "00")
