"""Which journal rows count on a business date, and as what (settlement.md 2).

Pure: no database, no files; rows come through an injected ``RowFetcher``
(a ``SettlementSource``).

The journal keeps one row per terminal request. A later void or reversal
sets ``cancelled``/``cancelled_by`` on its original, and a reversal of a
void even clears the void's mark on its purchase again; those marks only
ever say how things stand *now*. Settling a date must give the same files
whenever it is run, so counting never reads them: it replays the undo rows
(approved voids and reversals, linked by ``orig_id``) of the dates up to
the one being settled, in id order, as the switch applied them.

The rule that follows (docs/settlement.md):

- An approved purchase, completion, withdrawal, refund, deposit, bill
  payment or transfer received on date D counts on D unless it no longer
  stands at the end of D (voided or reversed by a request received on D).
- A transaction of an earlier date whose standing changes on D (undone by
  a void or reversal received on D; or standing again because its void was
  reversed on D) counts on D as a ``reversal`` entry: the exact negative
  (or, when standing again, the exact positive) of its own entry.
- Pre-authorizations, balance inquiries, voids and reversals never count
  themselves; declined, timed-out and pending rows never count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import NamedTuple

from cardswitch.iso8583.constants import TxnType
from cardswitch.pan import mask_pan
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord

# Transactions that move money when approved and standing.
COUNTED_KINDS = frozenset({Kind.PURCHASE, Kind.COMPLETION, Kind.WITHDRAWAL, Kind.REFUND,
                           Kind.DEPOSIT, Kind.BILL_PAYMENT, Kind.TRANSFER})
# Requests that undo an earlier one (found by ``orig_id``).
UNDO_KINDS = frozenset({Kind.VOID, Kind.REVERSAL})
# Merchant sales (settlement.md 4: purchase_* columns) and refunds.
SALE_KINDS = frozenset({Kind.PURCHASE, Kind.COMPLETION, Kind.BILL_PAYMENT})


class ClearingKind:
    """The ``kind`` column of clearing files (settlement.md 4)."""

    PURCHASE = "purchase"
    COMPLETION = "completion"
    BILL_PAYMENT = "bill_payment"
    WITHDRAWAL = "withdrawal"
    REFUND = "refund"
    DEPOSIT = "deposit"
    TRANSFER_OUT = "transfer_out"
    TRANSFER_IN = "transfer_in"
    REVERSAL = "reversal"


ALL_CLEARING_KINDS = (ClearingKind.PURCHASE, ClearingKind.COMPLETION, ClearingKind.BILL_PAYMENT,
                      ClearingKind.WITHDRAWAL, ClearingKind.REFUND, ClearingKind.DEPOSIT,
                      ClearingKind.TRANSFER_OUT, ClearingKind.TRANSFER_IN, ClearingKind.REVERSAL)

_OWN_KIND = {
    Kind.PURCHASE: ClearingKind.PURCHASE,
    Kind.COMPLETION: ClearingKind.COMPLETION,
    Kind.BILL_PAYMENT: ClearingKind.BILL_PAYMENT,
    Kind.WITHDRAWAL: ClearingKind.WITHDRAWAL,
    Kind.REFUND: ClearingKind.REFUND,
    Kind.DEPOSIT: ClearingKind.DEPOSIT,
}


def is_counted_kind(rec: TxnRecord) -> bool:
    """Approved, of a kind that moves money, with money to move."""
    return rec.kind in COUNTED_KINDS and rec.status == Status.APPROVED and rec.amount > 0


def is_undo(rec: TxnRecord) -> bool:
    """An approved void or reversal naming its original."""
    return rec.kind in UNDO_KINDS and rec.status == Status.APPROVED and rec.orig_id is not None


# -- replaying cancellations -------------------------------------------------------


@dataclass(slots=True)
class Replay:
    """Cancel marks after applying undo rows in id order, as the switch did.

    ``state``: row id -> Cancel.* (absent = NONE); ``changed_by``: row id ->
    the undo row that last changed that row's mark (or its purchase's, for a
    void being reversed).
    """

    state: dict[int, str]
    changed_by: dict[int, TxnRecord]

    def stands(self, rec: TxnRecord) -> bool:
        return is_counted_kind(rec) and self.state.get(rec.id, Cancel.NONE) == Cancel.NONE


def replay(rows: Mapping[int, TxnRecord], undos: Iterable[TxnRecord]) -> Replay:
    """Apply ``undos`` (approved voids/reversals) to ``rows`` (their targets).

    Mirrors ``Pipeline.respond``/``Pipeline.reverse``: a void marks its
    purchase voided; a reversal marks its original reversed unless it is
    already cancelled or never approved; reversing a void lets its purchase
    stand again. A timed-out row starts reversed: the switch reversed it at
    the timeout, so a later terminal reversal of it changes nothing.
    """
    state: dict[int, str] = {}
    voided_by: dict[int, int] = {}
    changed_by: dict[int, TxnRecord] = {}
    for r in rows.values():
        if r.status == Status.TIMEOUT:
            state[r.id] = Cancel.REVERSED
    for u in sorted(undos, key=_by_id):
        target = rows.get(u.orig_id) if u.orig_id is not None else None
        if target is None:
            continue
        if u.kind == Kind.VOID:
            if state.get(target.id, Cancel.NONE) == Cancel.NONE:
                state[target.id] = Cancel.VOIDED
                voided_by[target.id] = u.id
                changed_by[target.id] = u
            continue
        # a reversal
        if state.get(target.id, Cancel.NONE) != Cancel.NONE or target.status != Status.APPROVED:
            continue
        state[target.id] = Cancel.REVERSED
        changed_by[target.id] = u
        if target.kind == Kind.VOID and target.orig_id is not None \
                and voided_by.get(target.orig_id) == target.id:
            state.pop(target.orig_id, None)
            del voided_by[target.orig_id]
            changed_by[target.orig_id] = u
    return Replay(state, changed_by)


def _by_id(r: TxnRecord) -> int:
    return r.id


# -- one business date ----------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One counted transaction on the settlement date.

    ``orig`` is the transaction whose money moves; ``sign`` +1 counts it,
    -1 takes it back. ``ident`` is the row that names the entry in clearing
    files: ``orig`` itself for its own date; for a ``reversal`` entry the
    request the issuer knows the change by (the void, or the row a reversal
    undid). ``carried``: a change on this date of an earlier date's
    transaction (clearing kind ``reversal``).
    """

    sign: int
    orig: TxnRecord
    ident: TxnRecord
    business_date: str
    carried: bool = False

    @property
    def sort_key(self) -> tuple[str, int, int]:
        return (self.ident.rrn, self.ident.id, self.orig.id)


