"""The store-and-forward queue without sockets: order, window, backoff, age,
what an answer means, the advices it builds and the sealed PAN."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.iso8583.constants import MTI, RC, F
from cardswitch.iso8583.fields import parse_field90
from cardswitch.switch import saf
from cardswitch.switch.records import Kind, Status, TxnRecord
from cardswitch.switch.saf import (
    DELIVERED,
    NOT_SENT,
    PARKED,
    RETRY,
    SafEntry,
    SafPolicy,
    SafQueue,
)

T0 = 1_800_000_000.0          # a fixed "now" (POSIX seconds)


def entry(i: int, bank: str = "BANKA", kind: str = saf.REVERSAL, created: float = T0, **kw) -> SafEntry:
    base = dict(id=i, bank_id=bank, kind=kind, txn_id=100 + i, leg=saf.DEBIT_LEG,
                mti=MTI.REVERSAL_ADVICE if kind == saf.REVERSAL else MTI.FIN_ADVICE, proc="000000",
                amount=1000 + i, currency="156", orig_mti="0200", orig_stan=f"{i:06d}",
                orig_transmitted="0314101500", stan=f"{900000 + i:06d}", transmitted="0314101600",
                rrn=f"6073{i:08d}", terminal_id="POS00001", merchant_id="898440158120001",
                acquirer_inst="10000001", business_date="2026-03-14", created_at=saf.utc_iso(created))
    base.update(kw)
    return SafEntry(**base)


def record(**kw) -> TxnRecord:
    base = dict(id=7, business_date="2026-03-14", received_at="2026-03-14T10:15:00.000000Z", mti="0200",
                proc="003000", kind=Kind.PURCHASE, amount=2500, currency="156", terminal_id="POS00001",
                merchant_id="898440158120001", stan="000011", transmitted="0314101500", batch="000001",
                acquirer_id="BANKA", issuer_id="BANKB", rrn="607300000042", status=Status.APPROVED,
                issuer_stan="000123", issuer_transmitted="0314101501")
    base.update(kw)
    return TxnRecord(**base)


# -- policy ------------------------------------------------------------------------------------


def test_backoff_doubles_from_one_second_to_a_minute():
    p = SafPolicy()
    assert [p.delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


@given(st.integers(min_value=1, max_value=200))
def test_backoff_is_monotone_and_bounded(n):
    p = SafPolicy(initial_s=0.5, max_s=30, factor=3)
    assert p.initial_s <= p.delay(n) <= p.max_s
    assert p.delay(n) <= p.delay(n + 1)


@pytest.mark.parametrize("kw", [dict(initial_s=0), dict(max_s=0.5), dict(factor=0.5), dict(window=0),
                                dict(max_age_s=0)])
def test_bad_policy_is_refused(kw):
    with pytest.raises(ValueError):
        SafPolicy(**kw)


@pytest.mark.parametrize("kind, rc, outcome", [
    (saf.REVERSAL, RC.APPROVED, DELIVERED),
    (saf.STAND_IN, RC.APPROVED, DELIVERED),
    (saf.REVERSAL, RC.ORIGINAL_NOT_FOUND, DELIVERED),     # nothing to undo there
    (saf.STAND_IN, RC.ORIGINAL_NOT_FOUND, RETRY),
    (saf.REVERSAL, RC.DUPLICATE, DELIVERED),
    (saf.REVERSAL, RC.FORMAT_ERROR, PARKED),              # the same message never passes
    (saf.STAND_IN, RC.INVALID_TRANSACTION, PARKED),
    (saf.REVERSAL, RC.SYSTEM_MALFUNCTION, RETRY),
    (saf.REVERSAL, RC.ISSUER_INOPERATIVE, RETRY),
    (saf.REVERSAL, RC.SECURITY_VIOLATION, RETRY),
    (saf.REVERSAL, "", RETRY),
])
def test_what_an_answer_means(kind, rc, outcome):
    assert saf.outcome_of(entry(1, kind=kind), rc) == outcome


# -- the queue ---------------------------------------------------------------------------------


def test_due_is_oldest_first_within_the_window_per_bank():
    q = SafQueue(SafPolicy(window=3))
    for i in (5, 1, 4, 2, 3):                 # loaded out of order
        q.add(entry(i))
    q.add(entry(6, bank="BANKB"))
    assert [e.id for e in q.due("BANKA", T0)] == [1, 2, 3]
    assert [e.id for e in q.due("BANKB", T0)] == [6]
    assert q.due("BANKC", T0) == []
    assert q.depth() == {"BANKA": 5, "BANKB": 1} and len(q) == 6


def test_in_flight_counts_against_the_window():
    q = SafQueue(SafPolicy(window=2))
    for i in range(1, 5):
        q.add(entry(i))
    first = q.due("BANKA", T0)
    q.begin(first[0])
    assert [e.id for e in q.due("BANKA", T0)] == [2]       # one slot left, 1 is in flight
    q.begin(first[1])
    assert q.due("BANKA", T0) == [] and q.in_flight("BANKA") == 2
    q.done(first[0], DELIVERED, T0)
    assert [e.id for e in q.due("BANKA", T0)] == [3]


def test_delivered_leaves_the_queue():
    q = SafQueue()
    e = entry(1)
    q.add(e)
    q.begin(e)
    q.done(e, DELIVERED, T0)
    assert e.state == saf.DELIVERED and len(q) == 0 and q.due("BANKA", T0) == []


def test_failed_rounds_back_off_the_whole_bank_and_keep_order():
    q = SafQueue(SafPolicy(window=2))
    a, b, c = entry(1), entry(2), entry(3)
    for e in (a, b, c):
        q.add(e)
    now = T0
    batch = q.due("BANKA", now)
    for e in batch:
        q.begin(e)
    q.done(a, RETRY, now + 0.1, "timeout")
    q.done(b, RETRY, now + 0.2, "timeout")       # the same round: one failure, not two
    assert q.failures("BANKA") == 1 and q.retry_at("BANKA") == pytest.approx(now + 1.1)
    assert q.due("BANKA", now + 1.0) == []
    again = q.due("BANKA", now + 1.2)
    assert [e.id for e in again] == [1, 2]       # from the oldest again
    for e in again:
        q.begin(e)
    q.done(a, RETRY, now + 1.3)
    q.done(b, RETRY, now + 1.3)
    assert q.retry_at("BANKA") == pytest.approx(now + 3.3)      # 2 s
    again = q.due("BANKA", now + 3.3)
    for e in again:
        q.begin(e)
    q.done(a, DELIVERED, now + 3.4)
    q.done(b, DELIVERED, now + 3.4)
    assert q.failures("BANKA") == 0 and [e.id for e in q.due("BANKA", now + 3.4)] == [3]


def test_attempts_make_the_repeat_mti_and_not_sent_does_not_count():
    q = SafQueue()
    e = entry(1)
    q.add(e)
    assert saf.advice_message(e, switch_inst="99900001", issuer_inst="10000001")[F.MTI] == "0420"
    q.begin(e)
    q.done(e, NOT_SENT, T0, "link down")
    assert e.attempts == 0
    assert saf.advice_message(e, switch_inst="99900001", issuer_inst="10000001")[F.MTI] == "0420"
    q.begin(e)
    q.done(e, RETRY, T0 + 5)
    assert e.attempts == 1
    msg = saf.advice_message(e, switch_inst="99900001", issuer_inst="10000001")
    assert msg[F.MTI] == "0421" and msg[F.STAN] == e.stan          # a repeat keeps its STAN
    s = entry(2, kind=saf.STAND_IN, attempts=3, auth_code="S00002")
    assert saf.advice_message(s, switch_inst="9", issuer_inst="1", pan="6221260000000018")[F.MTI] == "0221"


def test_entries_older_than_the_maximum_age_are_parked():
    q = SafQueue(SafPolicy(max_age_s=3600))
    old, young, busy = entry(1, created=T0 - 3601), entry(2, created=T0 - 10), entry(3, created=T0 - 7200)
    for e in (old, young, busy):
        q.add(e)
    q.begin(busy)                                # in flight: its answer decides
    expired = q.expire(T0)
    assert expired == [old] and old.state == saf.PARKED and "3600" in old.last_error
    assert [e.id for e in q.entries("BANKA")] == [2, 3]


def test_find_and_settle_a_late_answer():
    q = SafQueue()
    e = entry(1)
    q.add(e)
    assert q.find("BANKA", e.stan, e.rrn) is e
    assert q.find("BANKA", e.stan, "other") is None and q.find("BANKB", e.stan, e.rrn) is None
    q.settle(e)
    assert e.state == saf.DELIVERED and len(q) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["BANKA", "BANKB"]), st.sampled_from([DELIVERED, RETRY])),
                min_size=1, max_size=30),
       st.integers(min_value=1, max_value=4))
def test_every_bank_sees_its_advices_first_sent_in_queue_order(plan, window):
    """Whatever fails and whatever the window, each bank's first sends follow the queue order."""
    q = SafQueue(SafPolicy(window=window, initial_s=1, max_s=4))
    entries = [entry(i + 1, bank=b) for i, (b, _) in enumerate(plan)]
    results = {e.id: r for e, (_, r) in zip(entries, plan)}
    for e in entries:
        q.add(e)
    first_sent: dict[str, list[int]] = {"BANKA": [], "BANKB": []}
    now = T0
    for _ in range(500):
        if not len(q):
            break
        for bank in ("BANKA", "BANKB"):
            for e in q.due(bank, now):
                if e.attempts == 0:
                    first_sent[bank].append(e.id)
                q.begin(e)
                outcome = results[e.id]
                if outcome == RETRY:
                    results[e.id] = DELIVERED           # fails once, then gets through
                q.done(e, outcome, now)
        now += 1
    assert len(q) == 0
    for bank, ids in first_sent.items():
        assert ids == sorted(ids) == [e.id for e in entries if e.bank_id == bank]


