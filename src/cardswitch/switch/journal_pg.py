"""The transaction journal on PostgreSQL, shared by several switch nodes.

``PgJournal`` has the public API of the SQLite ``Journal`` (same methods,
arguments, return types and errors), so the pipeline, the switch app and
settlement use either; ``cardswitch.switch.journals.open_journal`` picks one
by the URL: ``postgresql://user@host:port/db`` (``postgres://`` too), with an
optional ``?schema=name`` (default ``public``) so that several journals, or
tests, share one database.

Threads. asyncpg is async while the Journal API is not, and the switch's own
event loop must never wait on the database: one thread per journal runs its
own event loop (uvloop when installed) holding one writer connection and a
small pool of read connections (``PgWriter``). Writes are queued from any
thread and applied in groups, one transaction per group: everything queued
while the previous commit was in flight commits together. Within a group,
row inserts and the updates of rows inserted before (outcomes, cancel marks,
advice states: ``COMMUTING``) go through one ``executemany`` per statement,
inserts first, so a group of interleaved inserts and finishes costs two
round trips, not one per row; every other statement keeps its place in the
queue order. Given a loop, a write returns a future
on that loop, resolved with ``call_soon_threadsafe`` once its group is
committed (one wake-up per loop per group). Reads are synchronous: they wait
for the writes queued before them, then run on a read connection, while the
caller waits (``concurrent.futures``), exactly like the SQLite journal.

Failures are contained as in ``SqliteWriter``: a statement that fails on its
own fails only its own future (the group is replayed with a savepoint per
write); a deadlock, a serialization failure or a plan invalidated by another
node's schema change retries the group; losing the server fails the group,
makes ``healthy`` false, and the next group reconnects.

Several nodes, one database:

- No lock: any number of processes open the same journal for writing.
- Ids come from the sequences ``txn_id_seq`` and ``saf_id_seq`` (INCREMENT
  BY 1000): a node takes a block of 1000 ids with one ``nextval`` and hands
  them out in memory, and fetches its next block in the background when half
  of the current one is used (``IdBlocks``). Ids are unique across nodes and
  increase within a node, but they are not dense (a restart leaves the rest
  of its block unused) and, across nodes, id order is not arrival order
  (``received_at`` is): ``rows(limit=n)`` is the n highest ids, and
  ``last_issuer_stan`` the STAN of the highest id, whichever node wrote it.
- ``state`` is shared: ``business_date`` and the cutover history are one
  value for all nodes. Today each node's ``CutoverService`` moves the date
  itself (the automatic cutover picks the same target on every node, so the
  writes agree; an operator's cutover reaches the node it is sent to, and the
  others see the new date when they next read it): see the lead's note in
  the report. RRN high-water marks in ``state`` (``rrn:<YDDD>``) are
  read-then-written by each node, so two nodes would hand out the same RRNs:
  give every node its own RRN space before running several.
- ``saf`` is shared too: ``saf_queued()`` returns every node's queued
  advices. A node that restarts while another runs would take over the
  other's advices as well (issuers de-duplicate repeats by MTI class + 11 +
  37, but per-bank order is lost): before several nodes run a SAF forwarder
  each, advices need an owner (a node column, or rows claimed with
  ``FOR UPDATE SKIP LOCKED``): see the report.
- ``open_batch`` is kept by triggers as in SQLite. A 0500 on one node racing
  a request for the same batch on another can leave a closed batch listed as
  open: that only makes a restart load a few more rows; ``closed_batches``
  reads ``batch_close`` itself and stays exact.

Text columns use the "C" collation (byte order, like SQLite's): sorting and
indexes behave the same in both journals and do not depend on the server's
locale. One difference from SQLite: PostgreSQL text cannot hold NUL
characters; a row holding one fails on its own with a DataError.

Secrets: as in the SQLite journal, no column can hold a full PAN, PIN block,
track data or CVV, and masked-PAN values are masked again on the way in.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import inspect
import logging
import re
import threading
import time
import typing
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import asyncpg

from cardswitch.iso8583.constants import RC
from cardswitch.pan import mask_pan
from cardswitch.storage.sqlite_writer import WriterClosed, account_group
from cardswitch.switch import journal_schema as schema
from cardswitch.switch.index import BatchTotals
from cardswitch.switch.journals import is_postgres_url
from cardswitch.switch.journal import (
    BATCH_RESULTS,
    BatchClose,
    JournalError,
    Totals,
    UploadRow,
    _masked,
    _saf_params,
    _totals,
    _txn_params,
    _utc_now,
)
from cardswitch.switch.records import Status, TxnRecord
from cardswitch.switch.saf import QUEUED, STATES, SafEntry

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

__all__ = ["PG_SCHEMA_VERSION", "IdBlocks", "PgJournal", "PgSettlementSource", "PgTarget", "PgWriter",
           "ddl", "is_postgres_url", "pg_target"]

log = logging.getLogger("cardswitch.storage")

# The schema version kept in ``state``, as in SQLite. The tables mirror the
# SQLite journal's of the same version (2: the saf table and
# txn.late_response_code); a test checks the two stay in step.
PG_SCHEMA_VERSION = 2

DEFAULT_SCHEMA = "public"
ID_SEQUENCE = "txn_id_seq"        # txn ids
SAF_ID_SEQUENCE = "saf_id_seq"    # store-and-forward advice ids
ID_BLOCK = 1000
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


# -- URL ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PgTarget:
    """Where a PostgreSQL journal lives: a DSN for asyncpg, the schema, a printable name."""

    dsn: str           # without the ``schema`` parameter; may hold a password
    schema: str
    display: str       # the URL without any password, for messages
    # Query parameters of the URL (asyncpg passes unknown ones to the server
    # as settings, e.g. ``?synchronous_commit=off``): they win over ours.
    options: tuple[str, ...] = ()


def pg_target(url: str, schema_name: str | None = None) -> PgTarget:
    """Parse ``postgresql://user@host:port/db?schema=name``; ``schema_name`` overrides."""
    if not is_postgres_url(url):
        raise JournalError(f"journal URL {url!r} is not a postgresql:// URL")
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    from_url = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    name = schema_name if schema_name is not None else (from_url[-1] if from_url else DEFAULT_SCHEMA)
    if not _SCHEMA_NAME.fullmatch(name):
        raise JournalError(f"journal schema {name!r} is not a plain lower-case SQL name "
                           "(letters, digits, _; at most 63)")
    dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    shown = urllib.parse.urlencode(rest + [("schema", name)])
    display = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, shown, ""))
    return PgTarget(dsn, name, display, tuple(k for k, _ in rest))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- schema ----------------------------------------------------------------------------------

_HINTS = typing.get_type_hints(TxnRecord)
_TEXT = 'TEXT COLLATE "C"'


def _column_type(name: str, hint: object, default: object, owner: str = "TxnRecord") -> str:
    if name == "id":
        return "BIGINT PRIMARY KEY"
    if hint is bool:
        sql, zero = "BOOLEAN NOT NULL", False
    elif hint is int:
        sql, zero = "BIGINT NOT NULL", 0
    elif hint is str:
        sql, zero = f"{_TEXT} NOT NULL", ""
    elif hint is float:
        sql, zero = "DOUBLE PRECISION NOT NULL", 0.0
    elif hint == (int | None):
        return "BIGINT"
    elif hint == (str | None):
        return _TEXT
    else:
        raise TypeError(f"{owner}.{name}: type {hint!r} has no journal column type")
    if default is dataclasses.MISSING:
        return sql
    return f"{sql} DEFAULT {_literal(default if default is not None else zero)}"


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def _columns(cls: type) -> tuple[tuple[str, str], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _column_type(f.name, hints[f.name], f.default, cls.__name__))
                 for f in dataclasses.fields(cls))


