"""A simulated issuer's own record of a business day (settlement.md 5).

``export_day`` writes what the bank's books say about a business date D, the
file ``cardswitch reconcile`` compares with the switch's clearing. It reads
the bank's database directly; with WAL that works while the bank runs.

What the bank counts on D, from its own records (each request it processed,
with its business date from field 15, its effects and the original a void or
reversal named), counted as settlement.md 2 and docs/settlement.md do:

- An approved purchase, completion, withdrawal, bill payment, refund,
  deposit or transfer leg of D (a 0200, or a 0220 stand-in advice it
  posted) that moved money, unless a void or reversal of D undid it.
- An original of an earlier date undone on D (reversed, or voided) is not
  taken out of its own date: D lists it again as a ``reversal`` row with the
  negative amount. A void reversed on a later date than the void makes its
  purchase stand again: a positive ``reversal`` row on the reversal's date.
- Such a row is named by what the bank knows the change by: for a reversal,
  the request it reversed (RRN, STAN, processing code, approval code, card:
  the 0420 carries that request's RRN); for a void, the void itself.

The ``reversed``/``voided`` marks of the records say how things stand *now*;
a day's export never reads them. It replays the bank's undo records (voids
it approved, reversals that named a known original) of the dates up to D, in
the order they took effect, with the bank's own rules (ledger.py
``IssuerLogic._undo``): a reversal undoes an approved original once, and
nothing that is voided; reversing a void lets its purchase stand again. A
reversal that came before its original took effect when the original came.
Later dates' records are never read, so D's export is the same whenever it
is made.
"""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import NamedTuple

from cardswitch.iso8583.constants import RC
from cardswitch.issuer_sim.ledger import CLS_ADVICE, CLS_FIN, EXPORT_KINDS
from cardswitch.issuer_sim.store import db_path
from cardswitch.switch.records import Kind

HEADER = ("rrn", "amount", "auth_code", "stan", "pan_masked", "processing_code", "business_date", "kind")

# The ``kind`` of a row that changes an earlier date's transaction (as in the
# switch's clearing files, settlement.md 4).
REVERSAL_KIND = "reversal"

_COUNTED_KINDS = frozenset(EXPORT_KINDS)
_COUNTED_CLASSES = frozenset({CLS_FIN, CLS_ADVICE})
_UNDO_KINDS = (Kind.VOID, Kind.REVERSAL)
_CHUNK = 500   # ids per IN (...): under SQLite's variable limit


class ExportError(Exception):
    """The export cannot be made (no such bank database, bad date)."""


class Rec(NamedTuple):
    """What the export reads of one of the bank's request records."""

    id: int
    mti: str
    proc: str
    kind: str
    pan_masked: str
    amount: int
    rc: str
    auth_code: str
    rrn: str
    stan: str
    business_date: str
    orig_id: int | None
    moved: bool             # it has effects (an advice that could not be posted has none)

    @property
    def approved(self) -> bool:
        return self.rc == RC.APPROVED


_REC_COLS = ("id, mti, proc, kind, pan_masked, amount, response_code, auth_code, rrn, stan, "
             "business_date, orig_id, effects != '[]'")


def counts(r: Rec) -> bool:
    """An approved request that moved money of a kind the day's record lists."""
    return (r.approved and r.moved and r.amount > 0 and r.kind in _COUNTED_KINDS
            and r.mti[:3] in _COUNTED_CLASSES)


def is_undo(r: Rec) -> bool:
    """A void the bank approved, or a reversal that found its original."""
    return r.kind in _UNDO_KINDS and r.approved and r.orig_id is not None


# -- replaying the undo records (pure) ----------------------------------------------------

VOIDED = "voided"
REVERSED = "reversed"


@dataclass(slots=True)
class Replay:
    """Marks after applying undo records as the bank did. ``state``: record id
    -> VOIDED/REVERSED (absent: standing); ``changed_by``: record id -> the
    undo record that last changed it (or its purchase, for a void reversed)."""

    state: dict[int, str]
    changed_by: dict[int, Rec]

    def stands(self, r: Rec) -> bool:
        return counts(r) and r.id not in self.state