@dataclass(slots=True)
class DayChanges:
    """What the undo rows of one date do: which originals of that date still
    stand, and the ``reversal`` entries for earlier dates' transactions."""

    business_date: str
    after: Replay
    carried: list[Entry]

    def stands(self, rec: TxnRecord) -> bool:
        """Does ``rec``, an original received on this date, count on it?"""
        return self.after.stands(rec)


class RowFetcher:
    """What ``day_changes`` reads (a ``SettlementSource`` provides it)."""

    def undo_rows_between(self, first: str, last: str) -> list[TxnRecord]:  # pragma: no cover - protocol
        """Approved voids and reversals naming an original, dated first..last (inclusive), by id."""
        raise NotImplementedError

    def rows_by_ids(self, ids: Iterable[int]) -> list[TxnRecord]:  # pragma: no cover - protocol
        raise NotImplementedError


class UndoIndex:
    """The undo rows of the dates from some day up to the settlement date,
    by the id they name; earlier dates are read when first needed (an undo
    is never dated before what it undoes), each date once."""

    def __init__(self, fetch: RowFetcher, business_date: str) -> None:
        self.fetch = fetch
        self.business_date = business_date
        self.first = business_date               # dates first..business_date are loaded
        self.by_orig: dict[int, list[TxnRecord]] = {}
        self._add(fetch.undo_rows_between(business_date, business_date))

    def _add(self, rows: Iterable[TxnRecord]) -> None:
        for u in rows:
            if is_undo(u) and u.business_date <= self.business_date:
                self.by_orig.setdefault(u.orig_id, []).append(u)

    def on_date(self) -> list[TxnRecord]:
        return sorted((u for us in self.by_orig.values() for u in us
                       if u.business_date == self.business_date), key=_by_id)

    def naming(self, ids: Iterable[int], since: str) -> list[TxnRecord]:
        """Undo rows naming one of ``ids``, all of them dated ``since`` or later."""
        if since < self.first:
            last = (date.fromisoformat(self.first) - timedelta(days=1)).isoformat()
            self._add(self.fetch.undo_rows_between(since, last))
            self.first = since
        out = [u for i in ids for u in self.by_orig.get(i, ())]
        out.sort(key=_by_id)
        return out


