"""The transaction journal: every terminal request and its outcome, durably.

Source of batch totals and reversal lookups after a restart, of settlement
and of reconciliation. Today it is one SQLite file in WAL mode; PostgreSQL
comes with the settlement issue behind the same API.

Writes never block the event loop: ``insert``, ``finish``, ``mark_cancelled``
and the other ``record_*``/``set_state`` calls queue to the group-commit
writer thread (``SqliteWriter``) and, given a loop, return a future that is
done once the row is committed. The pipeline awaits that future before it
answers an approval, and before it sends a request to an issuer (write
ahead). Reads (start-up recovery, offline jobs, operator queries) are
synchronous: they first wait for the writes queued before them, then read
through their own connection, so they see everything written so far and
never hold up the writer.

The ``saf`` table is the store-and-forward queue (``cardswitch.switch.saf``):
``saf_insert``/``saf_update`` write it through the same writer (so an advice
queued before a transaction's outcome commits no later than that outcome),
``saf_queued`` reads what is still owed after a restart.

One process owns a journal file: ``open`` takes an exclusive lock next to
it, because ids are allocated in memory from MAX(id). Other processes (an
operator's report while the switch runs) open it with ``readonly=True``.

No column can hold a full PAN, PIN block, track data or CVV (the record has
no such field); masked-PAN columns are re-masked on the way in, so even a
caller's mistake never reaches the disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import operator
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from cardswitch.iso8583.constants import RC
from cardswitch.pan import mask_pan
from cardswitch.storage.sqlite_writer import SqliteWriter, WriterClosed, connect
from cardswitch.switch import journal_schema as schema
from cardswitch.switch.index import BatchTotals
from cardswitch.switch.records import Status, TxnRecord
from cardswitch.switch.saf import QUEUED, SafEntry

__all__ = ["BatchClose", "BatchTotals", "Journal", "JournalError", "UploadRow", "sqlite_path"]

BATCH_RESULTS = (RC.APPROVED, RC.RECONCILE_ERROR)  # what a 0500 can be answered


class JournalError(Exception):
    """The journal cannot be opened or used; the message says why."""


class Totals(Protocol):
    credits_number: int
    credits_amount: int
    debits_number: int
    debits_amount: int


@dataclass(slots=True)
class UploadRow:
    """One 0320 batch-upload row as the terminal sent it (masked PAN only)."""

    rrn: str
    stan: str
    proc: str
    amount: int
    auth_code: str
    pan_masked: str


@dataclass(slots=True)
class BatchClose:
    """One recorded 0500 of a terminal batch: the result and both sides' totals."""

    id: int
    terminal_id: str
    batch: str
    business_date: str
    result: str
    closed_at: str
    switch_totals: BatchTotals
    terminal_totals: BatchTotals


def sqlite_path(url: str, data_dir: str) -> str:
    """The file a journal URL names. ``""`` means ``<data_dir>/journal.db``."""
    if not url:
        return os.path.join(data_dir, "journal.db")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("postgresql", "postgres"):
        raise JournalError("postgresql:// journals arrive with the settlement issue; "
                           "use sqlite:///path for now")
    if scheme != "sqlite" or not url.startswith("sqlite:///"):
        raise JournalError(f"journal URL {url!r} is not supported: expected sqlite:///path "
                           "(relative to the working directory) or sqlite:////absolute/path")
    path = url[len("sqlite:///"):]
    if not path or path == ":memory:" or path.startswith("file:"):
        raise JournalError(f"journal URL {url!r} names no file: a journal must survive a restart")
    return path


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_record_values = operator.attrgetter(*schema.TXN_FIELDS)
_PAN_MASKED_AT = tuple(schema.TXN_FIELDS.index(f) for f in ("pan_masked", "to_pan_masked"))


def _masked(value: str) -> str:
    """A masked-PAN value, masked again if a caller passed a clear PAN by mistake."""
    if value and "*" not in value:
        digits = sum(ch.isdigit() for ch in value)
        if digits >= 11:
            return mask_pan("".join(ch for ch in value if ch.isdigit()))
    return value


def _txn_params(rec: TxnRecord) -> tuple[Any, ...]:
    """The row for ``rec``, taken now: the caller may go on changing the record."""
    values = _record_values(rec)
    if type(rec.amount) is not int or type(rec.id) is not int:
        raise TypeError(f"journal: id and amount must be int (minor units), got "
                        f"{type(rec.id).__name__} id, {type(rec.amount).__name__} amount")
    for i in _PAN_MASKED_AT:
        v = values[i]
        if v and "*" not in v and _masked(v) != v:
            values = tuple(_masked(x) if j in _PAN_MASKED_AT else x for j, x in enumerate(values))
            break
    return values


