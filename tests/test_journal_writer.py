"""The group-commit writer under the journal: failures stay contained, nothing
waits forever, close commits what was queued."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from cardswitch.storage.sqlite_writer import SqliteWriter, WriterClosed

SCHEMA = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);"
INSERT = "INSERT INTO t (id, v) VALUES (?, ?)"


@pytest.fixture
def writer(tmp_path):
    w = SqliteWriter(str(tmp_path / "w.db"), SCHEMA)
    yield w
    w.close()


def ids(w: SqliteWriter) -> list[int]:
    return w.call(lambda con: [r[0] for r in con.execute("SELECT id FROM t ORDER BY id")])


def hold(w: SqliteWriter):
    """Block the writer thread until the returned event is set: what is queued meanwhile
    lands in one batch."""
    release, started = threading.Event(), threading.Event()

    def job(con):
        started.set()
        release.wait(10)

    t = threading.Thread(target=w.call, args=(job,))
    t.start()
    assert started.wait(10)
    return release, t


def test_group_is_all_or_nothing_and_spares_the_batch(writer):
    async def main():
        loop = asyncio.get_running_loop()
        release, t = hold(writer)
        f1 = writer.write(INSERT, (1, "a"), loop)
        bad = writer.write_many([(INSERT, (2, "b")), (INSERT, (1, "again"))], loop)
        f3 = writer.write(INSERT, (3, "c"), loop)
        f4 = writer.write("INSERT INTO nowhere VALUES (1)", (), loop)
        release.set()
        t.join()
        await f1
        await f3
        with pytest.raises(sqlite3.IntegrityError):
            await bad
        with pytest.raises(sqlite3.OperationalError, match="nowhere"):
            await f4

    asyncio.run(main())
    assert ids(writer) == [1, 3]            # 2 went with its group
    assert writer.failed == 2 and writer.healthy
    assert isinstance(writer.last_error, sqlite3.IntegrityError)   # the first failure of the batch


def test_database_failure_makes_it_unhealthy_until_a_commit_succeeds(writer):
    async def main():
        loop = asyncio.get_running_loop()
        await writer.write(INSERT, (1, "a"), loop)
        writer.call(lambda con: con.execute("PRAGMA query_only=1"))   # as if the disk refused
        with pytest.raises(sqlite3.OperationalError):
            await writer.write(INSERT, (2, "b"), loop)
        assert not writer.healthy
        writer.call(lambda con: con.execute("PRAGMA query_only=0"))
        await writer.write(INSERT, (3, "c"), loop)
        assert writer.healthy

    asyncio.run(main())
    assert ids(writer) == [1, 3]


def test_call_returns_raises_and_never_leaves_a_transaction_open(writer):
    assert writer.call(lambda con: con.execute("SELECT 41 + 1").fetchone()[0]) == 42
    with pytest.raises(ZeroDivisionError):
        writer.call(lambda con: 1 / 0)

    def sloppy(con):
        con.execute("BEGIN")
        con.execute(INSERT, (9, "never committed"))

    writer.call(sloppy)
    writer.write(INSERT, (1, "a"))
    writer.flush()
    assert ids(writer) == [1]

    with pytest.raises(RuntimeError, match="deadlock"):
        writer.call(lambda con: writer.call(lambda c: None))


def test_close_commits_what_was_queued(tmp_path):
    path = str(tmp_path / "w.db")
    w = SqliteWriter(path, SCHEMA)
    for i in range(1, 1001):
        w.write(INSERT, (i, "x"))
    w.close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1000
    con.close()


def test_after_close_writes_fail_loudly(tmp_path):
    w = SqliteWriter(str(tmp_path / "w.db"), SCHEMA)
    w.close()
    w.close()
    assert not w.healthy and w.closed
    with pytest.raises(WriterClosed):
        w.write(INSERT, (1, "a"))
    with pytest.raises(WriterClosed):
        w.write_many([(INSERT, (1, "a"))])
    with pytest.raises(WriterClosed):
        w.flush()


def test_a_closed_event_loop_does_not_stop_the_writer(writer):
    loop = asyncio.new_event_loop()
    release, t = hold(writer)
    writer.write(INSERT, (1, "a"), loop)         # its loop goes away before the commit
    loop.close()
    release.set()
    t.join()

    async def main():
        await writer.write(INSERT, (2, "b"), asyncio.get_running_loop())

    asyncio.run(main())
    assert ids(writer) == [1, 2] and writer.healthy


def test_a_dead_writer_thread_fails_what_waits(tmp_path):
    w = SqliteWriter(str(tmp_path / "w.db"), SCHEMA)

    def broken(batch):
        raise RuntimeError("bug in the writer")

    async def main():
        loop = asyncio.get_running_loop()
        release, t = hold(w)
        w._process = broken                          # the next batch kills the thread
        f1 = w.write(INSERT, (1, "a"), loop)
        f2 = w.write(INSERT, (2, "b"), loop)
        release.set()
        t.join()
        for f in (f1, f2):
            with pytest.raises(RuntimeError, match="bug in the writer"):
                await f

    asyncio.run(main())
    w._thread.join(10)
    assert not w.healthy
    with pytest.raises(WriterClosed):
        w.write(INSERT, (3, "c"))
    with pytest.raises(WriterClosed):
        w.flush()
    w.close()


def test_on_commit_hook_and_counters(writer):
    seen: list[tuple[int, float]] = []
    writer.on_commit = lambda n, latency: seen.append((n, latency))
    release, t = hold(writer)
    for i in range(1, 11):
        writer.write(INSERT, (i, "x"))
    release.set()
    t.join()
    writer.flush()
    assert seen and sum(n for n, _ in seen) == 10 and all(lat >= 0 for _, lat in seen)
    assert writer.rows >= 10 and writer.commits >= 1

    def boom(n, latency):
        raise ValueError("metrics bug")

    writer.on_commit = boom
    writer.write(INSERT, (11, "x"))
    writer.flush()
    assert ids(writer)[-1] == 11 and writer.healthy