def day_changes(business_date: str, fetch: RowFetcher, undo: UndoIndex | None = None) -> DayChanges:
    """Replay the undo rows that touch anything undone on ``business_date``.

    Only rows of dates up to ``business_date`` are read: a later date's
    reversal can never change what an earlier date settled.
    """
    undo = undo if undo is not None else UndoIndex(fetch, business_date)
    today = undo.on_date()
    rows: dict[int, TxnRecord] = {}
    undos: dict[int, TxnRecord] = {u.id: u for u in today}
    frontier = {u.orig_id for u in today if u.orig_id is not None}
    while frontier:
        found = fetch.rows_by_ids(sorted(frontier))
        for r in found:
            rows[r.id] = r
        more: set[int] = set()
        for r in found:
            # reversing a void changes its purchase: the purchase is in the chain
            if r.kind == Kind.VOID and r.orig_id is not None:
                more.add(r.orig_id)
        since = min((r.business_date for r in found), default=business_date)
        for u in undo.naming(frontier, min(since, business_date)):
            undos.setdefault(u.id, u)
            if u.kind == Kind.VOID:
                more.add(u.id)       # its own reversals change its purchase
        frontier = more - rows.keys()
    return changes_from(business_date, rows, undos.values())


def changes_from(business_date: str, rows: Mapping[int, TxnRecord],
                 undos: Iterable[TxnRecord]) -> DayChanges:
    """``DayChanges`` from the chain rows and their undo rows (all dated <= the date)."""
    undos = [u for u in undos if u.business_date <= business_date]
    before = replay(rows, [u for u in undos if u.business_date < business_date])
    after = replay(rows, undos)
    carried: list[Entry] = []
    for rec in rows.values():
        if rec.business_date >= business_date or not is_counted_kind(rec):
            continue
        was, now = before.stands(rec), after.stands(rec)
        if was == now:
            continue
        by = after.changed_by.get(rec.id)
        if by is None:   # cannot happen: a change on this date has an undo row of this date
            continue
        carried.append(Entry(sign=1 if now else -1, orig=rec, ident=_ident(by, rows, rec),
                             business_date=business_date, carried=True))
    carried.sort(key=lambda e: e.sort_key)
    return DayChanges(business_date, after, carried)


def _ident(by: TxnRecord, rows: Mapping[int, TxnRecord], orig: TxnRecord) -> TxnRecord:
    """The request the issuer knows a change by: a void by itself; a reversal
    by the row it reversed (its 0420 carries that row's RRN and field 90)."""
    if by.kind == Kind.VOID:
        return by
    target = rows.get(by.orig_id) if by.orig_id is not None else None
    return target if target is not None else orig


# -- clearing rows ----------------------------------------------------------------------

CLEARING_COLUMNS = ("rrn", "stan", "terminal_id", "merchant_id", "pan_masked", "processing_code",
                    "amount", "currency", "auth_code", "transmitted_at", "business_date", "kind")


