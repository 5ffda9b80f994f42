"""Fees and money flows of counted entries (settlement.md 3): merchant fees with
floors, debit caps and half-up rounding, refunds giving the fee back,
interchange off-us only, ATM fees, switch fees once per bank; and the
positions' zero sum on random days (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardswitch.settlement.counting import Entry
from cardswitch.settlement.positions import (
    FeeBook,
    MerchantBook,
    PositionBook,
    book_entry,
    flows,
    price,
)
from cardswitch.switch.records import Kind
from test_settlement_support import (
    A_CREDIT,
    A_DEBIT,
    B_CREDIT,
    B_DEBIT,
    C_CREDIT,
    D1,
    D2,
    M_ATM,
    M_COFFEE,
    M_SHOP,
    SWITCH_ID,
    Rows,
    card,
    make_network,
)

BOOK = FeeBook(make_network())


def entry(rec, sign=1):
    return Entry(sign=sign, orig=rec, ident=rec, business_date=rec.business_date, carried=sign < 0)


def money(rec, sign=1):
    e = entry(rec, sign)
    p = price(e, BOOK)
    return p, {(f.payer, f.payee): f.amount for f in flows(e, p, SWITCH_ID)}


# -- merchant fees -------------------------------------------------------------------------------


def test_merchant_fee_rounds_half_up_per_transaction():
    r = Rows()
    # M_COFFEE: 60 bps. 12345 * 0.006 = 74.07 -> 74; 1250 * 0.006 = 7.5 -> 8; 1249 -> 7.494 -> 7
    for amount, fee in ((12345, 74), (1250, 8), (1249, 7), (83, 0), (84, 1), (250, 2)):
        p, _ = money(r.add(Kind.PURCHASE, amount, pan=A_CREDIT))
        assert p.merchant_fee == fee, amount


def test_merchant_fee_debit_cap_and_floor():
    r = Rows()
    # M_COFFEE: cap 2000 for debit cards only. 1,000,000 * 0.006 = 6000
    assert money(r.add(Kind.PURCHASE, 1_000_000, pan=A_DEBIT))[0].merchant_fee == 2000
    assert money(r.add(Kind.PURCHASE, 1_000_000, pan=A_CREDIT))[0].merchant_fee == 6000
    # M_SHOP: 80 bps, min 5, debit cap 500. 100 * 0.008 = 0.8 -> 1 -> floor 5
    assert money(r.add(Kind.PURCHASE, 100, pan=B_DEBIT, merchant=M_SHOP))[0].merchant_fee == 5
    assert money(r.add(Kind.PURCHASE, 100_000, pan=B_DEBIT, merchant=M_SHOP))[0].merchant_fee == 500
    assert money(r.add(Kind.PURCHASE, 100_000, pan=B_CREDIT, merchant=M_SHOP))[0].merchant_fee == 800


def test_refund_gives_back_the_fee_its_amount_would_carry():
    r = Rows()
    for amount, pan, merchant, fee in ((12345, A_CREDIT, M_COFFEE, 74), (1250, A_CREDIT, M_COFFEE, 8),
                                       (100, B_DEBIT, M_SHOP, 5), (1_000_000, A_DEBIT, M_COFFEE, 2000)):
        p, _ = money(r.add(Kind.REFUND, amount, pan=pan, merchant=merchant))
        assert p.merchant_fee == -fee


def test_completion_and_bill_payment_carry_fees_withdrawal_deposit_transfer_do_not():
    r = Rows()
    assert money(r.add(Kind.COMPLETION, 12345, pan=A_CREDIT))[0].merchant_fee == 74
    assert money(r.add(Kind.BILL_PAYMENT, 12345, pan=A_CREDIT))[0].merchant_fee == 74
    for kind in (Kind.WITHDRAWAL, Kind.DEPOSIT):
        assert money(r.add(kind, 12345, merchant=M_ATM))[0].merchant_fee == 0
    assert money(r.add(Kind.TRANSFER, 12345, merchant=M_ATM, to_pan=B_DEBIT))[0].merchant_fee == 0


def test_card_type_from_a_range_longer_than_six_digits():
    """622128xx is BANKA's 8-digit credit range; the masked PAN shows 6 digits."""
    r = Rows()
    assert BOOK.card_type(r.add(Kind.PURCHASE, pan=A_CREDIT)) == "credit"
    assert BOOK.card_type(r.add(Kind.PURCHASE, pan=A_DEBIT)) == "debit"
    assert BOOK.card_type(r.add(Kind.PURCHASE, pan=C_CREDIT)) == "credit"
    # unknown BIN of a bank whose ranges disagree: credit (no cap); of a one-type bank: that type
    odd = r.add(Kind.PURCHASE, pan=card("629999000000001"), issuer_id="BANKA")
    assert BOOK.card_type(odd) == "credit"
    odd_c = r.add(Kind.PURCHASE, pan=card("629999000000002"), issuer_id="BANKC")
    assert BOOK.card_type(odd_c) == "credit"