# Same names and order as the SQLite schema (derived from the dataclasses
# there and checked against FORBIDDEN_COLUMNS at its import); PostgreSQL types.
TXN_COLUMNS = _columns(TxnRecord)
SAF_COLUMNS = _columns(SafEntry)
assert tuple(n for n, _ in TXN_COLUMNS) == schema.TXN_FIELDS
assert tuple(n for n, _ in SAF_COLUMNS) == schema.SAF_FIELDS
_BOOL_AT = tuple(i for i, name in enumerate(schema.TXN_FIELDS) if _HINTS[name] is bool)

TXN_SELECT = schema.TXN_SELECT
TXN_INSERT = (f"INSERT INTO txn ({', '.join(schema.TXN_FIELDS)}) VALUES "
              f"({', '.join(f'${i + 1}' for i in range(len(schema.TXN_FIELDS)))})")
TXN_FINISH = ("UPDATE txn SET " + ", ".join(f"{c} = ${i + 1}" for i, c in enumerate(schema.FINISH_FIELDS))
              + f" WHERE id = ${len(schema.FINISH_FIELDS) + 1}")
TXN_CANCEL = "UPDATE txn SET cancelled = $1, cancelled_by = $2 WHERE id = $3"
TXN_LATE = "UPDATE txn SET late_response_code = $1 WHERE id = $2"
SAF_SELECT = schema.SAF_SELECT
SAF_INSERT = (f"INSERT INTO saf ({', '.join(schema.SAF_FIELDS)}) VALUES "
              f"({', '.join(f'${i + 1}' for i in range(len(schema.SAF_FIELDS)))})")
SAF_UPDATE = "UPDATE saf SET state = $1, attempts = $2, last_error = $3, updated_at = $4 WHERE id = $5"

_TOTALS = ("credits_number", "credits_amount", "debits_number", "debits_amount")
_BATCH_CLOSE_COLUMNS = ("terminal_id", "batch", "business_date", "result", "closed_at",
                        *(f"switch_{t}" for t in _TOTALS), *(f"terminal_{t}" for t in _TOTALS))
BATCH_CLOSE_INSERT = (f"INSERT INTO batch_close ({', '.join(_BATCH_CLOSE_COLUMNS)}) VALUES "
                      f"({', '.join(f'${i + 1}' for i in range(len(_BATCH_CLOSE_COLUMNS)))})")