class ClearingRow(NamedTuple):
    issuer_id: str       # whose clearing file it goes to
    leg: str             # "out"/"in" for transfers, else ""
    rrn: str
    stan: str
    terminal_id: str
    merchant_id: str
    pan_masked: str
    processing_code: str
    amount: int          # signed: negative for a transaction taken back
    currency: str
    auth_code: str
    transmitted_at: str  # field 7 as the terminal sent it (MMDDhhmmss, UTC)
    business_date: str
    kind: str

    def values(self) -> tuple:
        """The CSV row, in ``CLEARING_COLUMNS`` order."""
        return self[2:]


def masked(value: str) -> str:
    """A masked PAN as settlement.md 4 wants it; masks a clear PAN defensively."""
    if value and "*" not in value and value.isdigit():
        return mask_pan(value)
    return value


def is_on_us_transfer(rec: TxnRecord) -> bool:
    return rec.kind == Kind.TRANSFER and (not rec.to_issuer_id or rec.to_issuer_id == rec.issuer_id)


def clearing_rows(e: Entry) -> list[ClearingRow]:
    """The clearing rows of one entry: one, or two for a transfer (both legs,
    in the same file when one bank issued both cards)."""
    o, x = e.orig, e.ident
    amount = e.sign * o.amount
    if o.kind != Kind.TRANSFER:
        kind = ClearingKind.REVERSAL if e.carried else _OWN_KIND[o.kind]
        return [ClearingRow(o.issuer_id, "", x.rrn, x.stan, x.terminal_id, o.merchant_id, masked(x.pan_masked),
                            x.proc, amount, o.currency, x.auth_code, x.transmitted, e.business_date, kind)]
    out_kind = ClearingKind.REVERSAL if e.carried else ClearingKind.TRANSFER_OUT
    in_kind = ClearingKind.REVERSAL if e.carried else ClearingKind.TRANSFER_IN
    on_us = is_on_us_transfer(o)
    receiver = o.issuer_id if on_us else o.to_issuer_id
    # The receiving issuer saw the credit leg (0200 28xxxx) with its own approval
    # code; on us, the one 40xxxx request did both.
    in_proc = x.proc if on_us or len(x.proc) != 6 else TxnType.TRANSFER_CREDIT.value + x.proc[2:]
    in_auth = x.auth_code if on_us else x.to_auth_code
    return [
        ClearingRow(o.issuer_id, "out", x.rrn, x.stan, x.terminal_id, o.merchant_id, masked(x.pan_masked),
                    x.proc, amount, o.currency, x.auth_code, x.transmitted, e.business_date, out_kind),
        ClearingRow(receiver, "in", x.rrn, x.stan, x.terminal_id, o.merchant_id,
                    masked(x.to_pan_masked or o.to_pan_masked), in_proc, amount, o.currency, in_auth,
                    x.transmitted, e.business_date, in_kind),
    ]


def merge_entries(own: Iterable[Entry], carried: list[Entry]) -> Iterator[Entry]:
    """Both sorted by ``Entry.sort_key``: one stream in that order."""
    if not carried:
        yield from own
        return
    own = iter(own)
    i, n = 0, len(carried)
    nxt = carried[0].sort_key
    for e in own:
        key = e.sort_key
        while nxt <= key:
            yield carried[i]
            i += 1
            if i == n:
                yield e
                yield from own
                return
            nxt = carried[i].sort_key
        yield e
    yield from carried[i:]


def entries(originals: Iterable[TxnRecord], changes: DayChanges,
            keep: Callable[[TxnRecord], bool] | None = None) -> Iterator[Entry]:
    """Every entry of the date: the originals (in (rrn, id) order) that stand,
    merged with the carried entries, in clearing order."""
    bdate = changes.business_date
    touched = changes.after.state

    def own() -> Iterator[Entry]:
        for r in originals:
            if r.business_date != bdate or r.amount <= 0 or r.status != Status.APPROVED \
                    or r.kind not in COUNTED_KINDS or (r.id in touched and not changes.stands(r)):
                continue
            yield Entry(1, r, r, bdate)

    carried = changes.carried if keep is None else [e for e in changes.carried if keep(e.orig)]
    return merge_entries(own(), carried)