# -- interchange, ATM and switch fees ----------------------------------------------------------------


def test_off_us_purchase_interchange_and_flows():
    r = Rows()
    # B card at BANKA's merchant: BANKB interchange 40 bps, debit cap 900
    p, f = money(r.add(Kind.PURCHASE, 12345, pan=B_CREDIT))
    assert p.interchange == 49                           # 49.38 -> 49
    assert f == {("BANKB", "BANKA"): 12345, ("BANKA", "BANKB"): 49,
                 ("BANKA", SWITCH_ID): 10, ("BANKB", SWITCH_ID): 10}
    p, _ = money(r.add(Kind.PURCHASE, 1_000_000, pan=B_DEBIT))
    assert p.interchange == 900                          # capped for debit
    p, _ = money(r.add(Kind.PURCHASE, 1_000_000, pan=B_CREDIT))
    assert p.interchange == 4000                         # no cap for credit
    p, _ = money(r.add(Kind.PURCHASE, 1250, pan=C_CREDIT))
    assert p.interchange == 6                            # 50 bps of 1250 = 6.25 -> 6
    p, _ = money(r.add(Kind.PURCHASE, 1300, pan=C_CREDIT))
    assert p.interchange == 7                            # 6.5 -> 7 (half up)


def test_on_us_purchase_no_interchange_switch_fee_once():
    r = Rows()
    p, f = money(r.add(Kind.PURCHASE, 12345, pan=A_DEBIT))
    assert p.interchange == 0
    assert f == {("BANKA", SWITCH_ID): 10}


def test_withdrawal_atm_fee_off_us_only():
    r = Rows()
    p, f = money(r.add(Kind.WITHDRAWAL, 50000, pan=A_DEBIT, merchant=M_ATM))
    assert p.atm_fee == 300
    assert f == {("BANKA", "BANKB"): 50300, ("BANKB", SWITCH_ID): 10, ("BANKA", SWITCH_ID): 10}
    p, f = money(r.add(Kind.WITHDRAWAL, 50000, pan=B_DEBIT, merchant=M_ATM))
    assert p.atm_fee == 0 and f == {("BANKB", SWITCH_ID): 10}


def test_refund_deposit_transfer_flows():
    r = Rows()
    _, f = money(r.add(Kind.REFUND, 2000, pan=C_CREDIT))
    assert f == {("BANKA", "BANKC"): 2000, ("BANKA", SWITCH_ID): 10, ("BANKC", SWITCH_ID): 10}
    _, f = money(r.add(Kind.DEPOSIT, 9000, pan=A_DEBIT, merchant=M_ATM))
    assert f == {("BANKB", "BANKA"): 9000, ("BANKB", SWITCH_ID): 10, ("BANKA", SWITCH_ID): 10}
    # transfer at BANKB's ATM from a BANKA card to a BANKC card: the receiving bank pays no fee
    _, f = money(r.add(Kind.TRANSFER, 7000, pan=A_DEBIT, merchant=M_ATM, to_pan=C_CREDIT))
    assert f == {("BANKA", "BANKC"): 7000, ("BANKB", SWITCH_ID): 10, ("BANKA", SWITCH_ID): 10}
    _, f = money(r.add(Kind.TRANSFER, 7000, pan=B_DEBIT, merchant=M_ATM, to_pan=B_CREDIT))
    assert f == {("BANKB", SWITCH_ID): 10}


def test_negative_entry_moves_everything_back():
    r = Rows()
    rec = r.add(Kind.WITHDRAWAL, 50000, pan=A_DEBIT, merchant=M_ATM)
    p, f = money(rec, sign=-1)
    assert (p.atm_fee, p.switch_fee_acquirer, p.switch_fee_issuer) == (-300, -10, -10)
    assert f == {("BANKB", "BANKA"): 50300, (SWITCH_ID, "BANKB"): 10, (SWITCH_ID, "BANKA"): 10}
    rec = r.add(Kind.REFUND, 12345, pan=A_CREDIT)
    p, _ = money(rec, sign=-1)
    assert p.merchant_fee == 74               # the fee the refund gave back is taken again


