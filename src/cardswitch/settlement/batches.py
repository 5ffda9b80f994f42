"""Batch close exceptions for the operators' report (wire.md 6), pure.

A batch whose 0500 was answered 95 (totals differ) was uploaded (0320 per
transaction the terminal holds) and closed by a 960000 trailer. Each
difference between that upload and the switch's journal is listed:

- ``not in journal``: uploaded, but the switch has no such transaction
  (no row of that terminal and batch with that RRN, nor that STAN);
- ``not in switch totals``: uploaded, but the switch's row does not count in
  the batch totals (declined, timed out, reversed or voided);
- ``not uploaded``: counted in the switch's totals, missing from the upload;
- ``amount differs`` / ``processing code differs`` / ``auth code differs``.

Matching is by RRN, else by STAN (a terminal that never saw field 37).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cardswitch.iso8583.constants import RC
from cardswitch.switch.journal import UploadRow
from cardswitch.switch.records import CREDIT_KINDS, DEBIT_KINDS, Cancel, Status, TxnRecord

TOTAL_KINDS = DEBIT_KINDS | CREDIT_KINDS


@dataclass(slots=True, frozen=True)
class BatchException:
    terminal_id: str
    batch: str
    rrn: str
    stan: str
    problem: str
    terminal_value: str = ""
    switch_value: str = ""


def in_totals(rec: TxnRecord, cancelled: Mapping[int, str]) -> bool:
    """Counted in the switch's batch totals (wire.md 6), given the cancel marks."""
    return (rec.kind in TOTAL_KINDS and rec.status == Status.APPROVED
            and cancelled.get(rec.id, Cancel.NONE) == Cancel.NONE)


def batch_exceptions(terminal_id: str, batch: str, uploads: Iterable[UploadRow],
                     rows: Iterable[TxnRecord], cancelled: Mapping[int, str]) -> list[BatchException]:
    """Every difference between one batch's upload and the journal's rows of it.

    ``cancelled``: row id -> Cancel.* as of the settlement date (``counting.replay``),
    never the journal's marks, which a later date's reversal changes.
    """
    rows = [r for r in rows if r.kind in TOTAL_KINDS]
    by_rrn = {r.rrn: r for r in rows if r.rrn}
    by_stan = {r.stan: r for r in rows if r.stan}
    seen: set[int] = set()
    out: list[BatchException] = []

    def add(rrn: str, stan: str, problem: str, theirs: object = "", ours: object = "") -> None:
        out.append(BatchException(terminal_id, batch, rrn, stan, problem, str(theirs), str(ours)))

    for u in uploads:
        rec = by_rrn.get(u.rrn) if u.rrn else None
        if rec is None:
            rec = by_stan.get(u.stan)
        if rec is None:
            add(u.rrn, u.stan, "not in journal", u.amount, "")
            continue
        seen.add(rec.id)
        if not in_totals(rec, cancelled):
            why = cancelled.get(rec.id) or rec.status
            add(rec.rrn, rec.stan, "not in switch totals", u.amount, why)
            continue
        if u.amount != rec.amount:
            add(rec.rrn, rec.stan, "amount differs", u.amount, rec.amount)
        if u.proc and rec.proc and u.proc[:2] != rec.proc[:2]:
            add(rec.rrn, rec.stan, "processing code differs", u.proc, rec.proc)
        if u.auth_code and rec.auth_code and u.auth_code != rec.auth_code:
            add(rec.rrn, rec.stan, "auth code differs", u.auth_code, rec.auth_code)
    for rec in rows:
        if rec.id not in seen and in_totals(rec, cancelled):
            add(rec.rrn, rec.stan, "not uploaded", "", rec.amount)
    return out


@dataclass(slots=True, frozen=True)
class BatchCheck:
    """One batch of the date that needed an upload, and what differed."""

    terminal_id: str
    batch: str
    switch_totals: tuple[int, int, int, int]
    terminal_totals: tuple[int, int, int, int]
    exceptions: tuple[BatchException, ...]


def batches_to_check(closes: Iterable) -> list[tuple[str, str, tuple, tuple]]:
    """(terminal, batch, switch totals, terminal totals) of each batch answered 95
    on the date (the last such answer), in terminal, batch order."""
    found: dict[tuple[str, str], tuple] = {}
    for c in closes:
        if c.result == RC.RECONCILE_ERROR:
            found[(c.terminal_id, c.batch)] = (c.switch_totals, c.terminal_totals)
    return [(t, b, *found[(t, b)]) for (t, b) in sorted(found)]