# -- entries and messages ----------------------------------------------------------------------


def test_reversal_entry_names_the_issuer_side_original():
    rec = record()
    e = saf.reversal_entry(rec, entry_id=3, leg=saf.DEBIT_LEG, stan="000500", transmitted="0314102000",
                           acquirer_inst="10000001", business_date="2026-03-14",
                           created_at="2026-03-14T10:20:00.000000Z")
    assert (e.bank_id, e.orig_mti, e.orig_stan, e.orig_transmitted) == ("BANKB", "0200", "000123", "0314101501")
    msg = saf.advice_message(e, switch_inst="99900001", issuer_inst="10000002")
    assert msg[F.MTI] == "0420" and F.PAN not in msg and msg[F.RRN] == rec.rrn
    od = parse_field90(msg[F.ORIGINAL_DATA])
    assert (od.mti, od.stan, od.transmitted) == ("0200", "000123", "0314101501")
    assert msg[F.AMOUNT] == "000000002500" and msg[F.PROC] == "003000" and msg[F.RECEIVING_ID] == "10000002"


def test_reversal_of_a_stand_in_names_its_0220_and_credit_leg_its_0200_28():
    stood = record(stand_in=True, issuer_stan="000777", issuer_transmitted="0314101700")
    e = saf.reversal_entry(stood, entry_id=1, leg=saf.DEBIT_LEG, stan="1", transmitted="0314101800",
                           acquirer_inst="1", business_date="2026-03-14", created_at="")
    assert (e.orig_mti, e.orig_stan) == ("0220", "000777")
    xfer = record(proc="401000", kind=Kind.TRANSFER, issuer_id="BANKA", to_issuer_id="BANKB",
                  to_issuer_stan="000321", to_issuer_transmitted="0314101502")
    c = saf.reversal_entry(xfer, entry_id=2, leg=saf.CREDIT_LEG, stan="2", transmitted="0314101800",
                           acquirer_inst="1", business_date="2026-03-14", created_at="")
    assert (c.bank_id, c.orig_mti, c.orig_stan, c.proc) == ("BANKB", "0200", "000321", "281000")
    adv = saf.stand_in_entry(stood, entry_id=9, pan_sealed="x", acquirer_inst="1", created_at="")
    rev = saf.reversal_of_advice(adv, entry_id=10, stan="000900", transmitted="0314101900",
                                 business_date="2026-03-14", created_at="")
    assert (rev.kind, rev.orig_mti, rev.orig_stan, rev.orig_transmitted, rev.bank_id) == \
        (saf.REVERSAL, "0220", "000777", "0314101700", "BANKB")


