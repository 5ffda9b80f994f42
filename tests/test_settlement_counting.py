"""What counts on a business date (settlement.md 2), with hand-made journal rows:
every kind, same-day and later-day reversals and voids, reversed voids,
completions, stand-in, and stability (a later date never changes an earlier one)."""

from __future__ import annotations

import pytest

from cardswitch.settlement.counting import (
    ALL_CLEARING_KINDS,
    ClearingKind,
    clearing_rows,
    day_changes,
    entries,
)
from cardswitch.switch.records import Cancel, Kind, Status
from test_settlement_support import (
    A_CREDIT,
    A_DEBIT,
    B_CREDIT,
    B_DEBIT,
    C_CREDIT,
    D1,
    D2,
    D3,
    M_ATM,
    M_SHOP,
    MemoryRows,
    Rows,
)


def day(rows: Rows, date: str, upto: str | None = None):
    """The entries of ``date`` seeing only rows of dates <= ``upto`` (default: all rows)."""
    src = MemoryRows(r for r in rows.all if upto is None or r.business_date <= upto)
    ch = day_changes(date, src)
    return list(entries(src.candidates(date), ch))


def summary(es) -> list[tuple]:
    """(sign, orig id, ident id, clearing kinds) per entry."""
    return [(e.sign, e.orig.id, e.ident.id, tuple(r.kind for r in clearing_rows(e))) for e in es]


# -- what counts -------------------------------------------------------------------------------


def test_every_counted_kind_counts_and_nothing_else():
    r = Rows()
    counted = [
        r.add(Kind.PURCHASE), r.add(Kind.COMPLETION, orig=r.add(Kind.PREAUTH)),
        r.add(Kind.WITHDRAWAL, merchant=M_ATM), r.add(Kind.REFUND), r.add(Kind.DEPOSIT, merchant=M_ATM),
        r.add(Kind.BILL_PAYMENT), r.add(Kind.TRANSFER, merchant=M_ATM, to_pan=B_DEBIT),
        r.add(Kind.PURCHASE, stand_in=True, issuer_stan=""),
    ]
    # never counted: pre-authorization alone, balance inquiry, declines, timeouts, pending, zero amount
    r.add(Kind.PREAUTH)
    r.add(Kind.BALANCE, 0)
    r.add(Kind.PURCHASE, status=Status.DECLINED)
    r.add(Kind.WITHDRAWAL, merchant=M_ATM, status=Status.TIMEOUT, cancelled=Cancel.REVERSED)
    r.add(Kind.PURCHASE, status=Status.PENDING)
    r.add(Kind.TRANSFER, merchant=M_ATM, to_pan=B_DEBIT, status=Status.DECLINED)
    got = summary(day(r, D1))
    assert [g[1] for g in got] == [c.id for c in counted]
    kinds = [g[3] for g in got]
    assert kinds == [("purchase",), ("completion",), ("withdrawal",), ("refund",), ("deposit",),
                     ("bill_payment",), ("transfer_out", "transfer_in"), ("purchase",)]
    assert all(sign == 1 for sign, *_ in got)
    assert {k for ks in kinds for k in ks} <= set(ALL_CLEARING_KINDS)


def test_completed_preauth_counts_only_through_its_completion():
    r = Rows()
    pre = r.add(Kind.PREAUTH, 20000)
    comp = r.add(Kind.COMPLETION, 15000, orig=pre)
    assert pre.cancelled == Cancel.COMPLETED
    got = day(r, D1)
    assert [(e.orig.id, e.orig.amount) for e in got] == [(comp.id, 15000)]


def test_entries_in_rrn_order():
    r = Rows()
    a = r.add(Kind.PURCHASE, rrn="600000000009")
    b = r.add(Kind.PURCHASE, rrn="600000000001")
    c = r.add(Kind.PURCHASE, rrn="600000000005")
    assert [e.orig.id for e in day(r, D1)] == [b.id, c.id, a.id]


# -- reversals and voids ------------------------------------------------------------------------


def test_same_day_reversal_and_void_cancel_their_originals():
    r = Rows()
    p = r.add(Kind.PURCHASE)
    r.undo(Kind.REVERSAL, p)
    q = r.add(Kind.PURCHASE, 3000)
    r.undo(Kind.VOID, q)
    w = r.add(Kind.WITHDRAWAL, merchant=M_ATM)
    r.undo(Kind.REVERSAL, w)
    keep = r.add(Kind.REFUND, 700)
    assert [e.orig.id for e in day(r, D1)] == [keep.id]


