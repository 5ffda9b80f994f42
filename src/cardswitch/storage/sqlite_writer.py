"""Group commit for SQLite, off the event loop.

Writes are queued from the event loop and applied by one thread in batches:
one transaction (one WAL commit) for everything queued in the last few
milliseconds, never one commit per row. ``write`` returns a future that
resolves once the batch holding it is committed, so a caller that must not
answer before its row is durable awaits it; callers that need not, don't.

WAL with synchronous=NORMAL: a commit survives the process being killed
(-9) because it is in the OS page cache and the WAL; only a power loss can
lose the last commits. That is the trade we choose for a switch on one
machine; ``synchronous="FULL"`` is one argument away.

Failures are contained. A statement that fails on its own (a constraint, a
bad parameter) fails only its own future: the batch is replayed with one
savepoint per write so that every other write in it still commits. A
failure of the database itself (disk full, I/O error, locked too long)
fails the whole batch and makes ``healthy`` false until a commit succeeds
again. Nothing waits forever: writes after ``close`` raise ``WriterClosed``
and anything still queued when the thread ends is failed with it.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("cardswitch.storage")

Statement = tuple[str, Sequence[Any]]

_STOP = object()

# Queue items: (kind, a, b, fut, loop, enqueued_at)
#   _WRITE: a = sql, b = params       _MANY: a = None, b = [(sql, params), ...]
#   _CALL:  a = job(con) -> None, b = None, fut = None
_WRITE, _MANY, _CALL = 0, 1, 2

# Primary result codes that mean the database, not the statement, failed:
# replaying the batch row by row would only fail again.
_ENVIRONMENT_CODES = frozenset({
    5,   # SQLITE_BUSY
    6,   # SQLITE_LOCKED
    7,   # SQLITE_NOMEM
    8,   # SQLITE_READONLY
    10,  # SQLITE_IOERR
    11,  # SQLITE_CORRUPT
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    15,  # SQLITE_PROTOCOL
    26,  # SQLITE_NOTADB
})


class WriterClosed(RuntimeError):
    """The writer is closed (or its thread has ended): nothing more is written."""


def connect(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("PRAGMA busy_timeout=5000")
    return con


def is_environment_error(e: BaseException) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _ENVIRONMENT_CODES


class SqliteWriter:
    """One writer thread per database file."""

    def __init__(self, path: str, schema: str = "", synchronous: str = "NORMAL",
                 max_batch: int = 2000) -> None:
        self.path = path
        self._con = connect(path, synchronous)
        if schema:
            self._con.executescript(schema)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._max_batch = max_batch
        self._closed = False
        self._close_lock = threading.Lock()
        self._error: BaseException | None = None     # of the last commit; None when it succeeded
        self.last_error: BaseException | None = None  # last failure of any kind, kept for operators
        self.commits = 0
        self.rows = 0                 # writes committed (a write_many counts once)
        self.failed = 0               # writes whose future got an error (or would have)
        self.last_commit_seconds = 0.0  # time to apply and commit the last batch
        self.last_latency_seconds = 0.0  # oldest write of the last batch: queued -> committed
        # Called on the writer thread after each successful commit with
        # (writes, latency_seconds); must be quick and must not raise.
        self.on_commit: Callable[[int, float], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"sqlite-writer:{path}", daemon=True)
        self._thread.start()
        # A process that exits without close() still commits what it queued.
        ref = weakref.ref(self)
        self._atexit = lambda: (w := ref()) is not None and w.close()
        atexit.register(self._atexit)

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._closed and self._thread.is_alive()

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, sql: str, params: Sequence[Any] = (),
              loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Queue one statement. With ``loop``, return a future done at commit."""
        fut = loop.create_future() if loop is not None else None
        self._put((_WRITE, sql, params, fut, loop, time.perf_counter()))
        return fut

    def write_many(self, stmts: Sequence[Statement],
                   loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Queue several statements that commit in the same batch, all or none."""
        fut = loop.create_future() if loop is not None else None
        self._put((_MANY, None, list(stmts), fut, loop, time.perf_counter()))
        return fut

    def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(con)`` on the writer thread after everything queued; wait for it.

        Everything queued before is committed when ``fn`` runs; ``fn`` gets the
        connection outside any transaction (autocommit) and must leave it so.
        """
        done = threading.Event()
        box: list[tuple[bool, Any]] = []

        def job(con: sqlite3.Connection | None) -> None:
            try:
                if con is None:
                    raise WriterClosed(f"sqlite writer for {self.path} is closed")
                box.append((True, fn(con)))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
            finally:
                if con is not None:
                    _rollback(con)  # fn left a transaction open: it must not swallow later writes
                done.set()

        if threading.current_thread() is self._thread:
            raise RuntimeError("SqliteWriter.call from the writer thread would deadlock")
        self._put((_CALL, job, None, None, None, 0.0))
        while not done.wait(0.5):
            if not self._thread.is_alive():
                self._drain()     # the thread died under us: release ourselves
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def flush(self) -> None:
        """Return once everything queued before is committed (or failed)."""
        self.call(lambda con: None)

    def close(self) -> None:
        """Commit what is queued, stop the thread, close the connection. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._q.put(_STOP)
        atexit.unregister(self._atexit)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self._drain()
        self._con.close()

    def _put(self, item: tuple) -> None:
        with self._close_lock:
            if self._closed or not self._thread.is_alive():
                raise WriterClosed(f"sqlite writer for {self.path} is closed")
            self._q.put(item)

    # -- writer thread -------------------------------------------------------

    def _run(self) -> None:
        batch: list[tuple] = []
        try:
            while True:
                batch = []
                item = self._q.get()
                if item is _STOP:
                    return
                batch = [item]
                stop = False
                while len(batch) < self._max_batch:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    batch.append(nxt)
                self._process(batch)
                if stop:
                    return
        except BaseException as e:  # a bug here must not leave callers waiting
            self._error = self.last_error = e
            log.exception("sqlite writer thread for %s failed", self.path)
            _rollback(self._con)
            self._fail(batch, e)  # those not already answered
        finally:
            with self._close_lock:
                self._closed = True
            self._drain()

    def _process(self, batch: list[tuple]) -> None:
        writes: list[tuple] = []
        for item in batch:
            if item[0] == _CALL:
                if writes:
                    self._commit(writes)
                    writes = []
                item[1](self._con)
            else:
                writes.append(item)
        if writes:
            self._commit(writes)

    def _commit(self, items: list[tuple]) -> None:
        con = self._con
        t0 = time.perf_counter()
        errors: list[BaseException | None] | None = None
        try:
            con.execute("BEGIN")
            _apply_fast(con, items)
            con.execute("COMMIT")
        except Exception as e:
            _rollback(con)
            if is_environment_error(e):
                errors = [e] * len(items)
            else:
                errors = self._replay(items)
        account_group(self, items, errors, t0, "sqlite writer", is_environment_error, _describe)
        self._resolve(items, errors)

    def _replay(self, items: list[tuple]) -> list[BaseException | None]:
        """One savepoint per write: only the writes that fail on their own fail."""
        con = self._con
        errors: list[BaseException | None] = []
        try:
            con.execute("BEGIN")
            for item in items:
                con.execute("SAVEPOINT w")
                try:
                    _apply_one(con, item)
                except Exception as e:
                    con.execute("ROLLBACK TO w")
                    errors.append(e)
                else:
                    errors.append(None)
                con.execute("RELEASE w")
            con.execute("COMMIT")
        except Exception as e:  # the database itself failed: nothing committed
            _rollback(con)
            return [e] * len(items)
        return errors

    @staticmethod
    def _resolve(items: list[tuple], errors: list[BaseException | None] | None) -> None:
        # One wake-up per event loop per batch, not one per future.
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

    def _drain(self) -> None:
        """Fail everything still queued: the thread is gone."""
        items = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                items.append(item)
        self._fail(items, WriterClosed(f"sqlite writer for {self.path} is closed"))

    def _fail(self, items: list[tuple], error: BaseException) -> None:
        writes = [item for item in items if item[0] != _CALL]
        for item in items:
            if item[0] == _CALL:
                item[1](None)  # a job that already ran keeps its first answer
        self.failed += sum(1 for item in writes if item[3] is None or not item[3].done())
        self._resolve(writes, [error] * len(writes))


def _apply_fast(con: sqlite3.Connection, items: list[tuple]) -> None:
    # Runs of the same statement (the journal's inserts) go through executemany.
    run_sql: str | None = None
    run: list = []
    for kind, sql, params, _fut, _loop, _t in items:
        if kind == _WRITE:
            if sql == run_sql:
                run.append(params)
                continue
            if run:
                con.executemany(run_sql, run)
            run_sql, run = sql, [params]
        else:
            if run:
                con.executemany(run_sql, run)
                run_sql, run = None, []
            for s, p in params:
                con.execute(s, p)
    if run:
        con.executemany(run_sql, run)


def _apply_one(con: sqlite3.Connection, item: tuple) -> None:
    kind, sql, params = item[0], item[1], item[2]
    if kind == _WRITE:
        con.execute(sql, params)
    else:
        for s, p in params:
            con.execute(s, p)


def _rollback(con: sqlite3.Connection) -> None:
    try:
        if con.in_transaction:
            con.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _describe(e: BaseException) -> str:
    # The exception text names the problem; parameters (row values) are never logged.
    return f"{type(e).__name__}: {e}"


def _resolve_all(done: list[tuple[asyncio.Future, BaseException | None]]) -> None:
    for fut, error in done:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def account_group(writer, items: list[tuple], errors: list[BaseException | None] | None, t0: float,
                  label: str, is_env: Callable[[BaseException], bool],
                  describe: Callable[[BaseException], str]) -> None:
    """Counters, health and the on_commit hook after one group of writes.

    Shared by this writer and the PostgreSQL journal's: ``items`` are queue
    entries whose sixth element is the time they were queued; ``errors`` is
    None when the whole group committed, else one entry per item.
    """
    t1 = time.perf_counter()
    failed = 0 if errors is None else sum(1 for e in errors if e is not None)
    writer.last_commit_seconds = t1 - t0
    if failed < len(items):
        writer._error = None
        writer.commits += 1
        writer.rows += len(items) - failed
        writer.last_latency_seconds = t1 - items[0][5]
        if writer.on_commit is not None:
            try:
                writer.on_commit(len(items) - failed, writer.last_latency_seconds)
            except Exception:
                log.exception("%s on_commit hook failed", label)
    if failed:
        assert errors is not None
        writer.failed += failed
        first = next(e for e in errors if e is not None)
        writer.last_error = first
        if failed == len(items) and is_env(first):
            writer._error = first
        log.error("%s %s: %d of %d writes failed: %s", label, writer.path, failed, len(items), describe(first))