UPLOAD_INSERT = ("INSERT INTO batch_upload (terminal_id, batch, rrn, stan, proc, amount, auth_code, "
                 "pan_masked, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                 "ON CONFLICT DO NOTHING")
# Row inserts first, then updates of rows inserted before (outcomes and
# cancel marks write disjoint columns; an advice's state is its own row): the
# writer may group these within a commit (_apply_fast). Anything else (the
# late answer, which finish also writes; batches; state) keeps its place.
COMMUTING = {TXN_INSERT: 0, SAF_INSERT: 0, TXN_FINISH: 1, TXN_CANCEL: 1, SAF_UPDATE: 1}
STATE_UPSERT = ("INSERT INTO state (key, value, updated_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at")


def ddl(schema_name: str) -> str:
    """The journal's tables in ``schema_name``, PostgreSQL flavour of ``journal_schema.DDL``."""
    s = _ident(schema_name)
    cols = (',\n    ').join(f'{n} {t}' for n, t in TXN_COLUMNS)
    saf_cols = (',\n    ').join(f'{n} {t}' for n, t in SAF_COLUMNS)
    totals = (',\n    ').join([f'switch_{t} BIGINT NOT NULL' for t in _TOTALS]
                               + [f'terminal_{t} BIGINT NOT NULL' for t in _TOTALS])
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.txn (
    {cols}
);
CREATE INDEX IF NOT EXISTS txn_business_date ON {s}.txn (business_date);
CREATE INDEX IF NOT EXISTS txn_terminal_batch ON {s}.txn (terminal_id, batch);
CREATE INDEX IF NOT EXISTS txn_rrn ON {s}.txn (rrn);
-- Partial: only rows still waiting for an outcome, so finished rows cost nothing here.
CREATE INDEX IF NOT EXISTS txn_pending ON {s}.txn (status) WHERE status = '{Status.PENDING}';

CREATE TABLE IF NOT EXISTS {s}.batch_close (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    terminal_id {_TEXT} NOT NULL,
    batch {_TEXT} NOT NULL,
    business_date {_TEXT} NOT NULL,
    result {_TEXT} NOT NULL CHECK (result IN ('{RC.APPROVED}', '{RC.RECONCILE_ERROR}')),
    closed_at {_TEXT} NOT NULL,
    {totals}
);
CREATE INDEX IF NOT EXISTS batch_close_terminal_batch ON {s}.batch_close (terminal_id, batch);

-- 0320 rows as the terminal uploaded them (masked PAN only). An exact
-- re-send is kept once; anything that differs is kept.
CREATE TABLE IF NOT EXISTS {s}.batch_upload (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    terminal_id {_TEXT} NOT NULL,
    batch {_TEXT} NOT NULL,
    rrn {_TEXT} NOT NULL,
    stan {_TEXT} NOT NULL,
    proc {_TEXT} NOT NULL,
    amount BIGINT NOT NULL,
    auth_code {_TEXT} NOT NULL,
    pan_masked {_TEXT} NOT NULL,
    received_at {_TEXT} NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS batch_upload_row
    ON {s}.batch_upload (terminal_id, batch, stan, rrn, proc, amount, auth_code, pan_masked);

CREATE TABLE IF NOT EXISTS {s}.open_batch (
    terminal_id {_TEXT} NOT NULL,
    batch {_TEXT} NOT NULL,
    PRIMARY KEY (terminal_id, batch)
);
CREATE OR REPLACE FUNCTION {s}.txn_opens_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {s}.batch_close c WHERE c.terminal_id = NEW.terminal_id
                   AND c.batch = NEW.batch AND c.result = '{RC.APPROVED}') THEN
        INSERT INTO {s}.open_batch (terminal_id, batch) VALUES (NEW.terminal_id, NEW.batch)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS txn_opens_batch ON {s}.txn;
CREATE TRIGGER txn_opens_batch AFTER INSERT ON {s}.txn
    FOR EACH ROW WHEN (NEW.batch <> '') EXECUTE FUNCTION {s}.txn_opens_batch();
CREATE OR REPLACE FUNCTION {s}.batch_close_closes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {s}.open_batch WHERE terminal_id = NEW.terminal_id AND batch = NEW.batch;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS batch_close_closes ON {s}.batch_close;
CREATE TRIGGER batch_close_closes AFTER INSERT ON {s}.batch_close
    FOR EACH ROW WHEN (NEW.result = '{RC.APPROVED}') EXECUTE FUNCTION {s}.batch_close_closes();

CREATE TABLE IF NOT EXISTS {s}.state (
    key {_TEXT} PRIMARY KEY,
    value {_TEXT} NOT NULL,
    updated_at {_TEXT} NOT NULL
);

-- Store-and-forward: advices owed to issuers (never a clear PAN: pan_sealed is AES-GCM).
CREATE TABLE IF NOT EXISTS {s}.saf (
    {saf_cols},
    CHECK (state IN ({', '.join(_literal(x) for x in STATES)}))
);
CREATE INDEX IF NOT EXISTS saf_queued ON {s}.saf (bank_id, id) WHERE state = '{QUEUED}';
CREATE INDEX IF NOT EXISTS saf_txn ON {s}.saf (txn_id);
"""


_TABLE_COLUMNS = {"txn": TXN_COLUMNS, "saf": SAF_COLUMNS}


def missing_columns(schema_name: str, existing: set[tuple[str, str]]) -> list[str]:
    """ALTER statements adding the fields an older journal lacks; ``existing`` holds
    (table, column) pairs. A table not there at all is left to ``ddl``."""
    tables = {t for t, _ in existing}
    return [f"ALTER TABLE {_ident(schema_name)}.{table} ADD COLUMN IF NOT EXISTS {name} {sql}"
            for table, columns in _TABLE_COLUMNS.items() if table in tables
            for name, sql in columns if (table, name) not in existing]


def recovery_sql(open_batches_only: bool = True) -> str:
    """``load_for_recovery``'s query; its one parameter is the dates as a text array.

    A UNION of whole rows, each part driven by an index (business_date, or
    (terminal_id, batch) from the few open batches), never ``id IN (...)``,
    which the planner answers with a scan of the whole journal.
    """
    cols = ", ".join(f"t.{c}" for c in schema.TXN_FIELDS)
    parts = [f"SELECT {cols} FROM txn t WHERE t.business_date = ANY($1::text[])",
             f"SELECT {cols} FROM open_batch b "
             "JOIN txn t ON t.terminal_id = b.terminal_id AND t.batch = b.batch"]
    if not open_batches_only:
        parts.append(
            f"SELECT {cols} FROM (SELECT DISTINCT terminal_id, batch FROM txn "
            "WHERE business_date = ANY($1::text[]) AND batch <> '') d "
            "JOIN txn t ON t.terminal_id = d.terminal_id AND t.batch = d.batch")
    return " UNION ".join(parts) + " ORDER BY id"


def _where(params: list[Any], **filters: str | None) -> str:
    terms = []
    for column, value in filters.items():
        if value is not None:
            params.append(value)
            terms.append(f"{column} = ${len(params)}")
    return " WHERE " + " AND ".join(terms) if terms else ""


# -- errors --------------------------------------------------------------------------------

# SQLSTATE classes that mean the server or the connection failed, not the
# statement: 08 connection, 53 resources (disk full), 57 operator
# intervention (shutdown), 58 system (I/O), XX internal.
_ENVIRONMENT_CLASSES = frozenset({"08", "53", "57", "58", "XX"})
# Worth running the whole group again: deadlock / serialization failure with
# another node, or a cached plan invalidated by another node's ALTER TABLE.
_RETRY_STATES = frozenset({"40001", "40P01"})
_RETRIES = 3


def is_environment_error(e: BaseException) -> bool:
    """The database or the connection failed (the next group reconnects)."""
    if isinstance(e, asyncpg.PostgresError):
        state = getattr(e, "sqlstate", None) or ""
        return state[:2] in _ENVIRONMENT_CLASSES
    return isinstance(e, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError,
                          asyncpg.exceptions.InternalClientError))


def _retryable(e: BaseException) -> bool:
    return (isinstance(e, asyncpg.exceptions.InvalidCachedStatementError)
            or getattr(e, "sqlstate", None) in _RETRY_STATES)


_ARGUMENT_ERROR = re.compile(r"(invalid input for query argument \$\d+)(: .*)", re.S)
_DIGIT_RUN = re.compile(r"\d{13,19}")


def _describe(e: BaseException) -> str:
    """The exception's text for a log line or a JournalError, without row values.

    asyncpg quotes the offending argument when it cannot encode one: that
    part is cut, and any run of digits long enough to be a PAN is masked.
    """
    text = _ARGUMENT_ERROR.sub(r"\1 (value withheld)", str(e))
    text = _DIGIT_RUN.sub(lambda m: mask_pan(m.group()), text)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- the writer ----------------------------------------------------------------------------

# Queue items: (kind, a, b, fut, loop, enqueued_at)
#   _WRITE: a = sql, b = params        _MANY: a = None, b = [(sql, params), ...]
#   _CALL:  a = fn(con) or None (a barrier), fut = concurrent or PG-loop future
_WRITE, _MANY, _CALL, _STOP = 0, 1, 2, 3


class PgWriter:
    """One thread with its own event loop: the group-commit writer and the reads.

    The counterpart of ``SqliteWriter`` (same counters, ``on_commit`` hook,
    ``write``/``write_many``/``call``/``flush``/``close``), plus ``fetch`` for
    reads. ``write=False`` opens it for reading only.
    """

    def __init__(self, target: PgTarget, *, write: bool = True, max_batch: int = 2000,
                 synchronous_commit: str = "", connect_timeout: float = 10.0,
                 write_timeout: float = 30.0, read_connections: int = 2,
                 prepare: Callable[[PgTarget], Awaitable[None]] | None = None,
                 commuting: Mapping[str, int] | None = None, snapshot: bool = False) -> None:
        self.path = target.display
        self._snapshot = snapshot and not write
        self._snap: asyncpg.Connection | None = None
        self._snap_lock = asyncio.Lock()
        self._prepare = prepare
        self._phases = dict(commuting or {})
        self._target = target
        self._writes = write
        self._max_batch = max_batch
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        settings = {"search_path": _ident(target.schema), "application_name": "cardswitch-journal"}
        if synchronous_commit:
            settings["synchronous_commit"] = synchronous_commit
        self._settings = {k: v for k, v in settings.items() if k not in target.options}
        self._read_connections = read_connections
        self._q: collections.deque = collections.deque()
        self._q_lock = threading.Lock()
        self._sleeping = False
        self._closed = False          # nothing more is queued (closing, or the writer ended)
        self._shut = False            # close() has run: thread stopped, connections closed
        self._con: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._error: BaseException | None = None     # of the last commit; None when it succeeded
        self.last_error: BaseException | None = None  # last failure of any kind, kept for operators
        self.commits = 0
        self.rows = 0                 # writes committed (a write_many counts once)
        self.failed = 0               # writes whose future got an error (or would have)
        self.retries = 0              # groups run again after a deadlock or serialization failure
        self.reconnects = 0
        self.last_commit_seconds = 0.0
        self.last_latency_seconds = 0.0
        # Called on the writer thread after each successful commit with
        # (writes, latency_seconds); must be quick and must not raise.
        self.on_commit: Callable[[int, float], None] | None = None

        self._loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"pg-journal:{self.path}",
                                        daemon=True)
        self._thread.start()
        try:
            self._on_loop(self._start())
        except BaseException:
            self._closed = self._shut = True
            self._shutdown()
            raise
        ref = weakref.ref(self)
        self._atexit = lambda: (w := ref()) is not None and w.close()
        atexit.register(self._atexit)

    # -- state -----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        alive = self._task is None or not self._task.done()
        return self._error is None and not self._closed and self._thread.is_alive() and alive

    @property
    def closed(self) -> bool:
        return self._closed

    # -- from any thread ---------------------------------------------------------------

    def write(self, sql: str, params: Sequence[Any] = (),
              loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Queue one statement. With ``loop``, return a future done at commit."""
        fut = loop.create_future() if loop is not None else None
        self._put((_WRITE, sql, params, fut, loop, time.perf_counter()))
        return fut

    def write_many(self, stmts: Sequence[tuple[str, Sequence[Any]]],
                   loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Queue several statements that commit in the same group, all or none."""
        fut = loop.create_future() if loop is not None else None
        self._put((_MANY, None, list(stmts), fut, loop, time.perf_counter()))
        return fut

    def call(self, fn: Callable[[asyncpg.Connection], Any]) -> Any:
        """Run ``fn(con)`` on the writer after everything queued; wait for its result.

        ``fn`` gets the writer connection outside any transaction; it may be
        a plain function or return an awaitable, which is awaited (without
        holding up reads).
        """
        return self._wait(self._queue_call(fn))

    def flush(self) -> None:
        """Return once everything queued before is committed (or failed)."""
        if self._writes and not self._closed:
            try:
                self._wait(self._queue_call(None))
            except WriterClosed:
                pass

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[asyncpg.Record]:
        """Rows of ``sql``, seeing every write queued before the call."""
        if self._closed:
            raise WriterClosed(f"postgresql journal {self.path} is closed")
        return self._on_loop(self._fetch(sql, tuple(params)))

    def stream(self, sql: str, params: Sequence[Any] = (), batch: int = 2000) -> Iterator[asyncpg.Record]:
        """Rows of ``sql`` through a server-side cursor, ``batch`` at a time (snapshot only)."""
        if self._closed:
            raise WriterClosed(f"postgresql journal {self.path} is closed")
        if not self._snapshot:
            raise RuntimeError("stream() reads from a snapshot: open the PgWriter with snapshot=True")
        cursor = self._on_loop(self._cursor(sql, tuple(params)))
        while True:
            rows = self._on_loop(self._cursor_fetch(cursor, batch))
            yield from rows
            if len(rows) < batch:
                return

    def execute(self, sql: str) -> str:
        """Run a statement without parameters (maintenance: ANALYZE) on a read connection."""
        if self._closed:
            raise WriterClosed(f"postgresql journal {self.path} is closed")
        return self._on_loop(self._execute(sql))

    def submit(self, coro: Any) -> concurrent.futures.Future:
        """Run a coroutine on the journal's loop (e.g. a ``nextval`` fetched ahead)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        """Commit what is queued, stop the thread, close the connections. Idempotent."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("PgWriter.close from its own thread")
        with self._q_lock:
            if self._shut:
                return
            self._closed = self._shut = True
            self._q.append((_STOP, None, None, None, None, 0.0))
            wake, self._sleeping = self._sleeping, False
        atexit.unregister(self._atexit)
        if wake:
            self._wake_up()
        self._shutdown()

    # -- internals (caller side) -------------------------------------------------------

    def _put(self, item: tuple) -> None:
        with self._q_lock:
            if self._closed or not self._writes:
                raise WriterClosed(f"postgresql journal {self.path} is closed")
            self._q.append(item)
            wake, self._sleeping = self._sleeping, False
        if wake:
            self._wake_up()

    def _wake_up(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: the drain at close answers everyone
            pass

    def _queue_call(self, fn: Callable | None) -> concurrent.futures.Future:
        if threading.current_thread() is self._thread:
            raise RuntimeError("PgWriter.call from the writer thread would deadlock")
        cf: concurrent.futures.Future = concurrent.futures.Future()
        self._put((_CALL, fn, None, cf, None, 0.0))
        return cf

    def _wait(self, cf: concurrent.futures.Future) -> Any:
        while True:
            try:
                return cf.result(0.5)
            except concurrent.futures.TimeoutError:
                if not self._thread.is_alive():
                    self._drain()  # the thread died under us: release ourselves
                    if not cf.done():
                        raise WriterClosed(f"postgresql journal {self.path} is closed") from None

    def _on_loop(self, coro: Any) -> Any:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a PostgreSQL journal read from its own thread would deadlock")
        return self._wait(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _shutdown(self) -> None:
        if self._thread.is_alive():
            try:
                self._wait(asyncio.run_coroutine_threadsafe(self._stop(), self._loop))
            except BaseException:
                log.exception("postgresql journal %s: error while closing", self.path)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._drain()
        if not self._loop.is_closed():
            self._loop.close()

    # -- on the journal's loop -------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._target.dsn, timeout=self._connect_timeout,
                                     server_settings=self._settings)

    async def _start(self) -> None:
        if self._snapshot:
            # One transaction for the reader's whole life: every query sees the same journal.
            self._snap = await self._connect()
            await self._snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return
        if self._writes and self._prepare is not None:
            await self._prepare(self._target)
        self._pool = await asyncpg.create_pool(
            self._target.dsn, min_size=1, max_size=self._read_connections,
            timeout=self._connect_timeout, server_settings=self._settings)
        if self._writes:
            self._con = await self._connect()
            self._task = self._loop.create_task(self._run())

    async def _stop(self) -> None:
        if self._task is not None:
            try:
                await self._task  # ends at the _STOP item, after committing what came before
            except BaseException:
                pass
        # Reads and id blocks still in flight (nobody waits for them any more).
        others = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        if self._con is not None:
            await _close_quietly(self._con)
            self._con = None
        if self._snap is not None:
            await _close_quietly(self._snap)  # ends the read-only transaction
            self._snap = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except BaseException:
                self._pool.terminate()

    async def _fetch(self, sql: str, params: tuple, one: bool = False, flush: bool = True) -> Any:
        if self._snap is not None:
            async with self._snap_lock:
                return await (self._snap.fetchval(sql, *params) if one else self._snap.fetch(sql, *params))
        if flush and self._writes:
            barrier = self._loop.create_future()
            self._put((_CALL, None, None, barrier, None, 0.0))
            await barrier
        assert self._pool is not None
        for attempt in (0, 1):
            try:
                async with self._pool.acquire() as con:
                    return await (con.fetchval(sql, *params) if one else con.fetch(sql, *params))
            except Exception as e:
                if attempt == 0 and is_environment_error(e):
                    continue  # a connection the server dropped: the pool makes a new one
                raise

    async def _cursor(self, sql: str, params: tuple) -> Any:
        assert self._snap is not None
        async with self._snap_lock:
            return await self._snap.cursor(sql, *params)

    async def _cursor_fetch(self, cursor: Any, n: int) -> list[asyncpg.Record]:
        async with self._snap_lock:
            return await cursor.fetch(n)

    async def _execute(self, sql: str) -> str:
        assert self._pool is not None
        async with self._pool.acquire() as con:
            return await con.execute(sql)

    async def _writer_con(self) -> asyncpg.Connection:
        if self._con is None or self._con.is_closed():
            self._con = None
            self._con = await self._connect()
            self.reconnects += 1
        return self._con

    async def _drop(self) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            con.terminate()

    def _take(self) -> list[tuple] | None:
        with self._q_lock:
            if not self._q:
                self._sleeping = True
                self._wake.clear()
                return None
            n = min(len(self._q), self._max_batch)
            return [self._q.popleft() for _ in range(n)]

    async def _run(self) -> None:
        batch: list[tuple] = []
        try:
            while True:
                batch = self._take() or []
                if not batch:
                    await self._wake.wait()
                    continue
                if await self._process(batch):
                    return
                batch = []
        except BaseException as e:  # a bug here must not leave callers waiting
            self._error = self.last_error = e
            with self._q_lock:  # refused from now on, before anyone hears of the failure
                self._closed = True
            log.exception("postgresql journal writer %s failed", self.path)
            self._fail(batch, e)
        finally:
            with self._q_lock:
                self._closed = True
            self._drain()

    async def _process(self, batch: list[tuple]) -> bool:
        """Commit the writes, run the calls in order; True at the stop item."""
        writes: list[tuple] = []
        for i, item in enumerate(batch):
            kind = item[0]
            if kind == _WRITE or kind == _MANY:
                writes.append(item)
                continue
            if writes:
                await self._commit(writes)
                writes = []
            if kind == _STOP:
                self._fail(batch[i + 1:], WriterClosed(f"postgresql journal {self.path} is closed"))
                return True
            await self._run_call(item)
        if writes:
            await self._commit(writes)
        return False

    async def _run_call(self, item: tuple) -> None:
        fn, fut = item[1], item[3]
        if fn is None:  # a barrier: everything before it is done
            if not fut.done():
                fut.set_result(None)
            return
        try:
            con = await self._writer_con()
            result = fn(con)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as e:  # handed back to the caller
            if not fut.done():
                fut.set_exception(e)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            if not fut.done():
                fut.set_result(result)
        finally:
            if self._con is not None and not self._con.is_closed() and self._con.is_in_transaction():
                try:  # fn left a transaction open: it must not swallow later writes
                    await self._con.execute("ROLLBACK")
                except Exception:
                    await self._drop()

    async def _commit(self, items: list[tuple]) -> None:
        t0 = time.perf_counter()
        errors: list[BaseException | None] | None = None
        for attempt in range(_RETRIES):
            try:
                con = await self._writer_con()
                async with con.transaction():
                    await _apply_fast(con, items, self._write_timeout, self._phases)
                errors = None
                break
            except Exception as e:
                if _retryable(e) and attempt + 1 < _RETRIES:
                    self.retries += 1
                    continue
                if is_environment_error(e):
                    await self._drop()
                    errors = [e] * len(items)
                else:
                    errors = await self._replay(items)
                break
        account_group(self, items, errors, t0, "postgresql journal", is_environment_error, _describe)
        _resolve(items, errors)

    async def _replay(self, items: list[tuple]) -> list[BaseException | None]:
        """One savepoint per write: only the writes that fail on their own fail."""
        errors: list[BaseException | None] = []
        try:
            con = await self._writer_con()
            async with con.transaction():
                for item in items:
                    try:
                        async with con.transaction():  # a savepoint
                            await _apply_one(con, item, self._write_timeout)
                    except Exception as e:
                        if is_environment_error(e) or _retryable(e):
                            raise
                        errors.append(e)
                    else:
                        errors.append(None)
        except Exception as e:  # the database itself failed: nothing committed
            if is_environment_error(e):
                await self._drop()
            return [e] * len(items)
        return errors

    def _drain(self) -> None:
        """Fail everything still queued: the writer is gone."""
        with self._q_lock:
            items = list(self._q)
            self._q.clear()
        self._fail(items, WriterClosed(f"postgresql journal {self.path} is closed"))

    def _fail(self, items: list[tuple], error: BaseException) -> None:
        writes = [item for item in items if item[0] in (_WRITE, _MANY)]
        for item in items:
            if item[0] == _CALL and not item[3].done():
                fut = item[3]
                if isinstance(fut, concurrent.futures.Future):
                    fut.set_exception(error)
                else:  # a read's barrier, on this writer's loop
                    try:
                        fut.get_loop().call_soon_threadsafe(_set_exception, fut, error)
                    except RuntimeError:  # that loop is closed: nobody is waiting any more
                        pass
        self.failed += sum(1 for item in writes if item[3] is None or not item[3].done())
        _resolve(writes, [error] * len(writes))


async def _apply_fast(con: asyncpg.Connection, items: list[tuple], timeout: float,
                      phases: Mapping[str, int]) -> None:
    """Apply a group with as few round trips as the order allows.

    Statements named in ``phases`` commute except that a lower phase comes
    first (the journal's: row inserts, then outcomes and cancel marks, which
    write disjoint columns): between two other statements they are applied
    one ``executemany`` per statement, in phase order, so that a group of
    interleaved inserts and finishes costs two round trips, not one per row.
    Any other statement keeps its place; runs of one go through executemany.
    The replay after a failure applies the writes one by one in queue order.
    """
    window: dict[str, list] = {}
    run_sql: str | None = None
    run: list = []
    for kind, sql, params, _fut, _loop, _t in items:
        if kind == _WRITE and sql in phases:
            if run:
                await _run_statements(con, run_sql, run, timeout)
                run_sql, run = None, []
            window.setdefault(sql, []).append(params)
            continue
        if window:
            for s in sorted(window, key=phases.__getitem__):
                await _run_statements(con, s, window[s], timeout)
            window.clear()
        if kind == _WRITE:
            if sql == run_sql:
                run.append(params)
                continue
            if run:
                await _run_statements(con, run_sql, run, timeout)
            run_sql, run = sql, [params]
        else:
            if run:
                await _run_statements(con, run_sql, run, timeout)
                run_sql, run = None, []
            for s, p in params:
                await con.execute(s, *p, timeout=timeout)
    for s in sorted(window, key=phases.__getitem__):
        await _run_statements(con, s, window[s], timeout)
    if run:
        await _run_statements(con, run_sql, run, timeout)


async def _run_statements(con: asyncpg.Connection, sql: str | None, run: list, timeout: float) -> None:
    if len(run) == 1:
        await con.execute(sql, *run[0], timeout=timeout)
    else:
        await con.executemany(sql, run, timeout=timeout)


async def _apply_one(con: asyncpg.Connection, item: tuple, timeout: float) -> None:
    kind, sql, params = item[0], item[1], item[2]
    if kind == _WRITE:
        await con.execute(sql, *params, timeout=timeout)
    else:
        for s, p in params:
            await con.execute(s, *p, timeout=timeout)


async def _close_quietly(con: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(con.close(), 5)
    except BaseException:
        con.terminate()


def _resolve(items: list[tuple], errors: list[BaseException | None] | None) -> None:
    # One wake-up per event loop per group, not one per future.
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for i, item in enumerate(items):
        fut = item[3]
        if fut is not None:
            by_loop.setdefault(item[4], []).append((fut, None if errors is None else errors[i]))
    for loop, done in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, done)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def _resolve_all(done: list[tuple[asyncio.Future, BaseException | None]]) -> None:
    for fut, error in done:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _set_exception(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)


# -- the journal ---------------------------------------------------------------------------


def _pg_txn_params(rec: TxnRecord) -> tuple[Any, ...]:
    values = _txn_params(rec)  # types checked, PANs re-masked
    for i in _BOOL_AT:
        if type(values[i]) is not bool:  # asyncpg wants a real bool for BOOLEAN
            values = tuple(bool(v) if j in _BOOL_AT else v for j, v in enumerate(values))
            break
    return values


def _record(row: Sequence[Any]) -> TxnRecord:
    return TxnRecord(*row)


_SYNCHRONOUS = {"OFF": "off"}   # anything else: the server's (or the URL's) synchronous_commit


class IdBlocks:
    """Ids from a sequence counting in blocks (``INCREMENT BY block``).

    One ``nextval`` reserves ``block`` ids for this process, handed out in
    memory; the next block is fetched in the background once half of the
    current one is used, so ``next`` almost never waits for the server.
    """

    def __init__(self, store: PgWriter, sequence: str, block: int, ahead: bool = True) -> None:
        self._store = store
        self._sql = f"SELECT nextval('{sequence}')"
        self._block = block
        self._lock = threading.Lock()
        self._next = self._end = 0
        self._ahead: concurrent.futures.Future | None = store.submit(self._take()) if ahead else None

    def next(self) -> int:
        with self._lock:
            if self._next >= self._end:
                self._next_block()
            n = self._next
            self._next += 1
            if self._ahead is None and self._end - self._next <= self._block // 2 \
                    and not self._store.closed:
                self._ahead = self._store.submit(self._take())
            return n

    def _next_block(self) -> None:
        ahead, self._ahead = self._ahead, None
        try:
            start = ahead.result(30) if ahead is not None else None
        except Exception:
            start = None  # fetched ahead while the server was away: ask again now
        if start is None:
            if self._store.closed:
                raise JournalError(f"journal {self._store.path} is closed")
            try:
                start = self._store.submit(self._take()).result(30)
            except Exception as e:
                raise JournalError(f"journal {self._store.path}: cannot allocate ids: "
                                   f"{_describe(e)}") from None
        self._next, self._end = start, start + self._block

    async def _take(self) -> int:
        return await self._store._fetch(self._sql, (), one=True, flush=False)


class PgJournal:
    """Open with ``PgJournal.open(url, data_dir)``; see the module docstring."""

    def __init__(self, target: PgTarget, writer: PgWriter, readonly: bool,
                 blocks: Mapping[str, int] | None = None) -> None:
        self.path = target.display
        self.schema = target.schema
        self._target = target
        self._store = writer
        self._readonly = readonly
        self._closed = False
        self._ids = self._saf_ids = None
        if not readonly:
            blocks = blocks or {}
            self._ids = IdBlocks(writer, ID_SEQUENCE, blocks.get(ID_SEQUENCE, ID_BLOCK))
            # Advices are rare: their first block is fetched when the first one is queued.
            self._saf_ids = IdBlocks(writer, SAF_ID_SEQUENCE, blocks.get(SAF_ID_SEQUENCE, ID_BLOCK),
                                     ahead=False)

    # -- opening and closing ---------------------------------------------------

    @classmethod
    def open(cls, url: str, data_dir: str = "", *, readonly: bool = False,
             synchronous: str = "NORMAL", schema: str | None = None) -> PgJournal:
        """Open (creating the schema if needed) the journal ``url`` names.

        ``data_dir`` is unused (the SQLite journal's signature). ``readonly``:
        for a report or check: no writer, no ids, write calls raise; the
        journal must exist. ``synchronous="OFF"`` sets synchronous_commit off
        (a server crash may lose the last commits; never corrupts); any other
        value leaves the server's setting (on by default), which the URL may
        also set: ``?synchronous_commit=off``. ``schema`` overrides the URL's
        ``?schema=``.
        """
        target = pg_target(url, schema)
        try:
            if readonly:
                store = PgWriter(target, write=False, read_connections=1)
            else:
                store = PgWriter(target, synchronous_commit=_SYNCHRONOUS.get(synchronous.upper(), ""),
                                 prepare=_prepare, commuting=COMMUTING)
        except JournalError:
            raise
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise JournalError(f"cannot open journal {target.display}: {_describe(e)}") from None
        try:
            version = store.fetch("SELECT value FROM state WHERE key = 'schema_version'")
            version = version[0][0] if version else None
            blocks = dict(store.fetch("SELECT sequencename::text, increment_by FROM pg_sequences "
                                      "WHERE schemaname = $1", (target.schema,)))
        except asyncpg.UndefinedTableError:
            store.close()
            raise JournalError(f"no journal at {target.display}") from None
        except BaseException as e:
            store.close()
            if isinstance(e, Exception):
                raise JournalError(f"cannot read journal {target.display}: {_describe(e)}") from None
            raise
        if version is None:
            store.close()
            raise JournalError(f"{target.display} is not a cardswitch journal (no schema version)")
        try:
            _check_version(target, int(version))
        except JournalError:
            store.close()
            raise
        if not readonly:
            try:  # open_batch is tiny and changes fast: current statistics keep the
                # recovery query on the indexes (a never-analyzed table is assumed big)
                store.execute("ANALYZE open_batch")
            except Exception as e:
                log.warning("journal %s: ANALYZE open_batch failed: %s", target.display, _describe(e))
        return cls(target, store, readonly, blocks)

    def close(self) -> None:
        """Commit what is queued and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._store.close()

    def __enter__(self) -> PgJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- health and metrics ------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The writer runs and its last commit succeeded."""
        return not self._closed and self._store.healthy

    @property
    def last_write_latency(self) -> float:
        """Seconds from queueing to commit of the oldest write in the last group."""
        return 0.0 if self._readonly else self._store.last_latency_seconds

    @property
    def writer(self) -> PgWriter | None:
        """The writer (commit/row/failure counters, ``on_commit`` hook) for metrics."""
        return None if self._readonly else self._store

    def flush(self) -> None:
        """Return once every write queued before is committed (or failed)."""
        if not self._readonly and not self._closed:
            self._store.flush()

    # -- ids -----------------------------------------------------------------------

    def next_id(self) -> int:
        """A new txn id: unique across every node sharing the journal (see the docstring)."""
        if self._ids is None:
            raise JournalError("journal opened read-only: no ids to allocate")
        return self._ids.next()

    def next_saf_id(self) -> int:
        """A new advice id, allocated like ``next_id`` from its own sequence."""
        if self._saf_ids is None:
            raise JournalError("journal opened read-only: no ids to allocate")
        return self._saf_ids.next()

    # -- transactions --------------------------------------------------------------

    def insert(self, rec: TxnRecord, loop: asyncio.AbstractEventLoop | None = None
               ) -> asyncio.Future | None:
        """Write ahead the row of ``rec`` (pending, or already final)."""
        return self._write(TXN_INSERT, _pg_txn_params(rec), loop)

    def finish(self, rec: TxnRecord, loop: asyncio.AbstractEventLoop | None = None
               ) -> asyncio.Future | None:
        """Write the outcome of ``rec`` (``schema.FINISH_FIELDS``) onto its write-ahead row."""
        values = _pg_txn_params(rec)
        return self._write(TXN_FINISH, tuple(values[i] for i in schema.FINISH_INDEXES) + (rec.id,), loop)

    def mark_cancelled(self, orig_id: int, cancelled: str, by_id: int | None,
                       loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Mark the original ``orig_id`` reversed/voided/completed by ``by_id``."""
        return self._write(TXN_CANCEL, (cancelled, by_id, orig_id), loop)

    def set_late_response(self, txn_id: int, rc: str,
                          loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Keep the issuer's answer that came after ``txn_id`` timed out (for the operators)."""
        return self._write(TXN_LATE, (rc, txn_id), loop)

    def get(self, txn_id: int) -> TxnRecord | None:
        rows = self._select(TXN_SELECT + " WHERE id = $1", (txn_id,))
        return _record(rows[0]) if rows else None

    def last_issuer_stan(self, bank_id: str) -> str:
        """Field 11 of the newest request sent to ``bank_id`` ("" when none): a
        restarted link goes on from there rather than from 000001. With several
        nodes, "newest" is the highest id, which need not be this node's."""
        rows = self._select("SELECT issuer_stan FROM txn WHERE issuer_id = $1 AND issuer_stan <> '' "
                            "ORDER BY id DESC LIMIT 1", (bank_id,))
        return rows[0][0] if rows else ""

    def standin_usage(self, business_date: str) -> list[tuple[str, int, int]]:
        """(pan_token, count, amount) of the stand-in approvals of a business date."""
        return [tuple(r) for r in self._select(
            "SELECT pan_token, COUNT(*), COALESCE(SUM(amount), 0)::bigint FROM txn "
            "WHERE business_date = $1 AND stand_in AND status = $2 GROUP BY pan_token",
            (business_date, Status.APPROVED))]

    def load_for_recovery(self, business_dates: Iterable[str],
                          open_batches_only: bool = True) -> list[TxnRecord]:
        """The rows the switch keeps in memory after a restart, in id order.

        Every row of ``business_dates`` plus every row of a terminal batch
        still open (no 0500 answered 00). With ``open_batches_only=False``,
        also every row of the closed batches that have a row on those dates.
        """
        dates = sorted(set(business_dates))
        return [_record(r) for r in self._select(recovery_sql(open_batches_only), (dates,))]

    def pending(self) -> list[TxnRecord]:
        """Rows written ahead with no outcome (sent to an issuer before a crash)."""
        rows = self._select(TXN_SELECT + " WHERE status = $1 ORDER BY id", (Status.PENDING,))
        return [_record(r) for r in rows]

    def rows(self, business_date: str | None = None, terminal_id: str | None = None,
             limit: int | None = None) -> list[TxnRecord]:
        """Rows in id order; with ``limit``, the highest ``limit`` ids (still in id order)."""
        params: list[Any] = []
        where = _where(params, business_date=business_date, terminal_id=terminal_id)
        if limit is None:
            sql = f"{TXN_SELECT}{where} ORDER BY id"
        else:
            params.append(max(0, int(limit)))
            sql = f"{TXN_SELECT}{where} ORDER BY id DESC LIMIT ${len(params)}"
        rows = [_record(r) for r in self._select(sql, params)]
        if limit is not None:
            rows.reverse()
        return rows

    def count_by_status(self, business_date: str | None = None) -> dict[str, int]:
        params: list[Any] = []
        where = _where(params, business_date=business_date)
        rows = self._select(f"SELECT status, COUNT(*) FROM txn{where} GROUP BY status ORDER BY status",
                            params)
        return {status: n for status, n in rows}

    # -- store-and-forward -----------------------------------------------------------

    def saf_insert(self, entry: SafEntry, loop: asyncio.AbstractEventLoop | None = None
                   ) -> asyncio.Future | None:
        return self._write(SAF_INSERT, _saf_params(entry), loop)

    def saf_update(self, entry: SafEntry, loop: asyncio.AbstractEventLoop | None = None
                   ) -> asyncio.Future | None:
        """Write ``entry``'s state, attempts and last error."""
        if type(entry.attempts) is not int:
            raise TypeError("journal: advice attempts must be int")
        return self._write(SAF_UPDATE, (entry.state, entry.attempts, entry.last_error,
                                        entry.updated_at or _utc_now(), entry.id), loop)

    def saf_queued(self) -> list[SafEntry]:
        """Every advice still owed, oldest first (by id: per node, not across nodes)."""
        return self.saf_entries(state=QUEUED)

    def saf_entries(self, *, state: str | None = None, txn_id: int | None = None,
                    bank_id: str | None = None) -> list[SafEntry]:
        params: list[Any] = []
        where = _where(params, state=state, txn_id=txn_id, bank_id=bank_id)
        return [SafEntry(*r) for r in self._select(f"{SAF_SELECT}{where} ORDER BY id", params)]

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
        return self._write(BATCH_CLOSE_INSERT,
                           (terminal_id, batch, business_date, result, _utc_now(),
                            *_totals(switch_totals), *_totals(terminal_totals)), loop)

    def closed_batches(self) -> set[tuple[str, str]]:
        """(terminal_id, batch) of every batch closed by a 0500 answered 00."""
        rows = self._select("SELECT DISTINCT terminal_id, batch FROM batch_close WHERE result = $1",
                            (RC.APPROVED,))
        return {(t, b) for t, b in rows}

    def batch_closes(self, terminal_id: str | None = None,
                     batch: str | None = None) -> list[BatchClose]:
        """Every recorded 0500 (both results), oldest first: for the exception report."""
        params: list[Any] = []
        where = _where(params, terminal_id=terminal_id, batch=batch)
        rows = self._select(f"SELECT id, {', '.join(_BATCH_CLOSE_COLUMNS)} FROM batch_close{where} "
                            "ORDER BY id", params)
        out = []
        for r in rows:
            r = tuple(r)
            out.append(BatchClose(*r[:6], BatchTotals(*r[6:10]), BatchTotals(*r[10:14])))
        return out

    def record_upload(self, terminal_id: str, batch: str, fields: UploadRow,
                      loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Keep one 0320 row; an exact re-send is kept once."""
        if type(fields.amount) is not int:
            raise TypeError("journal: upload amount must be int (minor units)")
        return self._write(UPLOAD_INSERT,
                           (terminal_id, batch, fields.rrn, fields.stan, fields.proc, fields.amount,
                            fields.auth_code, _masked(fields.pan_masked), _utc_now()), loop)

    def uploads(self, terminal_id: str, batch: str) -> list[UploadRow]:
        rows = self._select(
            "SELECT rrn, stan, proc, amount, auth_code, pan_masked FROM batch_upload "
            "WHERE terminal_id = $1 AND batch = $2 ORDER BY id", (terminal_id, batch))
        return [UploadRow(*r) for r in rows]

    # -- switch state (shared by every node) -----------------------------------------

    def get_state(self, key: str) -> str | None:
        rows = self._select("SELECT value FROM state WHERE key = $1", (key,))
        return rows[0][0] if rows else None

    def set_state(self, key: str, value: str, loop: asyncio.AbstractEventLoop | None = None
                  ) -> asyncio.Future | None:
        if not isinstance(value, str):
            raise TypeError(f"journal state {key!r}: value must be str, not {type(value).__name__}")
        return self._write(STATE_UPSERT, (key, value, _utc_now()), loop)

    def state_items(self, prefix: str = "") -> dict[str, str]:
        """Every state key starting with ``prefix`` (e.g. the cutover history)."""
        rows = self._select("SELECT key, value FROM state WHERE starts_with(key, $1) ORDER BY key",
                            (prefix,))
        return {k: v for k, v in rows}

    # -- internals -----------------------------------------------------------------

    def _write(self, sql: str, params: tuple, loop: asyncio.AbstractEventLoop | None
               ) -> asyncio.Future | None:
        if self._readonly:
            raise JournalError("journal opened read-only: it cannot be written")
        try:
            return self._store.write(sql, params, loop)
        except WriterClosed:
            raise JournalError(f"journal {self.path} is closed") from None

    def _select(self, sql: str, params: Iterable[Any] = ()) -> list[asyncpg.Record]:
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        try:
            return self._store.fetch(sql, tuple(params))
        except WriterClosed:
            raise JournalError(f"journal {self.path} is closed") from None
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise JournalError(f"cannot read journal {self.path}: {_describe(e)}") from None


# -- settlement's reads ------------------------------------------------------------------------


class PgSettlementSource:
    """``cardswitch.settlement.source.SettlementSource`` over a PostgreSQL journal.

    The counterpart of ``SqliteSource``: its own connection holding one
    REPEATABLE READ, READ ONLY transaction for its whole life (every query of
    a settlement run sees the same journal while the switch nodes go on
    writing), candidates streamed through a server-side cursor, the same
    rows in the same order. Errors are ``SourceError`` naming the journal.
    """

    def __init__(self, url: str, schema_name: str | None = None) -> None:
        from cardswitch.settlement.counting import COUNTED_KINDS, UNDO_KINDS
        from cardswitch.settlement.source import SourceError

        self._error = SourceError
        self._counted = sorted(COUNTED_KINDS)
        self._undo = sorted(UNDO_KINDS)
        try:
            target = pg_target(url, schema_name)
        except JournalError as e:
            raise SourceError(str(e)) from None
        self.path = target.display
        try:
            self._store = PgWriter(target, write=False, snapshot=True)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise SourceError(f"cannot read journal {self.path}: {_describe(e)}") from None
        if self._one("SELECT to_regclass('txn') IS NOT NULL") is not True:
            self.close()
            raise SourceError(f"no journal at {self.path}: the switch has never run with this network file")

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> PgSettlementSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[asyncpg.Record]:
        try:
            return self._store.fetch(sql, params)
        except (WriterClosed, OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as e:
            raise self._error(f"cannot read journal {self.path}: {_describe(e)}") from None

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._all(sql, params)
        return rows[0][0] if rows else None

    # -- state ---------------------------------------------------------------------------

    def current_business_date(self) -> str | None:
        from cardswitch.switch.cutover import STATE_BUSINESS_DATE

        return self._one("SELECT value FROM state WHERE key = $1", (STATE_BUSINESS_DATE,))

    def count_pending(self, business_date: str) -> int:
        return self._one("SELECT COUNT(*) FROM txn WHERE business_date = $1 AND status = $2",
                         (business_date, Status.PENDING))

    # -- rows ----------------------------------------------------------------------------

    def iter_candidates(self, business_date: str, issuer: str | None = None) -> Iterator[TxnRecord]:
        # The SQLite source's column list (what settlement reads of a candidate;
        # constants for the rest): the same records, a third cheaper to read.
        from cardswitch.settlement import source

        select = getattr(source, "_CANDIDATE_SELECT", TXN_SELECT)
        sql = f"{select} WHERE business_date = $1 AND status = $2 AND kind = ANY($3::text[])"
        params: list[Any] = [business_date, Status.APPROVED, self._counted]
        if issuer is not None:
            sql += " AND (issuer_id = $4 OR to_issuer_id = $4)"
            params.append(issuer)
        sql += " ORDER BY rrn, id"
        try:
            for row in self._store.stream(sql, params):
                yield TxnRecord(*row)
        except (WriterClosed, OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as e:
            raise self._error(f"cannot read journal {self.path}: {_describe(e)}") from None

    def undo_rows_between(self, first: str, last: str) -> list[TxnRecord]:
        """Approved voids and reversals naming an original, dated first..last, by id."""
        return [_record(r) for r in self._all(
            f"{TXN_SELECT} WHERE business_date BETWEEN $1 AND $2 AND status = $3 "
            "AND kind = ANY($4::text[]) AND orig_id IS NOT NULL ORDER BY id",
            (first, last, Status.APPROVED, self._undo))]

    def rows_by_ids(self, ids: Iterable[int]) -> list[TxnRecord]:
        return [_record(r) for r in self._all(f"{TXN_SELECT} WHERE id = ANY($1::bigint[]) ORDER BY id",
                                              (sorted(set(ids)),))]

    def count_requests(self, business_date: str) -> int:
        """Every request of the date (from the date's index alone)."""
        return self._one("SELECT COUNT(*) FROM txn WHERE business_date = $1", (business_date,))

    # -- the report's inputs ---------------------------------------------------------------

    def request_mix(self, business_date: str) -> list[Any]:
        from cardswitch.settlement.source import MixRow

        rows = self._all("SELECT kind, status, response_code, COUNT(*), COALESCE(SUM(amount), 0)::bigint "
                         "FROM txn WHERE business_date = $1 GROUP BY kind, status, response_code "
                         "ORDER BY kind, status, response_code", (business_date,))
        return [MixRow(*r) for r in rows]

    def batch_closes_on(self, business_date: str) -> list[Any]:
        from cardswitch.settlement.source import BatchCloseRow

        rows = self._all(f"SELECT {', '.join(_BATCH_CLOSE_COLUMNS[:2])}, result, "
                         f"{', '.join(_BATCH_CLOSE_COLUMNS[5:])} FROM batch_close "
                         "WHERE business_date = $1 ORDER BY id", (business_date,))
        return [BatchCloseRow(r[0], r[1], r[2], tuple(r[3:7]), tuple(r[7:11])) for r in map(tuple, rows)]

    def uploads(self, terminal_id: str, batch: str) -> list[UploadRow]:
        rows = self._all("SELECT rrn, stan, proc, amount, auth_code, pan_masked FROM batch_upload "
                         "WHERE terminal_id = $1 AND batch = $2 ORDER BY id", (terminal_id, batch))
        return [UploadRow(*r) for r in rows]

    def batch_rows(self, terminal_id: str, batch: str) -> list[TxnRecord]:
        return [_record(r) for r in self._all(
            f"{TXN_SELECT} WHERE terminal_id = $1 AND batch = $2 ORDER BY id", (terminal_id, batch))]


# -- schema preparation ------------------------------------------------------------------------


def _check_version(target: PgTarget, version: int) -> None:
    if version > PG_SCHEMA_VERSION:
        raise JournalError(f"journal {target.display} has schema version {version}, newer than this "
                           f"cardswitch understands ({PG_SCHEMA_VERSION}): upgrade cardswitch")


async def _prepare(target: PgTarget) -> None:
    """Create or upgrade the schema, once even with several nodes starting together."""
    con = await asyncpg.connect(target.dsn, timeout=10)
    try:
        s = target.schema
        state = await con.fetchval("SELECT to_regclass($1)", f"{_ident(s)}.state")
        version = None
        if state is not None:
            version = await con.fetchval(f"SELECT value FROM {_ident(s)}.state "
                                         "WHERE key = 'schema_version'")
            if version is not None:
                _check_version(target, int(version))
        existing = await _existing_columns(con, s)
        if version is not None and int(version) == PG_SCHEMA_VERSION \
                and not missing_columns(s, existing):
            return  # the common case: nothing to change, no DDL lock taken
        async with con.transaction():
            # Nodes starting at once: one creates, the others wait, then find it all there.
            await con.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"cardswitch.journal:{s}")
            await con.execute(ddl(s))
            for stmt in missing_columns(s, await _existing_columns(con, s)):
                await con.execute(stmt)
            for table, name in (("txn", ID_SEQUENCE), ("saf", SAF_ID_SEQUENCE)):
                seq = f"{_ident(s)}.{name}"
                if await con.fetchval("SELECT to_regclass($1)", seq) is None:
                    # Seeded above any id already there (a journal copied in from elsewhere).
                    start = await con.fetchval(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {_ident(s)}.{table}")
                    await con.execute(f"CREATE SEQUENCE {seq} AS BIGINT INCREMENT BY {ID_BLOCK} "
                                      f"START WITH {int(start)}")
            await con.execute(
                f"INSERT INTO {_ident(s)}.state (key, value, updated_at) "
                "VALUES ('schema_version', $1, $2) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value, updated_at = excluded.updated_at "
                "WHERE state.value <> excluded.value", str(PG_SCHEMA_VERSION), _utc_now())
    finally:
        await _close_quietly(con)



async def _existing_columns(con: asyncpg.Connection, schema_name: str) -> set[tuple[str, str]]:
    rows = await con.fetch("SELECT table_name, column_name FROM information_schema.columns "
                           "WHERE table_schema = $1 AND table_name = ANY($2::text[])",
                           schema_name, list(_TABLE_COLUMNS))
    return {(t, c) for t, c in rows}