def _saf_params(entry: SafEntry) -> tuple[Any, ...]:
    values = tuple(getattr(entry, f) for f in schema.SAF_FIELDS)
    if type(entry.amount) is not int or type(entry.id) is not int:
        raise TypeError("journal: advice id and amount must be int (minor units)")
    return values


def _record(row: tuple) -> TxnRecord:
    rec = TxnRecord(*row)
    for name in schema.BOOL_FIELDS:
        setattr(rec, name, bool(getattr(rec, name)))
    return rec


def _totals(t: Totals) -> tuple[int, int, int, int]:
    values = (t.credits_number, t.credits_amount, t.debits_number, t.debits_amount)
    if any(type(v) is not int for v in values):
        raise TypeError("journal: batch totals must be ints (minor units)")
    return values


class Journal:
    """Open with ``Journal.open(url, data_dir)``; see the module docstring."""

    def __init__(self, path: str, writer: SqliteWriter | None, reader: sqlite3.Connection,
                 lock_fd: int | None, max_id: int, max_saf_id: int = 0) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._read_lock = threading.Lock()
        self._lock_fd = lock_fd
        self._ids = itertools.count(max_id + 1)
        self._saf_ids = itertools.count(max_saf_id + 1)
        self._closed = False

    # -- opening and closing ---------------------------------------------------

    @classmethod
    def open(cls, url: str, data_dir: str, *, readonly: bool = False,
             synchronous: str = "NORMAL") -> Journal:
        """Open (creating if needed) the journal ``url`` names.

        ``readonly``: for another process reading a journal the switch has
        open (reports, checks): no lock, no writer, write calls raise.
        """
        path = sqlite_path(url, data_dir)
        if readonly:
            if not os.path.exists(path):
                raise JournalError(f"no journal at {path}")
            reader = _open_reader(path)
            try:
                version = _schema_version(reader)
                if version is None:
                    raise JournalError(f"{path} is not a cardswitch journal (no schema version)")
                _check_version(path, version)
                max_id = reader.execute("SELECT COALESCE(MAX(id), 0) FROM txn").fetchone()[0]
            except sqlite3.Error as e:
                reader.close()
                raise JournalError(f"cannot read journal {path}: {e}") from None
            except JournalError:
                reader.close()
                raise
            return cls(path, None, reader, None, max_id)

        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        lock_fd = _lock(path)
        writer = reader = None
        try:
            max_id = _prepare(path)
            writer = SqliteWriter(path, synchronous=synchronous)
            reader = _open_reader(path)
            max_saf_id = reader.execute("SELECT COALESCE(MAX(id), 0) FROM saf").fetchone()[0]
        except BaseException:
            if writer is not None:
                writer.close()
            if reader is not None:
                reader.close()
            os.close(lock_fd)
            raise
        return cls(path, writer, reader, lock_fd, max_id, max_saf_id)

    def close(self) -> None:
        """Commit what is queued and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                if self._writer.healthy:
                    try:  # keep the planner's statistics current for the next start
                        self._writer.call(_optimize)
                    except Exception:
                        pass
                self._writer.close()
        finally:
            with self._read_lock:
                self._reader.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- health and metrics ------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The writer thread runs and its last commit succeeded."""
        if self._closed:
            return False
        return True if self._writer is None else self._writer.healthy

    @property
    def last_write_latency(self) -> float:
        """Seconds from queueing to commit of the oldest write in the last group."""
        return 0.0 if self._writer is None else self._writer.last_latency_seconds

    @property
    def writer(self) -> SqliteWriter | None:
        """The writer (commit/row/failure counters, ``on_commit`` hook) for metrics."""
        return self._writer

    def flush(self) -> None:
        """Return once every write queued before is committed (or failed)."""
        if self._writer is not None and not self._closed:
            self._writer.flush()

    # -- ids -----------------------------------------------------------------------

    def next_id(self) -> int:
        if self._writer is None:
            raise JournalError("journal opened read-only: no ids to allocate")
        return next(self._ids)

    # -- transactions --------------------------------------------------------------

    def insert(self, rec: TxnRecord, loop: asyncio.AbstractEventLoop | None = None
               ) -> asyncio.Future | None:
        """Write ahead the row of ``rec`` (pending, or already final)."""
        return self._write(schema.TXN_INSERT, _txn_params(rec), loop)

    def finish(self, rec: TxnRecord, loop: asyncio.AbstractEventLoop | None = None
               ) -> asyncio.Future | None:
        """Write the outcome of ``rec`` (``schema.FINISH_FIELDS``) onto its write-ahead row."""
        values = _txn_params(rec)
        return self._write(schema.TXN_FINISH, tuple(values[i] for i in schema.FINISH_INDEXES) + (rec.id,), loop)

    def mark_cancelled(self, orig_id: int, cancelled: str, by_id: int | None,
                       loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Mark the original ``orig_id`` reversed/voided/completed by ``by_id``."""
        return self._write("UPDATE txn SET cancelled = ?, cancelled_by = ? WHERE id = ?",
                           (cancelled, by_id, orig_id), loop)

    def set_late_response(self, txn_id: int, rc: str,
                          loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Keep the issuer's answer that came after ``txn_id`` timed out (for the operators)."""
        return self._write("UPDATE txn SET late_response_code = ? WHERE id = ?", (rc, txn_id), loop)

    def get(self, txn_id: int) -> TxnRecord | None:
        rows = self._select(schema.TXN_SELECT + " WHERE id = ?", (txn_id,))
        return _record(rows[0]) if rows else None

    def last_issuer_stan(self, bank_id: str) -> str:
        """Field 11 of the newest request sent to ``bank_id`` ("" when none): a
        restarted link goes on from there rather than from 000001."""
        rows = self._select("SELECT issuer_stan FROM txn WHERE issuer_id = ? AND issuer_stan != '' "
                            "ORDER BY id DESC LIMIT 1", (bank_id,))
        return rows[0][0] if rows else ""

    def standin_usage(self, business_date: str) -> list[tuple[str, int, int]]:
        """(pan_token, count, amount) of the stand-in approvals of a business date."""
        return [tuple(r) for r in self._select(
            "SELECT pan_token, COUNT(*), COALESCE(SUM(amount), 0) FROM txn "
            "WHERE business_date = ? AND stand_in = 1 AND status = ? GROUP BY pan_token",
            (business_date, Status.APPROVED))]

    def load_for_recovery(self, business_dates: Iterable[str],
                          open_batches_only: bool = True) -> list[TxnRecord]:
        """The rows the switch keeps in memory after a restart, in id order.

        Every row of ``business_dates`` plus every row of a terminal batch
        still open (no 0500 answered 00). With ``open_batches_only=False``,
        also every row of the closed batches that have a row on those dates,
        so that each batch touched by those dates is loaded whole.
        """
        dates_json = json.dumps(sorted(set(business_dates)))
        params = (dates_json,) if open_batches_only else (dates_json, dates_json)
        return [_record(r) for r in self._select(recovery_sql(open_batches_only), params)]

    def pending(self) -> list[TxnRecord]:
        """Rows written ahead with no outcome (sent to an issuer before a crash)."""
        rows = self._select(schema.TXN_SELECT + " WHERE status = ? ORDER BY id", (Status.PENDING,))
        return [_record(r) for r in rows]

    def rows(self, business_date: str | None = None, terminal_id: str | None = None,
             limit: int | None = None) -> list[TxnRecord]:
        """Rows in id order; with ``limit``, the newest ``limit`` of them (still in id order)."""
        where, params = _where(business_date=business_date, terminal_id=terminal_id)
        if limit is None:
            sql = f"{schema.TXN_SELECT}{where} ORDER BY id"
        else:
            sql = f"{schema.TXN_SELECT}{where} ORDER BY id DESC LIMIT ?"
            params.append(max(0, int(limit)))
        rows = [_record(r) for r in self._select(sql, params)]
        if limit is not None:
            rows.reverse()
        return rows

    def count_by_status(self, business_date: str | None = None) -> dict[str, int]:
        where, params = _where(business_date=business_date)
        rows = self._select(f"SELECT status, COUNT(*) FROM txn{where} GROUP BY status ORDER BY status",
                            params)
        return {status: n for status, n in rows}

    # -- store-and-forward -----------------------------------------------------------

    def next_saf_id(self) -> int:
        if self._writer is None:
            raise JournalError("journal opened read-only: no ids to allocate")
        return next(self._saf_ids)

    def saf_insert(self, entry: SafEntry, loop: asyncio.AbstractEventLoop | None = None
                   ) -> asyncio.Future | None:
        values = _saf_params(entry)
        return self._write(schema.SAF_INSERT, values, loop)

    def saf_update(self, entry: SafEntry, loop: asyncio.AbstractEventLoop | None = None
                   ) -> asyncio.Future | None:
        """Write ``entry``'s state, attempts and last error."""
        return self._write(schema.SAF_UPDATE, (entry.state, entry.attempts, entry.last_error,
                                               entry.updated_at or _utc_now(), entry.id), loop)

    def saf_queued(self) -> list[SafEntry]:
        """Every advice still owed, oldest first."""
        return self.saf_entries(state=QUEUED)

    def saf_entries(self, *, state: str | None = None, txn_id: int | None = None,
                    bank_id: str | None = None) -> list[SafEntry]:
        where, params = _where(state=state, txn_id=txn_id, bank_id=bank_id)
        return [SafEntry(*r) for r in self._select(f"{schema.SAF_SELECT}{where} ORDER BY id", params)]

    def saf_counts(self) -> dict[tuple[str, str], int]:
        """(bank_id, state) -> number of advices."""
        rows = self._select("SELECT bank_id, state, COUNT(*) FROM saf GROUP BY bank_id, state")
        return {(b, st): n for b, st, n in rows}

    # -- batches -------------------------------------------------------------------

    def record_batch_close(self, terminal_id: str, batch: str, business_date: str, result: str,
                           switch_totals: Totals, terminal_totals: Totals,
                           loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Keep a 0500's outcome: ``result`` '00' closes the batch, '95' leaves it open."""
        if result not in BATCH_RESULTS:
            raise ValueError(f"batch close result must be one of {BATCH_RESULTS}, not {result!r}")
        return self._write(
            "INSERT INTO batch_close (terminal_id, batch, business_date, result, closed_at, "
            "switch_credits_number, switch_credits_amount, switch_debits_number, switch_debits_amount, "
            "terminal_credits_number, terminal_credits_amount, terminal_debits_number, "
            "terminal_debits_amount) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (terminal_id, batch, business_date, result, _utc_now(),
             *_totals(switch_totals), *_totals(terminal_totals)), loop)

    def closed_batches(self) -> set[tuple[str, str]]:
        """(terminal_id, batch) of every batch closed by a 0500 answered 00."""
        rows = self._select("SELECT DISTINCT terminal_id, batch FROM batch_close WHERE result = ?",
                            (RC.APPROVED,))
        return {(t, b) for t, b in rows}

    def batch_closes(self, terminal_id: str | None = None,
                     batch: str | None = None) -> list[BatchClose]:
        """Every recorded 0500 (both results), oldest first: for the exception report."""
        where, params = _where(terminal_id=terminal_id, batch=batch)
        rows = self._select(
            "SELECT id, terminal_id, batch, business_date, result, closed_at, "
            "switch_credits_number, switch_credits_amount, switch_debits_number, switch_debits_amount, "
            "terminal_credits_number, terminal_credits_amount, terminal_debits_number, "
            f"terminal_debits_amount FROM batch_close{where} ORDER BY id", params)
        return [BatchClose(*r[:6], BatchTotals(*r[6:10]), BatchTotals(*r[10:14])) for r in rows]

    def record_upload(self, terminal_id: str, batch: str, fields: UploadRow,
                      loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Keep one 0320 row; an exact re-send is kept once."""
        if type(fields.amount) is not int:
            raise TypeError("journal: upload amount must be int (minor units)")
        return self._write(
            "INSERT OR IGNORE INTO batch_upload (terminal_id, batch, rrn, stan, proc, amount, "
            "auth_code, pan_masked, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (terminal_id, batch, fields.rrn, fields.stan, fields.proc, fields.amount,
             fields.auth_code, _masked(fields.pan_masked), _utc_now()), loop)

    def uploads(self, terminal_id: str, batch: str) -> list[UploadRow]:
        rows = self._select(
            "SELECT rrn, stan, proc, amount, auth_code, pan_masked FROM batch_upload "
            "WHERE terminal_id = ? AND batch = ? ORDER BY id", (terminal_id, batch))
        return [UploadRow(*r) for r in rows]

    # -- switch state ----------------------------------------------------------------

    def get_state(self, key: str) -> str | None:
        rows = self._select("SELECT value FROM state WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_state(self, key: str, value: str, loop: asyncio.AbstractEventLoop | None = None
                  ) -> asyncio.Future | None:
        if not isinstance(value, str):
            raise TypeError(f"journal state {key!r}: value must be str, not {type(value).__name__}")
        return self._write(
            "INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (key, value, _utc_now()), loop)

    def state_items(self, prefix: str = "") -> dict[str, str]:
        """Every state key starting with ``prefix`` (e.g. the cutover history)."""
        rows = self._select("SELECT key, value FROM state WHERE substr(key, 1, ?) = ? ORDER BY key",
                            (len(prefix), prefix))
        return dict(rows)

    # -- internals -----------------------------------------------------------------

    def _write(self, sql: str, params: tuple, loop: asyncio.AbstractEventLoop | None
               ) -> asyncio.Future | None:
        if self._writer is None:
            raise JournalError("journal opened read-only: it cannot be written")
        try:
            return self._writer.write(sql, params, loop)
        except WriterClosed:
            raise JournalError(f"journal {self.path} is closed") from None

    def _select(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        self.flush()  # read what was written before this call
        with self._read_lock:
            return self._reader.execute(sql, tuple(params)).fetchall()


def recovery_sql(open_batches_only: bool = True) -> str:
    """``load_for_recovery``'s query; its parameters are the dates as a JSON list.

    CROSS JOIN fixes the join order: from the few open batches into the
    (terminal_id, batch) index, never a scan of the whole journal.
    """
    ids = ["SELECT id FROM txn WHERE business_date IN (SELECT value FROM json_each(?))",
           "SELECT t.id FROM open_batch b "
           "CROSS JOIN txn t ON t.terminal_id = b.terminal_id AND t.batch = b.batch"]
    if not open_batches_only:
        ids.append(
            "SELECT t.id FROM (SELECT DISTINCT terminal_id, batch FROM txn "
            "WHERE business_date IN (SELECT value FROM json_each(?)) AND batch != '') d "
            "CROSS JOIN txn t ON t.terminal_id = d.terminal_id AND t.batch = d.batch")
    return f"{schema.TXN_SELECT} WHERE id IN ({' UNION '.join(ids)}) ORDER BY id"


def _where(**filters: str | None) -> tuple[str, list[Any]]:
    terms, params = [], []
    for column, value in filters.items():
        if value is not None:
            terms.append(f"{column} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(terms) if terms else ""), params


def _optimize(con: sqlite3.Connection) -> None:
    con.execute("PRAGMA analysis_limit=1000")  # bounded: samples, never a full scan
    con.execute("PRAGMA optimize")


def _open_reader(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA busy_timeout=5000")
    con.execute("PRAGMA query_only=1")
    return con


def _lock(path: str) -> int:
    """One writing process per journal file: ids are allocated in memory."""
    lock_path = path + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        raise JournalError(
            f"journal {path} is already open for writing (process {holder or '?'}); "
            "close it first, or open it with readonly=True to read") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _schema_version(con: sqlite3.Connection) -> int | None:
    has_state = con.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'state'").fetchone()
    if not has_state:
        return None
    row = con.execute("SELECT value FROM state WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


def _check_version(path: str, version: int) -> None:
    if version > schema.SCHEMA_VERSION:
        raise JournalError(f"journal {path} has schema version {version}, newer than this "
                           f"cardswitch understands ({schema.SCHEMA_VERSION}): upgrade cardswitch")


def _prepare(path: str) -> int:
    """Create or upgrade the schema; return MAX(id) to seed id allocation."""
    try:
        con = connect(path)
    except sqlite3.Error as e:
        raise JournalError(f"cannot open journal {path}: {e}") from None
    try:
        version = _schema_version(con)
        if version is not None:
            _check_version(path, version)
        con.executescript(schema.DDL)
        existing = {row[1] for row in con.execute("PRAGMA table_info(txn)")}
        con.execute("BEGIN IMMEDIATE")
        for stmt in schema.missing_columns(existing):
            con.execute(stmt)
        con.execute(
            "INSERT INTO state (key, value, updated_at) VALUES ('schema_version', ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at "
            "WHERE state.value != excluded.value",
            (str(schema.SCHEMA_VERSION), _utc_now()))
        con.execute("COMMIT")
        return con.execute("SELECT COALESCE(MAX(id), 0) FROM txn").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise JournalError(f"cannot use journal {path}: {e}") from None
    finally:
        con.close()
