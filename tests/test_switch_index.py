"""The in-memory transaction index: duplicate keys, originals, batches, responses."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.switch.index import BatchTotals, TxnIndex, batch_totals, request_key
from cardswitch.switch.records import CREDIT_KINDS, DEBIT_KINDS, Cancel, Kind, Status, TxnRecord

_ids = itertools.count(1)


def rec(kind: str = Kind.PURCHASE, amount: int = 1000, *, status: str = Status.APPROVED,
        cancelled: str = Cancel.NONE, mti: str = "0200", tid: str = "POS00001", stan: str | None = None,
        transmitted: str = "0314101500", batch: str = "000001") -> TxnRecord:
    i = next(_ids)
    return TxnRecord(id=i, business_date="2026-03-14", received_at="2026-03-14T10:15:00.000000Z",
                     mti=mti, proc="000000", kind=kind, amount=amount, currency="156", terminal_id=tid,
                     merchant_id="898440158120001", stan=stan or f"{i % 1000000:06d}",
                     transmitted=transmitted, batch=batch, status=status, cancelled=cancelled)


# -- batch totals (wire.md 6) -----------------------------------------------------


def test_debit_and_credit_kinds_are_those_of_wire_md_6():
    # debits: purchase, completion, withdrawal, bill payment, transfer-out; credits: refund, deposit
    assert DEBIT_KINDS == {Kind.PURCHASE, Kind.COMPLETION, Kind.WITHDRAWAL, Kind.BILL_PAYMENT, Kind.TRANSFER}
    assert CREDIT_KINDS == {Kind.REFUND, Kind.DEPOSIT}


@pytest.mark.parametrize("kind, expected", [
    (Kind.PURCHASE, BatchTotals(0, 0, 1, 700)),
    (Kind.COMPLETION, BatchTotals(0, 0, 1, 700)),
    (Kind.WITHDRAWAL, BatchTotals(0, 0, 1, 700)),
    (Kind.BILL_PAYMENT, BatchTotals(0, 0, 1, 700)),
    (Kind.TRANSFER, BatchTotals(0, 0, 1, 700)),
    (Kind.REFUND, BatchTotals(1, 700, 0, 0)),
    (Kind.DEPOSIT, BatchTotals(1, 700, 0, 0)),
    (Kind.PREAUTH, BatchTotals()),        # holds, settles through its completion
    (Kind.BALANCE, BatchTotals()),
    (Kind.VOID, BatchTotals()),           # a void is not counted itself
    (Kind.REVERSAL, BatchTotals()),
])
def test_each_kind_counts_as_debit_credit_or_nothing(kind, expected):
    assert batch_totals([rec(kind, 700)]) == expected


@pytest.mark.parametrize("status", [Status.DECLINED, Status.TIMEOUT, Status.PENDING, Status.ERROR])
def test_only_approved_count(status):
    assert batch_totals([rec(Kind.PURCHASE, status=status), rec(Kind.REFUND, status=status)]) == BatchTotals()


@pytest.mark.parametrize("cancelled", [Cancel.REVERSED, Cancel.VOIDED])
def test_reversed_or_voided_originals_count_nothing(cancelled):
    records = [rec(Kind.PURCHASE, 1000, cancelled=cancelled), rec(Kind.PURCHASE, 250)]
    assert batch_totals(records) == BatchTotals(0, 0, 1, 250)


def test_void_removes_its_purchase_and_is_not_counted():
    purchase = rec(Kind.PURCHASE, 1000, cancelled=Cancel.VOIDED)
    void = rec(Kind.VOID, 1000)
    refund = rec(Kind.REFUND, 300)
    assert batch_totals([purchase, void, refund]) == BatchTotals(1, 300, 0, 0)


def test_completion_counts_once_its_preauth_never():
    preauth = rec(Kind.PREAUTH, 5000, mti="0100", cancelled=Cancel.COMPLETED)
    completion = rec(Kind.COMPLETION, 4200)
    assert batch_totals([preauth, completion]) == BatchTotals(0, 0, 1, 4200)


_kinds = st.sampled_from([Kind.PURCHASE, Kind.COMPLETION, Kind.WITHDRAWAL, Kind.BILL_PAYMENT, Kind.TRANSFER,
                          Kind.REFUND, Kind.DEPOSIT, Kind.PREAUTH, Kind.BALANCE, Kind.VOID, Kind.REVERSAL])
_rows = st.lists(st.tuples(_kinds, st.integers(0, 10**12),
                           st.sampled_from([Status.APPROVED, Status.DECLINED, Status.TIMEOUT]),
                           st.sampled_from([Cancel.NONE, Cancel.REVERSED, Cancel.VOIDED, Cancel.COMPLETED])),
                 max_size=30)


@settings(max_examples=150, deadline=None)
@given(_rows, st.randoms(use_true_random=False))
def test_totals_are_order_free_and_ignore_what_does_not_count(rows, rnd):
    records = [rec(k, a, status=s, cancelled=c) for k, a, s, c in rows]
    tot = batch_totals(records)
    shuffled = list(records)
    rnd.shuffle(shuffled)
    assert batch_totals(shuffled) == tot
    counted = [r for r in records if r.status == Status.APPROVED and r.cancelled not in
               (Cancel.REVERSED, Cancel.VOIDED)]
    assert tot.debits_number == sum(r.kind in DEBIT_KINDS for r in counted)
    assert tot.credits_amount == sum(r.amount for r in counted if r.kind in CREDIT_KINDS)
    # Adding declined rows or undone rows changes nothing.
    noise = [rec(Kind.PURCHASE, 99, status=Status.DECLINED), rec(Kind.REFUND, 99, cancelled=Cancel.REVERSED)]
    assert batch_totals(records + noise) == tot
    assert all(type(v) is int for v in (tot.credits_number, tot.credits_amount, tot.debits_number,
                                        tot.debits_amount))


# -- request keys ---------------------------------------------------------------------


def test_request_key_uses_the_mti_class():
    assert request_key("T", "000001", "0314101500", "0200") == ("T", "000001", "0314101500", "020")
    assert request_key("T", "000001", "0314101500", "0201") == request_key("T", "000001", "0314101500", "0200")


def test_0200_and_0201_share_a_key():
    idx = TxnIndex()
    original = rec(mti="0200", stan="000010")
    idx.add(original)
    assert idx.find("POS00001", "000010", "0314101500", "0201") is original
    repeat_first = rec(mti="0201", stan="000011")
    idx.add(repeat_first)
    assert idx.find("POS00001", "000011", "0314101500", "0200") is repeat_first


@pytest.mark.parametrize("other_mti", ["0400", "0401", "0100", "0220", "0800"])
def test_other_classes_do_not_collide_with_0200(other_mti):
    idx = TxnIndex()
    purchase = rec(mti="0200", stan="000010")
    idx.add(purchase)
    assert idx.find("POS00001", "000010", "0314101500", other_mti) is None
    other = rec(Kind.REVERSAL, mti=other_mti, stan="000010")
    idx.add(other)
    assert idx.find("POS00001", "000010", "0314101500", "0200") is purchase
    assert idx.find("POS00001", "000010", "0314101500", other_mti) is other
    assert len(idx) == 2


@pytest.mark.parametrize("tid, stan, f7", [
    ("POS00002", "000010", "0314101500"),
    ("POS00001", "000011", "0314101500"),
    ("POS00001", "000010", "0314101501"),
])
def test_find_needs_every_part_of_the_key(tid, stan, f7):
    idx = TxnIndex()
    idx.add(rec(stan="000010"))
    assert idx.find(tid, stan, f7, "0200") is None


# -- batches ---------------------------------------------------------------------------


def test_batch_records_per_terminal_and_batch():
    idx = TxnIndex()
    a1, a2 = rec(batch="000001"), rec(Kind.REFUND, 300, batch="000001")
    b = rec(batch="000002")
    other_terminal = rec(tid="POS00002", batch="000001")
    for r in (a1, a2, b, other_terminal):
        idx.add(r)
    assert idx.batch_records("POS00001", "000001") == [a1, a2]
    assert idx.totals("POS00001", "000001") == BatchTotals(1, 300, 1, 1000)
    assert idx.totals("POS00001", "000002") == BatchTotals(0, 0, 1, 1000)
    assert idx.totals("POS00009", "000001") == BatchTotals()


@pytest.mark.parametrize("kind", [Kind.NETWORK, Kind.BATCH_CLOSE, Kind.BATCH_UPLOAD])
def test_housekeeping_is_not_part_of_a_batch(kind):
    idx = TxnIndex()
    idx.add(rec(kind))
    assert idx.batch_records("POS00001", "000001") == []


def test_rows_without_a_batch_are_in_no_batch():
    idx = TxnIndex()
    idx.add(rec(batch=""))
    assert idx.batch_records("POS00001", "") == []
    assert len(idx) == 1


def test_index_sees_later_changes_to_a_record():
    idx = TxnIndex()
    r = rec(status=Status.PENDING)
    idx.add(r)
    assert idx.totals("POS00001", "000001") == BatchTotals()
    r.status = Status.APPROVED
    assert idx.totals("POS00001", "000001") == BatchTotals(0, 0, 1, 1000)
    r.cancelled = Cancel.REVERSED
    assert idx.totals("POS00001", "000001") == BatchTotals()


def test_closed_batches():
    idx = TxnIndex()
    r = rec(batch="000001")
    idx.add(r)
    assert not idx.is_closed("POS00001", "000001")
    idx.close_batch("POS00001", "000001")
    assert idx.is_closed("POS00001", "000001")
    assert not idx.is_closed("POS00001", "000002")
    assert not idx.is_closed("POS00002", "000001")
    # Its rows leave the totals, but stay findable (a late reversal still finds its original).
    assert idx.totals("POS00001", "000001") == BatchTotals()
    assert idx.find("POS00001", r.stan, r.transmitted, "0200") is r


def test_mark_closed_adds_to_what_is_closed():
    idx = TxnIndex()
    idx.close_batch("POS00001", "000001")
    idx.mark_closed({("POS00002", "000007"), ("ATM00001", "000003")})
    assert idx.is_closed("POS00001", "000001")
    assert idx.is_closed("POS00002", "000007") and idx.is_closed("ATM00001", "000003")
    assert not idx.is_closed("POS00002", "000001")


# -- responses given (repeats) ---------------------------------------------------------------


def test_response_memory():
    idx = TxnIndex()
    assert idx.response_for(1) is None
    idx.remember_response(1, {"39": "00"})
    assert idx.response_for(1) == {"39": "00"}


def test_response_memory_is_bounded_oldest_out():
    idx = TxnIndex(max_responses=3)
    for i in range(1, 6):
        idx.remember_response(i, {"11": f"{i:06d}"})
    assert idx.response_for(1) is None and idx.response_for(2) is None
    assert [idx.response_for(i)["11"] for i in (3, 4, 5)] == ["000003", "000004", "000005"]
    assert len(idx._responses) == 3


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 20), st.lists(st.integers(1, 60), max_size=80))
def test_response_memory_never_exceeds_its_bound(bound, ids):
    idx = TxnIndex(max_responses=bound)
    for i in ids:
        idx.remember_response(i, {"id": str(i)})
    assert len(idx._responses) <= bound
    if ids:
        assert idx.response_for(ids[-1]) == {"id": str(ids[-1])}
