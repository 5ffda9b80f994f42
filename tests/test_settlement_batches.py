"""Batch close exceptions (wire.md 6) for the report: each difference between
a terminal's 0320 upload and the journal, as of the settlement date."""

from __future__ import annotations

from cardswitch.settlement.batches import batch_exceptions, batches_to_check
from cardswitch.settlement.counting import replay
from cardswitch.settlement.source import BatchCloseRow
from cardswitch.switch.journal import UploadRow
from cardswitch.switch.records import Kind, Status
from test_settlement_support import D1, D2, Rows


def upload(rec, **kw) -> UploadRow:
    u = UploadRow(rec.rrn, rec.stan, rec.proc, rec.amount, rec.auth_code, rec.pan_masked)
    for k, v in kw.items():
        setattr(u, k, v)
    return u


def test_each_difference_listed():
    r = Rows()
    same = r.add(Kind.PURCHASE, 1000)
    other_amount = r.add(Kind.PURCHASE, 2000)
    declined = r.add(Kind.PURCHASE, 3000, status=Status.DECLINED)
    voided = r.add(Kind.PURCHASE, 4000)
    r.undo(Kind.VOID, voided)
    missing = r.add(Kind.REFUND, 500)
    no_rrn = r.add(Kind.PURCHASE, 600)
    later = r.add(Kind.PURCHASE, 700)
    r.undo(Kind.REVERSAL, later, date=D2)        # after the settlement date: still in the totals
    rows = [x for x in r.all if x.business_date <= D1]
    marks = replay({x.id: x for x in rows}, [x for x in rows if x.kind in (Kind.VOID, Kind.REVERSAL)]).state
    ups = [upload(same), upload(other_amount, amount=2100, auth_code="ZZZ999"), upload(declined),
           upload(voided), upload(no_rrn, rrn=""), upload(later),
           UploadRow("699999999999", "999999", "000000", 50, "", "")]
    got = [(x.rrn, x.problem, x.terminal_value, x.switch_value)
           for x in batch_exceptions("POS00001", "000001", ups, rows, marks)]
    assert got == [
        (other_amount.rrn, "amount differs", "2100", "2000"),
        (other_amount.rrn, "auth code differs", "ZZZ999", other_amount.auth_code),
        (declined.rrn, "not in switch totals", "3000", "declined"),
        (voided.rrn, "not in switch totals", "4000", "voided"),
        ("699999999999", "not in journal", "50", ""),
        (missing.rrn, "not uploaded", "", "500"),
    ]


def test_only_batches_answered_95_are_checked():
    closes = [BatchCloseRow("T2", "000001", "95", (0, 0, 1, 1), (0, 0, 1, 2)),
              BatchCloseRow("T1", "000003", "00", (0, 0, 0, 0), (0, 0, 0, 0)),
              BatchCloseRow("T2", "000001", "00", (0, 0, 1, 1), (0, 0, 1, 2)),
              BatchCloseRow("T1", "000002", "95", (1, 1, 0, 0), (0, 0, 0, 0))]
    assert [(t, b) for t, b, *_ in batches_to_check(closes)] == [("T1", "000002"), ("T2", "000001")]