def test_merchant_book_counts_and_net():
    r = Rows()
    mb, pb = MerchantBook(), PositionBook(SWITCH_ID)
    for rec, sign in ((r.add(Kind.PURCHASE, 12345, pan=A_CREDIT), 1),   # fee 74
                      (r.add(Kind.COMPLETION, 1250, pan=A_CREDIT), 1),  # fee 8
                      (r.add(Kind.BILL_PAYMENT, 84, pan=A_CREDIT), 1),  # fee 1
                      (r.add(Kind.REFUND, 1250, pan=A_CREDIT), 1),      # fee -8
                      (r.add(Kind.PURCHASE, 1000, date=D1, pan=A_CREDIT), -1),   # taken back: fee -6
                      (r.add(Kind.REFUND, 500, pan=A_CREDIT), -1),      # taken back: fee +3
                      (r.add(Kind.WITHDRAWAL, 500, merchant=M_ATM), 1)):
        book_entry(entry(rec, sign), BOOK, mb, pb)
    assert mb.rows(book=BOOK) == [
        (M_COFFEE, "Shanghai Coffee", "156", 3 - 1, 12345 + 1250 + 84 - 1000, 1 - 1, 1250 - 500,
         74 + 8 + 1 - 8 - 6 + 3, (12345 + 1250 + 84 - 1000) - (1250 - 500) - (74 + 8 + 1 - 8 - 6 + 3)),
    ]


# -- properties ---------------------------------------------------------------------------------------

PANS = [A_DEBIT, A_CREDIT, B_DEBIT, B_CREDIT, C_CREDIT]
KINDS = [Kind.PURCHASE, Kind.COMPLETION, Kind.BILL_PAYMENT, Kind.REFUND, Kind.WITHDRAWAL,
         Kind.DEPOSIT, Kind.TRANSFER]

txn = st.tuples(st.sampled_from(KINDS), st.integers(1, 5_000_000), st.sampled_from(PANS),
                st.sampled_from([M_COFFEE, M_SHOP, M_ATM]), st.sampled_from(PANS),
                st.sampled_from(["156", "840"]), st.sampled_from([1, 1, 1, -1]))


def _book_day(txns, switch_fee):
    book = FeeBook(make_network(switch_fee=switch_fee))
    r = Rows()
    mb, pb = MerchantBook(), PositionBook(book.switch_id)
    recs = []
    for kind, amount, pan, merchant, to_pan, cur, sign in txns:
        rec = r.add(kind, amount, pan=pan, merchant=merchant, to_pan=to_pan if kind == Kind.TRANSFER else "",
                    date=D2 if sign > 0 else D1, currency=cur)
        recs.append((rec, sign))
        book_entry(entry(rec, sign), book, mb, pb)
    return book, recs, mb, pb


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(txn, max_size=40), st.integers(0, 50))
def test_positions_of_each_currency_sum_to_zero(txns, switch_fee):
    _, recs, _, pb = _book_day(txns, switch_fee)
    nets: dict[str, int] = {}
    for pid, cur, receivable, payable, net in pb.rows():
        assert receivable >= 0 and payable >= 0 and net == receivable - payable
        nets[cur] = nets.get(cur, 0) + net
    assert all(v == 0 for v in nets.values()), nets
    # the switch earns exactly its fees, net of those given back
    expected_switch: dict[str, int] = {}
    for rec, sign in recs:
        acq = {M_COFFEE: "BANKA", M_SHOP: "BANKB", M_ATM: "BANKB"}[rec.merchant_id]
        n_banks = 1 if acq == rec.issuer_id else 2
        expected_switch[rec.currency] = expected_switch.get(rec.currency, 0) + sign * switch_fee * n_banks
    got_switch = {cur: net for pid, cur, _, _, net in pb.rows() if pid == SWITCH_ID}
    assert got_switch == {c: v for c, v in expected_switch.items() if switch_fee}


@settings(max_examples=100, deadline=None)
@given(st.lists(txn, max_size=40))
def test_merchant_nets_are_purchases_minus_refunds_minus_fees(txns):
    _, recs, mb, _ = _book_day(txns, 10)
    rows = mb.rows(book=BOOK)
    for mid, name, cur, pc, pa, rc, ra, fee, net in rows:
        assert net == pa - ra - fee
    # independent of the book: every sale or refund's amount lands in its merchant's row
    exp: dict[tuple[str, str], list[int]] = {}
    for rec, sign in recs:
        if rec.kind in (Kind.PURCHASE, Kind.COMPLETION, Kind.BILL_PAYMENT, Kind.REFUND):
            t = exp.setdefault((rec.merchant_id, rec.currency), [0, 0])
            t[0 if rec.kind != Kind.REFUND else 1] += sign * rec.amount
    assert {(r[0], r[2]): [r[4], r[6]] for r in rows} == exp
