"""Where settlement reads the journal from: one small interface, one SQLite
implementation (a PostgreSQL journal plugs in by implementing the same
methods; ``open_source`` picks by the journal URL).

Settlement reads while the switch runs: the SQLite source opens its own
read-only connection (``query_only``) next to the switch's writer and holds
one read transaction for its whole life, so every query of a run sees the
same snapshot of the journal. Rows are streamed through a cursor, never
fetched all at once.
"""

from __future__ import annotations

import os
import sqlite3
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from cardswitch.config import Network
from cardswitch.settlement.counting import COUNTED_KINDS, UNDO_KINDS
from cardswitch.switch import journal_schema as schema
from cardswitch.switch.cutover import STATE_BUSINESS_DATE
from cardswitch.switch.journal import JournalError, UploadRow, sqlite_path
from cardswitch.switch.records import Status, TxnRecord

_ALL_COLUMNS = schema.TXN_SELECT  # "SELECT <every TxnRecord field> FROM txn"
_BOOL_AT = tuple(schema.TXN_FIELDS.index(f) for f in schema.BOOL_FIELDS)


class SourceError(Exception):
    """The journal cannot be read for settlement; the message says why."""


@dataclass(slots=True, frozen=True)
class MixRow:
    """Requests of a date by kind, status and response code."""

    kind: str
    status: str
    response_code: str
    count: int
    amount: int


@dataclass(slots=True, frozen=True)
class BatchCloseRow:
    terminal_id: str
    batch: str
    result: str
    switch_totals: tuple[int, int, int, int]    # credits n, credits amount, debits n, debits amount
    terminal_totals: tuple[int, int, int, int]


class SettlementSource(Protocol):
    """What settlement reads from a journal, whatever the database."""

    def current_business_date(self) -> str | None: ...

    def count_pending(self, business_date: str) -> int: ...

    def iter_candidates(self, business_date: str, issuer: str | None = None) -> Iterator[TxnRecord]:
        """Approved rows of counted kinds received on the date, in (rrn, id) order;
        with ``issuer``, only those whose card or transfer target it issued.
        Only ``CANDIDATE_FIELDS`` need be filled in."""
        ...

    def undo_rows_between(self, first: str, last: str) -> list[TxnRecord]:
        """Approved voids and reversals naming an original, dated first..last, by id."""
        ...

    def rows_by_ids(self, ids: Iterable[int]) -> list[TxnRecord]: ...

    def count_requests(self, business_date: str) -> int: ...

    def request_mix(self, business_date: str) -> list[MixRow]: ...

    def batch_closes_on(self, business_date: str) -> list[BatchCloseRow]: ...

    def uploads(self, terminal_id: str, batch: str) -> list[UploadRow]: ...

    def batch_rows(self, terminal_id: str, batch: str) -> list[TxnRecord]: ...

    def close(self) -> None: ...


def iter_rows(source: SettlementSource, business_date: str, issuer: str | None = None) -> Iterator[TxnRecord]:
    """The rows that may count on ``business_date``, streamed (see ``iter_candidates``)."""
    return source.iter_candidates(business_date, issuer)


def open_source(network: Network) -> SettlementSource:
    url = network.switch.journal
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("postgresql", "postgres"):
        try:
            from cardswitch.switch.journal_pg import PgSettlementSource
        except ImportError as e:
            raise SourceError(f"cannot read a PostgreSQL journal here: {e}") from None
        return PgSettlementSource(url)
    try:
        path = sqlite_path(url, network.switch.data_dir)
    except JournalError as e:
        raise SourceError(str(e)) from None
    return SqliteSource(path)


_BOOL_NAMES = tuple(schema.TXN_FIELDS[i] for i in _BOOL_AT)


def _record(row: tuple) -> TxnRecord:
    rec = TxnRecord(*row)
    for name in _BOOL_NAMES:
        setattr(rec, name, bool(getattr(rec, name)))
    return rec


# What settlement reads of a candidate row (counting, pricing, clearing). The
# candidate query selects these and a constant for the other leading fields,
# so a record is still ``TxnRecord(*row)``; the trailing fields keep their
# defaults. Cheaper by a third on a million rows than every column.
CANDIDATE_FIELDS = frozenset({
    "id", "business_date", "proc", "kind", "amount", "currency", "terminal_id", "merchant_id", "stan",
    "transmitted", "pan_masked", "acquirer_id", "issuer_id", "to_issuer_id", "to_pan_masked", "rrn",
    "orig_id", "status", "auth_code", "to_auth_code",
})


def _candidate_select() -> str:
    hints = typing.get_type_hints(TxnRecord)
    last = max(schema.TXN_FIELDS.index(f) for f in CANDIDATE_FIELDS)
    cols = []
    for f in schema.TXN_FIELDS[:last + 1]:
        if f in CANDIDATE_FIELDS:
            cols.append(f)
        else:
            cols.append("0" if hints[f] in (int, bool) else "NULL" if "None" in str(hints[f]) else "''")
    return "SELECT " + ", ".join(cols) + " FROM txn"


_CANDIDATE_SELECT = _candidate_select()
_COUNTED = tuple(sorted(COUNTED_KINDS))
_UNDO = tuple(sorted(UNDO_KINDS))
_IN_COUNTED = f"kind IN ({', '.join('?' * len(_COUNTED))})"
_IN_UNDO = f"kind IN ({', '.join('?' * len(_UNDO))})"
_CHUNK = 500   # ids per IN (...) query: under SQLite's variable limit