def took_effect(u: Rec, rows: Mapping[int, Rec]) -> tuple[str, int]:
    """(business date, order) at which an undo record took effect: when it
    came, or, for a reversal that came before its original, when the original
    came (the bank undid it then)."""
    target = rows.get(u.orig_id) if u.orig_id is not None else None
    if target is None or target.id < u.id:
        return u.business_date, u.id
    return max(u.business_date, target.business_date), target.id


def replay(rows: Mapping[int, Rec], undos: Iterable[Rec]) -> Replay:
    """Apply ``undos`` to ``rows`` (the records they name) in the order they took effect."""
    state: dict[int, str] = {}
    voided_by: dict[int, int] = {}
    changed_by: dict[int, Rec] = {}
    for u in sorted(undos, key=lambda u: (took_effect(u, rows)[1], u.id)):
        target = rows.get(u.orig_id) if u.orig_id is not None else None
        if target is None or not target.approved or target.id in state:
            continue            # unknown, declined, or reversed or voided already
        if u.kind == Kind.VOID:
            state[target.id] = VOIDED
            voided_by[target.id] = u.id
        else:
            state[target.id] = REVERSED
            if target.kind == Kind.VOID and target.orig_id is not None \
                    and voided_by.get(target.orig_id) == target.id:
                # the void is undone: its purchase stands again
                del state[target.orig_id], voided_by[target.orig_id]
                changed_by[target.orig_id] = u
        changed_by[target.id] = u
    return Replay(state, changed_by)


Row = tuple[str, int, str, str, str, str, str, str]   # HEADER order


def own_row(r: Rec) -> Row:
    return (r.rrn, r.amount, r.auth_code, r.stan, r.pan_masked, r.proc, r.business_date, r.kind)


def day_rows(business_date: str, originals: Iterable[Rec], rows: Mapping[int, Rec],
             undos: Iterable[Rec]) -> list[Row]:
    """The export of ``business_date``, sorted by RRN.

    ``originals``: the records of the date that may count (``counts``);
    ``rows``: every record an undo of the date touches, with the records
    those name in turn (a void's purchase); ``undos``: the undo records
    naming any of ``rows``, of the date and earlier (later ones are ignored).
    """
    d = business_date
    timed = [(took_effect(u, rows)[0], u) for u in undos]
    before = replay(rows, [u for when, u in timed if when < d])
    after = replay(rows, [u for when, u in timed if when <= d])
    out: list[tuple[tuple[str, int, int], Row]] = []
    for r in originals:
        if r.business_date == d and counts(r) and (r.id not in rows or after.stands(r)):
            out.append(((r.rrn, r.id, r.id), own_row(r)))
    for r in rows.values():
        if r.business_date >= d or not counts(r):
            continue
        was, now = before.stands(r), after.stands(r)
        by = after.changed_by.get(r.id)
        if was == now or by is None:
            continue
        ident = by if by.kind == Kind.VOID else rows.get(by.orig_id, r)
        amount = r.amount if now else -r.amount
        out.append(((ident.rrn, ident.id, r.id),
                    (ident.rrn, amount, ident.auth_code, ident.stan, ident.pan_masked, ident.proc, d,
                     REVERSAL_KIND)))
    out.sort(key=lambda kr: kr[0])
    return [row for _, row in out]


# -- reading the bank's database -------------------------------------------------------------