def test_stand_in_advice_carries_the_pan_and_the_switch_auth_code():
    rec = record(stand_in=True, auth_code="S00007", issuer_stan="000777", issuer_transmitted="0314101700")
    e = saf.stand_in_entry(rec, entry_id=4, pan_sealed="sealed", acquirer_inst="10000001",
                           created_at="2026-03-14T10:17:00.000000Z")
    msg = saf.advice_message(e, switch_inst="99900001", issuer_inst="10000002", pan="6228480000000015")
    assert msg[F.MTI] == "0220" and msg[F.PAN] == "6228480000000015" and msg[F.AUTH_CODE] == "S00007"
    assert (msg[F.STAN], msg[F.TRANSMISSION_DT], msg[F.RRN]) == ("000777", "0314101700", rec.rrn)
    assert msg[F.SETTLEMENT_DATE] == "0314" and F.ORIGINAL_DATA not in msg


def test_pan_is_sealed_never_clear():
    key = saf.pan_key(b"switch token secret")
    sealed = saf.seal_pan("6221260000000018", key, "607300000001")
    assert "6221260000000018" not in sealed and sealed != saf.seal_pan("6221260000000018", key, "607300000001")
    assert saf.open_pan(sealed, key, "607300000001") == "6221260000000018"
    with pytest.raises(ValueError):
        saf.open_pan(sealed, key, "607300000002")             # bound to its RRN
    with pytest.raises(ValueError):
        saf.open_pan(sealed, saf.pan_key(b"another switch"), "607300000001")


def test_created_ts_reads_the_iso_time():
    e = entry(1, created=T0 + 0.25)
    assert e.created_ts == pytest.approx(T0 + 0.25)
    assert entry(2, created_at="not a time").created_ts == 0.0
    assert "6221" not in e.describe()
