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
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any

_STOP = object()

Statement = tuple[str, Sequence[Any]]


def connect(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("PRAGMA busy_timeout=5000")
    return con


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
        self._thread = threading.Thread(target=self._run, name=f"sqlite-writer:{path}", daemon=True)
        self._error: BaseException | None = None
        self.commits = 0
        self.rows = 0
        self.last_commit_seconds = 0.0
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    def write(self, sql: str, params: Sequence[Any] = (),
              loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Queue one statement. With ``loop``, return a future done at commit."""
        fut = loop.create_future() if loop is not None else None
        self._q.put((sql, params, fut, loop))
        return fut

    def write_many(self, stmts: Sequence[Statement],
                   loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Queue several statements that commit in the same batch."""
        fut = loop.create_future() if loop is not None else None
        self._q.put((None, stmts, fut, loop))
        return fut

    def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(con)`` on the writer thread after everything queued; wait for it."""
        done = threading.Event()
        box: list[Any] = []

        def job(con: sqlite3.Connection) -> None:
            try:
                box.append((True, fn(con)))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
            done.set()

        self._q.put((job, None, None, None))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def flush(self) -> None:
        self.call(lambda con: None)

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()
        self._con.close()

    # -- writer thread -------------------------------------------------------

    def _run(self) -> None:
        import time

        con = self._con
        while True:
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
            t0 = time.perf_counter()
            futures = []
            error: BaseException | None = None
            try:
                con.execute("BEGIN")
                for sql, params, fut, loop in batch:
                    if callable(sql):
                        con.execute("COMMIT")
                        sql(con)
                        con.execute("BEGIN")
                    elif sql is None:
                        for s, p in params:
                            con.execute(s, p)
                    else:
                        con.execute(sql, params)
                    if fut is not None:
                        futures.append((fut, loop))
                con.execute("COMMIT")
                self.commits += 1
                self.rows += len(batch)
            except BaseException as e:
                error = e
                self._error = e
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self.last_commit_seconds = time.perf_counter() - t0
            for fut, loop in futures:
                loop.call_soon_threadsafe(_resolve, fut, error)
            if stop:
                return


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