class _Reader:
    """The queries of one export, on one read transaction (one snapshot)."""

    def __init__(self, con: sqlite3.Connection, business_date: str) -> None:
        self.con = con
        self.business_date = business_date
        self.first = business_date            # undo records of first..business_date are loaded
        self.by_orig: dict[int, list[Rec]] = {}
        self._add_undos(business_date, business_date)

    def _fetch(self, sql: str, params: Iterable) -> list[Rec]:
        return [Rec(*r[:-1], bool(r[-1])) for r in self.con.execute(sql, tuple(params))]

    def originals(self) -> list[Rec]:
        kinds = sorted(_COUNTED_KINDS)
        return self._fetch(
            f"SELECT {_REC_COLS} FROM txns WHERE business_date = ? AND response_code = ? AND amount > 0 "
            f"AND kind IN ({', '.join('?' * len(kinds))}) ORDER BY rrn, id",
            (self.business_date, RC.APPROVED, *kinds))

    def undos_of_date(self) -> list[Rec]:
        return [u for us in self.by_orig.values() for u in us if u.business_date == self.business_date]

    def _add_undos(self, first: str, last: str) -> None:
        for u in self._fetch(f"SELECT {_REC_COLS} FROM txns WHERE business_date BETWEEN ? AND ? "
                             "AND kind IN (?, ?) AND orig_id IS NOT NULL", (first, last, *_UNDO_KINDS)):
            if is_undo(u):
                self.by_orig.setdefault(u.orig_id, []).append(u)

    def undos_naming(self, ids: Iterable[int], since: str) -> list[Rec]:
        """Undo records naming one of ``ids``, dated ``since`` up to the export's date."""
        if since < self.first:
            self._add_undos(since, (date.fromisoformat(self.first) - timedelta(days=1)).isoformat())
            self.first = since
        return [u for i in ids for u in self.by_orig.get(i, ())]

    def rows_by_ids(self, ids: Iterable[int]) -> list[Rec]:
        ids = sorted(ids)
        out: list[Rec] = []
        for i in range(0, len(ids), _CHUNK):
            part = ids[i:i + _CHUNK]
            out += self._fetch(f"SELECT {_REC_COLS} FROM txns WHERE id IN ({', '.join('?' * len(part))})",
                               part)
        return out


def _chain(reader: _Reader) -> tuple[dict[int, Rec], dict[int, Rec]]:
    """The records the date's undo records touch, and the undo records naming them."""
    d = reader.business_date
    today = reader.undos_of_date()
    rows: dict[int, Rec] = {}
    undos: dict[int, Rec] = {u.id: u for u in today}
    frontier = {u.orig_id for u in today}
    while frontier:
        found = reader.rows_by_ids(frontier)
        for r in found:
            rows[r.id] = r
        more = {r.orig_id for r in found if r.kind == Kind.VOID and r.orig_id is not None}
        since = min([r.business_date for r in found if r.business_date <= d], default=d)
        for u in reader.undos_naming(frontier, since):
            undos.setdefault(u.id, u)
            if u.kind == Kind.VOID:
                more.add(u.id)        # its reversals change its purchase
        frontier = more - rows.keys()
    return rows, undos


def read_day(con: sqlite3.Connection, business_date: str) -> list[Row]:
    """The rows of ``business_date`` from a bank database connection."""
    con.execute("BEGIN")          # one snapshot for every query
    try:
        reader = _Reader(con, business_date)
        rows, undos = _chain(reader)
        return day_rows(business_date, reader.originals(), rows, undos.values())
    finally:
        con.execute("COMMIT")


def export_day(data_dir: str | os.PathLike, bank_id: str, business_date: str,
               out_path: str | os.PathLike) -> int:
    """Write the bank's record of ``business_date`` (YYYY-MM-DD) to ``out_path``
    as CSV sorted by RRN (see the module's docstring); answer the number of rows."""
    try:
        date.fromisoformat(business_date)
    except ValueError:
        raise ExportError(f"business date {business_date!r} is not YYYY-MM-DD") from None
    path = db_path(data_dir, bank_id)
    if not path.is_file():
        raise ExportError(f"no records for bank {bank_id}: {path} does not exist")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        con.execute("PRAGMA busy_timeout=5000")
        rows = read_day(con, business_date)
    except sqlite3.Error as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    finally:
        con.close()
    out = Path(out_path)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="ascii") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        w.writerows(rows)
    os.replace(tmp, out)
    return len(rows)