def test_later_day_reversal_counts_on_its_own_date_as_negative():
    r = Rows()
    p = r.add(Kind.PURCHASE, 12345, date=D1)
    rev = r.undo(Kind.REVERSAL, p, date=D2)
    assert p.cancelled == Cancel.REVERSED and p.cancelled_by == rev.id
    # D1 counts the purchase, whether settled before or after the reversal arrived
    assert summary(day(r, D1, upto=D1)) == summary(day(r, D1)) == [(1, p.id, p.id, ("purchase",))]
    d2 = day(r, D2)
    assert summary(d2) == [(-1, p.id, p.id, ("reversal",))]
    (row,) = clearing_rows(d2[0])
    assert row.amount == -12345 and row.business_date == D2 and row.rrn == p.rrn and row.issuer_id == "BANKA"


def test_later_day_void_counts_as_negative_named_by_the_void():
    r = Rows()
    p = r.add(Kind.PURCHASE, 5000, date=D1, pan=B_DEBIT, merchant=M_SHOP)
    v = r.undo(Kind.VOID, p, date=D2)
    assert summary(day(r, D1)) == [(1, p.id, p.id, ("purchase",))]
    (e,) = day(r, D2)
    assert (e.sign, e.orig.id, e.ident.id) == (-1, p.id, v.id)
    (row,) = clearing_rows(e)
    assert (row.kind, row.amount, row.rrn, row.processing_code) == ("reversal", -5000, v.rrn, "020000")


def test_reversal_of_a_reversed_or_declined_original_changes_nothing():
    r = Rows()
    p = r.add(Kind.PURCHASE, date=D1)
    r.undo(Kind.REVERSAL, p, date=D2)
    r.undo(Kind.REVERSAL, p, date=D2)            # answered 00 again, changes nothing
    r.undo(Kind.REVERSAL, p, date=D3)
    d = r.add(Kind.PURCHASE, date=D2, status=Status.DECLINED)
    r.undo(Kind.REVERSAL, d, date=D2)
    t = r.add(Kind.PURCHASE, date=D2, status=Status.TIMEOUT, cancelled=Cancel.REVERSED)
    r.undo(Kind.REVERSAL, t, date=D2)
    assert summary(day(r, D2)) == [(-1, p.id, p.id, ("reversal",))]
    assert day(r, D3) == []


def test_reversal_of_a_voided_purchase_changes_nothing():
    r = Rows()
    p = r.add(Kind.PURCHASE, date=D1)
    r.undo(Kind.VOID, p, date=D1)
    r.undo(Kind.REVERSAL, p, date=D1)
    assert day(r, D1) == []


def test_void_reversed_the_same_day_lets_the_purchase_stand():
    r = Rows()
    p = r.add(Kind.PURCHASE, 4000)
    v = r.undo(Kind.VOID, p)
    r.undo(Kind.REVERSAL, v)
    assert p.cancelled == Cancel.NONE and v.cancelled == Cancel.REVERSED
    assert summary(day(r, D1)) == [(1, p.id, p.id, ("purchase",))]


def test_void_reversed_on_a_later_date_reinstates_the_purchase_there():
    r = Rows()
    p = r.add(Kind.PURCHASE, 4000, date=D1)
    v = r.undo(Kind.VOID, p, date=D1)
    r.undo(Kind.REVERSAL, v, date=D2)
    # the journal's marks now say the purchase stands; D1 must not change
    assert p.cancelled == Cancel.NONE
    assert day(r, D1) == [] == day(r, D1, upto=D1)
    (e,) = day(r, D2)
    assert (e.sign, e.orig.id, e.ident.id) == (1, p.id, v.id)
    (row,) = clearing_rows(e)
    assert (row.kind, row.amount, row.rrn) == ("reversal", 4000, v.rrn)


def test_void_and_its_reversal_on_a_later_date_than_the_purchase_net_out():
    r = Rows()
    p = r.add(Kind.PURCHASE, 4000, date=D1)
    v = r.undo(Kind.VOID, p, date=D2)
    r.undo(Kind.REVERSAL, v, date=D2)
    assert [e.orig.id for e in day(r, D1)] == [p.id]
    assert day(r, D2) == []


def test_purchase_voided_d2_void_reversed_d3():
    r = Rows()
    p = r.add(Kind.PURCHASE, 4000, date=D1)
    v = r.undo(Kind.VOID, p, date=D2)
    r.undo(Kind.REVERSAL, v, date=D3)
    assert summary(day(r, D1)) == [(1, p.id, p.id, ("purchase",))]
    assert summary(day(r, D2)) == [(-1, p.id, v.id, ("reversal",))]
    assert summary(day(r, D3)) == [(1, p.id, v.id, ("reversal",))]


def test_completion_reversed_later():
    r = Rows()
    pre = r.add(Kind.PREAUTH, 9000, date=D1)
    comp = r.add(Kind.COMPLETION, 8000, orig=pre, date=D1)
    r.undo(Kind.REVERSAL, comp, date=D2)
    assert [e.orig.id for e in day(r, D1)] == [comp.id]
    (e,) = day(r, D2)
    assert e.sign == -1 and e.orig.id == comp.id and clearing_rows(e)[0].amount == -8000