class SqliteSource:
    """A read-only snapshot of a SQLite journal."""

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            raise SourceError(f"no journal at {path}: the switch has never run with this network file")
        self.path = path
        try:
            con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA busy_timeout=5000")
            con.execute("PRAGMA query_only=1")
            con.execute("PRAGMA cache_size=-65536")   # 64 MB: room for the sort by RRN
            has_txn = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'txn'"
                                  ).fetchone()
            if not has_txn:
                con.close()
                raise SourceError(f"{path} is not a cardswitch journal")
            con.execute("BEGIN")          # one snapshot for the whole run
            con.execute("SELECT 1 FROM txn LIMIT 1").fetchall()
        except sqlite3.Error as e:
            raise SourceError(f"cannot read journal {path}: {e}") from None
        self._con = con

    def close(self) -> None:
        try:
            self._con.execute("COMMIT")
        except sqlite3.Error:
            pass
        self._con.close()

    def __enter__(self) -> SqliteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _all(self, sql: str, params: Iterable = ()) -> list[tuple]:
        try:
            return self._con.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as e:
            raise SourceError(f"cannot read journal {self.path}: {e}") from None

    # -- state -------------------------------------------------------------------

    def current_business_date(self) -> str | None:
        rows = self._all("SELECT value FROM state WHERE key = ?", (STATE_BUSINESS_DATE,))
        return rows[0][0] if rows else None

    def count_pending(self, business_date: str) -> int:
        return self._all("SELECT COUNT(*) FROM txn WHERE business_date = ? AND status = ?",
                         (business_date, Status.PENDING))[0][0]

    # -- rows ---------------------------------------------------------------------

    def iter_candidates(self, business_date: str, issuer: str | None = None) -> Iterator[TxnRecord]:
        # By the date's index, then sorted: never a scan of the whole journal along the RRN index.
        sql = (f"{_CANDIDATE_SELECT} INDEXED BY txn_business_date "
               f"WHERE business_date = ? AND status = ? AND {_IN_COUNTED}")
        params: list = [business_date, Status.APPROVED, *_COUNTED]
        if issuer is not None:
            sql += " AND (issuer_id = ? OR to_issuer_id = ?)"
            params += [issuer, issuer]
        sql += " ORDER BY rrn, id"
        try:
            cur = self._con.execute(sql, params)
            while True:
                batch = cur.fetchmany(2000)
                if not batch:
                    return
                for row in batch:
                    yield TxnRecord(*row)
        except sqlite3.Error as e:
            raise SourceError(f"cannot read journal {self.path}: {e}") from None

    def undo_rows_between(self, first: str, last: str) -> list[TxnRecord]:
        rows = self._all(f"{_ALL_COLUMNS} INDEXED BY txn_business_date WHERE business_date BETWEEN ? AND ? "
                         f"AND status = ? AND {_IN_UNDO} AND orig_id IS NOT NULL ORDER BY id",
                         (first, last, Status.APPROVED, *_UNDO))
        return [_record(r) for r in rows]

    def rows_by_ids(self, ids: Iterable[int]) -> list[TxnRecord]:
        out: list[TxnRecord] = []
        for chunk in _chunks(list(ids)):
            out += [_record(r) for r in self._all(
                f"{_ALL_COLUMNS} WHERE id IN ({', '.join('?' * len(chunk))}) ORDER BY id", chunk)]
        return out

    def count_requests(self, business_date: str) -> int:
        """Every request of the date (from the date's index alone: cheap)."""
        return self._all("SELECT COUNT(*) FROM txn WHERE business_date = ?", (business_date,))[0][0]

    # -- the report's inputs -------------------------------------------------------

    def request_mix(self, business_date: str) -> list[MixRow]:
        rows = self._all("SELECT kind, status, response_code, COUNT(*), COALESCE(SUM(amount), 0) FROM txn "
                         "WHERE business_date = ? GROUP BY kind, status, response_code "
                         "ORDER BY kind, status, response_code", (business_date,))
        return [MixRow(*r) for r in rows]

    def batch_closes_on(self, business_date: str) -> list[BatchCloseRow]:
        rows = self._all(
            "SELECT terminal_id, batch, result, "
            "switch_credits_number, switch_credits_amount, switch_debits_number, switch_debits_amount, "
            "terminal_credits_number, terminal_credits_amount, terminal_debits_number, terminal_debits_amount "
            "FROM batch_close WHERE business_date = ? ORDER BY id", (business_date,))
        return [BatchCloseRow(r[0], r[1], r[2], tuple(r[3:7]), tuple(r[7:11])) for r in rows]

    def uploads(self, terminal_id: str, batch: str) -> list[UploadRow]:
        rows = self._all("SELECT rrn, stan, proc, amount, auth_code, pan_masked FROM batch_upload "
                         "WHERE terminal_id = ? AND batch = ? ORDER BY id", (terminal_id, batch))
        return [UploadRow(*r) for r in rows]

    def batch_rows(self, terminal_id: str, batch: str) -> list[TxnRecord]:
        rows = self._all(f"{_ALL_COLUMNS} WHERE terminal_id = ? AND batch = ? ORDER BY id",
                         (terminal_id, batch))
        return [_record(r) for r in rows]


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]