@pytest.mark.parametrize("same_day", [True, False])
def test_interbank_transfer_reversal(same_day):
    r = Rows()
    t = r.add(Kind.TRANSFER, 7000, date=D1, merchant=M_ATM, to_pan=B_CREDIT)
    r.undo(Kind.REVERSAL, t, date=D1 if same_day else D2)
    if same_day:
        assert day(r, D1) == []
        return
    (e1,) = day(r, D1)
    rows1 = clearing_rows(e1)
    assert [(x.issuer_id, x.kind, x.amount) for x in rows1] == [
        ("BANKA", "transfer_out", 7000), ("BANKB", "transfer_in", 7000)]
    (e2,) = day(r, D2)
    assert [(x.issuer_id, x.kind, x.amount) for x in clearing_rows(e2)] == [
        ("BANKA", "reversal", -7000), ("BANKB", "reversal", -7000)]


def test_transfer_legs():
    r = Rows()
    inter = r.add(Kind.TRANSFER, 7000, merchant=M_ATM, pan=A_DEBIT, to_pan=B_CREDIT)
    on_us = r.add(Kind.TRANSFER, 3000, merchant=M_ATM, pan=A_DEBIT, to_pan=A_CREDIT)
    got = {e.orig.id: clearing_rows(e) for e in day(r, D1)}
    out, inn = got[inter.id]
    assert (out.issuer_id, out.pan_masked, out.processing_code, out.auth_code) == (
        "BANKA", "622126******" + A_DEBIT[-4:], "401010", inter.auth_code)
    assert (inn.issuer_id, inn.pan_masked, inn.processing_code, inn.auth_code) == (
        "BANKB", "622849******" + B_CREDIT[-4:], "281010", inter.to_auth_code)
    out, inn = got[on_us.id]
    assert (out.issuer_id, inn.issuer_id) == ("BANKA", "BANKA")
    assert (inn.kind, inn.processing_code, inn.auth_code) == (ClearingKind.TRANSFER_IN, "401010", on_us.auth_code)


def test_stability_every_date_the_same_whenever_settled():
    """Settling a date with only its own and earlier rows, or with every later
    row too, gives the same entries (the journal's marks change, counting does not)."""
    r = Rows()
    a = r.add(Kind.PURCHASE, 100, date=D1)
    b = r.add(Kind.REFUND, 200, date=D1, pan=C_CREDIT)
    c = r.add(Kind.WITHDRAWAL, 300, date=D1, merchant=M_ATM)
    r.undo(Kind.REVERSAL, a, date=D2)
    v = r.undo(Kind.VOID, r.add(Kind.PURCHASE, 400, date=D2), date=D2)
    r.undo(Kind.REVERSAL, v, date=D3)
    r.undo(Kind.REVERSAL, b, date=D3)
    r.undo(Kind.REVERSAL, c, date=D1)
    for d in (D1, D2, D3):
        assert summary(day(r, d, upto=d)) == summary(day(r, d))
    # and across the three dates every transaction nets to what stands now
    net: dict[int, int] = {}
    for d in (D1, D2, D3):
        for e in day(r, d):
            net[e.orig.id] = net.get(e.orig.id, 0) + e.sign
    standing = {x.id for x in r.all if x.kind in (Kind.PURCHASE, Kind.REFUND, Kind.WITHDRAWAL)
                and x.status == Status.APPROVED and x.cancelled == Cancel.NONE}
    assert {k for k, v in net.items() if v == 1} == standing
    assert all(v in (0, 1) for v in net.values())


def test_undo_rows_of_other_dates_only_through_links():
    """An earlier date's transaction appears on a date only through an undo row of that date."""
    r = Rows()
    r.add(Kind.PURCHASE, 100, date=D1)
    r.add(Kind.PURCHASE, 100, date=D2, pan=B_DEBIT, merchant=M_SHOP)
    assert [e.orig.business_date for e in day(r, D2)] == [D2]
    assert all(not e.carried for e in day(r, D2))


def test_carried_entries_merge_into_rrn_order():
    r = Rows()
    d1 = [r.add(Kind.PURCHASE, 100 + i, date=D1, rrn=rrn) for i, rrn in enumerate(("r5", "r2", "r8", "r0"))]
    own = [r.add(Kind.PURCHASE, 200 + i, date=D2, rrn=rrn) for i, rrn in enumerate(("r3", "r9", "r1"))]
    for p in d1:
        r.undo(Kind.REVERSAL, p, date=D2, rrn="x" + p.rrn)      # the reversal's own RRN is not the key
    got = day(r, D2)
    assert [e.ident.rrn for e in got] == ["r0", "r1", "r2", "r3", "r5", "r8", "r9"]
    assert [e.sign for e in got] == [-1, 1, -1, 1, -1, -1, 1]
    assert {e.orig.id for e in got if e.sign > 0} == {x.id for x in own}


def test_earlier_dates_are_read_only_when_an_undo_reaches_back():
    r = Rows()
    p = r.add(Kind.PURCHASE, date=D1)
    r.add(Kind.PURCHASE, date=D3)
    src = MemoryRows(r.all)
    day_changes(D3, src)
    assert src.ranges == [(D3, D3)]                     # nothing undone: the date alone
    r.undo(Kind.REVERSAL, p, date=D3)
    src = MemoryRows(r.all)
    ch = day_changes(D3, src)
    assert src.ranges == [(D3, D3), (D1, D2)]           # back to the original's date, once
    assert [(e.sign, e.orig.id) for e in ch.carried] == [(-1, p.id)]


# -- random days (hypothesis) ------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cardswitch.settlement.positions import FeeBook, MerchantBook, PositionBook, book_entry  # noqa: E402
from test_settlement_support import M_COFFEE, make_network  # noqa: E402

_KINDS = [Kind.PURCHASE] * 4 + [Kind.COMPLETION, Kind.BILL_PAYMENT, Kind.REFUND, Kind.WITHDRAWAL, Kind.DEPOSIT,
          Kind.TRANSFER, Kind.PREAUTH, Kind.BALANCE]
_PANS = [A_DEBIT, A_CREDIT, B_DEBIT, B_CREDIT, C_CREDIT]
_DATES = [D1, D2, D3]

step = st.one_of(
    st.tuples(st.just("txn"), st.sampled_from(_KINDS), st.integers(1, 10**6), st.sampled_from(_PANS),
              st.sampled_from([M_COFFEE, M_SHOP, M_ATM]), st.sampled_from(_PANS),
              st.sampled_from([Status.APPROVED] * 4 + [Status.DECLINED, Status.TIMEOUT])),
    st.tuples(st.just("undo"), st.sampled_from([Kind.VOID, Kind.REVERSAL]), st.integers(0, 10**6),
              st.sampled_from([Status.APPROVED] * 3 + [Status.DECLINED])),
    st.tuples(st.just("next day")),
)


def _random_rows(steps) -> Rows:
    r = Rows()
    d = 0
    for s in steps:
        if s[0] == "next day":
            d = min(d + 1, len(_DATES) - 1)
        elif s[0] == "txn":
            _, kind, amount, pan, merchant, to_pan, status = s
            r.add(kind, amount if kind != Kind.BALANCE else 0, date=_DATES[d], pan=pan, merchant=merchant,
                  to_pan=to_pan if kind == Kind.TRANSFER else "", status=status)
        elif r.all:
            _, kind, pick, status = s
            targets = [x for x in r.all if kind == Kind.REVERSAL or
                       (x.kind == Kind.PURCHASE and x.status == Status.APPROVED and x.cancelled == "")]
            if targets:           # mostly one of the last few requests, as terminals do
                t = targets[-1 - pick % min(len(targets), 3)] if pick % 4 else targets[pick % len(targets)]
                r.undo(kind, t, date=_DATES[d], status=status)
    return r


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=60))
def test_random_days_stable_and_zero_sum(steps):
    r = _random_rows(steps)
    book = FeeBook(make_network())
    net_count: dict[int, int] = {}
    for d in _DATES:
        got = day(r, d)
        assert summary(got) == summary(day(r, d, upto=d))        # later rows never change a date
        mb, pb = MerchantBook(), PositionBook(book.switch_id)
        for e in got:
            book_entry(e, book, mb, pb)
            net_count[e.orig.id] = net_count.get(e.orig.id, 0) + e.sign
        nets: dict[str, int] = {}
        for _, cur, receivable, payable, net in pb.rows():
            nets[cur] = nets.get(cur, 0) + net
        assert all(v == 0 for v in nets.values())
        for row in mb.rows(book=book):
            assert row[8] == row[4] - row[6] - row[7]
    # over all dates, exactly what stands now is counted once, everything else nets to zero
    standing = {x.id for x in r.all if x.kind in (Kind.PURCHASE, Kind.COMPLETION, Kind.BILL_PAYMENT,
                                                  Kind.REFUND, Kind.WITHDRAWAL, Kind.DEPOSIT, Kind.TRANSFER)
                and x.status == Status.APPROVED and x.cancelled == Cancel.NONE and x.amount > 0}
    assert {i for i, n in net_count.items() if n == 1} == standing
    assert all(n in (0, 1) for n in net_count.values())
