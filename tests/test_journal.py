"""The transaction journal: durability across restarts, recovery queries,
batches and uploads, state, commit-before-resolve, and no PAN on disk."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.pan import mask_pan, pan_token
from cardswitch.switch import journal_schema as schema
from cardswitch.switch.journal import (
    BatchTotals,
    Journal,
    JournalError,
    UploadRow,
    sqlite_path,
)
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord

PAN = "6221260000000017"
TO_PAN = "6228480000000012"
SECRET = b"test-secret"


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/j/journal.db"


@pytest.fixture
def journal(tmp_path):
    j = Journal.open(url(tmp_path), str(tmp_path))
    yield j
    j.close()


def record(j: Journal, *, date="2026-01-15", terminal="POS00001", batch="000001", stan=None,
           kind=Kind.PURCHASE, amount=1000, status=Status.PENDING, pan=PAN, **kw) -> TxnRecord:
    txn_id = j.next_id()
    return TxnRecord(
        id=txn_id, business_date=date, received_at="2026-01-15T10:00:00.123456Z", mti="0200",
        proc="000000", kind=kind, amount=amount, currency="156", terminal_id=terminal,
        merchant_id="898440154110001", stan=stan or f"{txn_id:06d}", transmitted="0115100000",
        batch=batch, pan_masked=mask_pan(pan), pan_token=pan_token(pan, SECRET), acquirer_id="BANKA",
        status=status, **kw)


def approve(rec: TxnRecord, **kw) -> TxnRecord:
    rec.status = Status.APPROVED
    rec.response_code = "00"
    rec.auth_code = "A1B2C3"
    rec.rrn = f"6015{rec.id:08d}"
    rec.issuer_id = "BANKB"
    rec.issuer_stan = "000777"
    rec.issuer_transmitted = "0115100001"
    rec.completed_at = "2026-01-15T10:00:00.223456Z"
    rec.latency_us = 1234
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


# -- opening ------------------------------------------------------------------------


def test_url_schemes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///var/journal.db", "data") == "var/journal.db"
    assert sqlite_path("sqlite:////abs/j.db", "data") == "/abs/j.db"
    assert sqlite_path("", "data") == os.path.join("data", "journal.db")
    with pytest.raises(JournalError, match="postgresql:// journals arrive with the settlement issue"):
        Journal.open("postgresql://user@localhost/cardswitch", "var")
    for bad in ("mysql://x/y", "sqlite://relative.db", "journal.db", "sqlite:///", "sqlite:///:memory:"):
        with pytest.raises(JournalError):
            Journal.open(bad, "var")


def test_relative_path_is_relative_to_cwd_and_parents_are_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Journal.open("sqlite:///deep/er/journal.db", "ignored") as j:
        j.insert(record(j))
    assert (tmp_path / "deep" / "er" / "journal.db").exists()


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(JournalError, match="junk.db"):
        Journal.open(f"sqlite:///{bad}", str(tmp_path))


def test_second_writer_is_refused_readonly_reader_is_not(tmp_path):
    j = Journal.open(url(tmp_path), str(tmp_path))
    rec = approve(record(j))
    j.insert(rec)
    j.flush()
    with pytest.raises(JournalError, match="readonly=True"):
        Journal.open(url(tmp_path), str(tmp_path))
    ro = Journal.open(url(tmp_path), str(tmp_path), readonly=True)
    assert ro.rows() == [rec]
    with pytest.raises(JournalError, match="read-only"):
        ro.insert(rec)
    with pytest.raises(JournalError, match="read-only"):
        ro.next_id()
    # The reader sees what the writer commits later.
    rec2 = record(j)
    j.insert(rec2)
    j.flush()
    assert [r.id for r in ro.rows()] == [rec.id, rec2.id]
    ro.close()
    j.close()
    with Journal.open(url(tmp_path), str(tmp_path)) as again:   # the lock went with close()
        assert len(again.rows()) == 2


def test_readonly_needs_an_existing_journal(tmp_path):
    with pytest.raises(JournalError, match="no journal"):
        Journal.open(url(tmp_path), str(tmp_path), readonly=True)


def test_schema_version_and_newer_journal_refused(tmp_path):
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        assert j.get_state("schema_version") == str(schema.SCHEMA_VERSION)
    path = sqlite_path(url(tmp_path), str(tmp_path))
    con = sqlite3.connect(path)
    con.execute("UPDATE state SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(JournalError, match="newer"):
        Journal.open(url(tmp_path), str(tmp_path))


def test_older_journal_gains_new_record_fields(tmp_path):
    """A field added to TxnRecord (with a default) becomes a column on open."""
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        old = approve(record(j))
        j.insert(old)
    path = sqlite_path(url(tmp_path), str(tmp_path))
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE txn DROP COLUMN to_auth_code")   # as a journal from before that field
    con.commit()
    con.close()
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        assert j.rows() == [old]
        new = approve(record(j), to_auth_code="XYZ123")
        j.insert(new)
        assert j.get(new.id).to_auth_code == "XYZ123"


def test_schema_has_a_column_per_field_and_none_for_secrets():
    fields = [f.name for f in dataclasses.fields(TxnRecord)]
    assert list(schema.TXN_FIELDS) == fields
    assert not set(fields) & schema.FORBIDDEN_COLUMNS
    con = sqlite3.connect(":memory:")
    con.executescript(schema.DDL)
    for table in ("txn", "batch_close", "batch_upload", "state", "open_batch"):
        cols = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
        assert cols and not cols & schema.FORBIDDEN_COLUMNS, table
    indexed = {tuple(r[2] for r in con.execute(f"PRAGMA index_info({name})"))
               for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                          "AND tbl_name='txn'")}
    assert {("business_date",), ("terminal_id", "batch"),
            ("rrn",), ("status",)} <= indexed


# -- records ----------------------------------------------------------------------


def test_round_trip_across_restart(tmp_path):
    j = Journal.open(url(tmp_path), str(tmp_path))
    a = approve(record(j), stand_in=True, orig_id=None)
    b = record(j, kind=Kind.TRANSFER, to_pan_masked=mask_pan(TO_PAN),
               to_pan_token=pan_token(TO_PAN, SECRET), to_issuer_id="BANKC")
    c = approve(record(j, kind=Kind.VOID), orig_id=a.id)
    for r in (a, b, c):
        j.insert(r)
    j.mark_cancelled(a.id, Cancel.VOIDED, c.id)
    a.cancelled, a.cancelled_by = Cancel.VOIDED, c.id
    j.close()

    j = Journal.open(url(tmp_path), str(tmp_path))
    try:
        got = j.rows()
        assert got == [a, b, c]
        assert got[0].stand_in is True and got[1].stand_in is False
        assert got[1].orig_id is None and got[2].orig_id == a.id
        assert type(got[0].amount) is int
        assert j.next_id() == c.id + 1          # seeded from MAX(id)
        assert j.get(b.id) == b and j.get(10**9) is None
    finally:
        j.close()


def test_ids_continue_after_restart_of_an_empty_journal(tmp_path):
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        assert j.next_id() == 1
        assert j.next_id() == 2                 # allocated, never written
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        assert j.next_id() == 1                 # nothing written: nothing to collide with


def test_insert_takes_the_record_as_it_is_at_the_call(journal):
    rec = record(journal)
    journal.insert(rec)
    rec.status = Status.APPROVED               # changed after the call, before the writer ran
    rec.amount = 999_999
    assert journal.get(rec.id).status == Status.PENDING
    assert journal.get(rec.id).amount == 1000


def test_finish_writes_the_outcome_only(journal):
    orig = approve(record(journal))
    journal.insert(orig)
    rev = record(journal)
    journal.insert(rev)
    # The reversal overtakes the original's finish: the cancel mark must survive it.
    journal.mark_cancelled(rev.id, Cancel.REVERSED, orig.id)
    approve(rev, response_code="00", to_issuer_stan="000888", to_auth_code="QQ")
    rev.terminal_id = "SOMEONE_ELSE"           # request facts are not finish's to change
    rev.amount = 5
    journal.finish(rev)
    got = journal.get(rev.id)
    assert got.status == Status.APPROVED and got.auth_code == "A1B2C3" and got.rrn == rev.rrn
    assert got.issuer_stan == "000777" and got.latency_us == 1234
    assert got.to_issuer_stan == "000888" and got.to_auth_code == "QQ"
    assert got.cancelled == Cancel.REVERSED and got.cancelled_by == orig.id
    assert got.terminal_id == "POS00001" and got.amount == 1000

def test_mark_cancelled_without_by_id(journal):
    rec = approve(record(journal))
    journal.insert(rec)
    journal.mark_cancelled(rec.id, Cancel.REVERSED, None)
    got = journal.get(rec.id)
    assert got.cancelled == Cancel.REVERSED and got.cancelled_by is None


def test_money_must_be_int(journal):
    rec = record(journal)
    rec.amount = 10.5  # type: ignore[assignment]
    with pytest.raises(TypeError, match="minor units"):
        journal.insert(rec)
    with pytest.raises(TypeError):
        journal.record_batch_close("T", "000001", "2026-01-15", "00",
                                   BatchTotals(0, 1.5, 0, 0), BatchTotals())  # type: ignore[arg-type]
    assert journal.rows() == []
    assert journal.healthy


def test_pending(journal):
    sent = record(journal)
    journal.insert(sent)                               # written ahead, then the crash
    done = record(journal)
    journal.insert(done)
    journal.finish(approve(done))
    local = record(journal, status=Status.DECLINED, response_code="14")
    journal.insert(local)
    assert journal.pending() == [sent]


def test_rows_filters_limit_and_counts(journal):
    recs = []
    for i in range(6):
        r = record(journal, date="2026-01-15" if i < 4 else "2026-01-16",
                   terminal="POS00001" if i % 2 else "POS00002")
        if i % 3 == 0:
            approve(r)
        journal.insert(r)
        recs.append(r)
    assert journal.rows() == recs
    assert journal.rows(business_date="2026-01-16") == recs[4:]
    assert journal.rows(terminal_id="POS00001") == recs[1::2]
    assert journal.rows(business_date="2026-01-15", terminal_id="POS00002") == [recs[0], recs[2]]
    assert journal.rows(limit=2) == recs[-2:]           # the newest, in id order
    assert journal.rows(limit=0) == []
    assert journal.count_by_status() == {Status.APPROVED: 2, Status.PENDING: 4}
    assert journal.count_by_status("2026-01-16") == {Status.PENDING: 2}


# -- recovery -------------------------------------------------------------------------


def test_load_for_recovery(tmp_path):
    j = Journal.open(url(tmp_path), str(tmp_path))
    old_open = approve(record(j, date="2026-01-10", terminal="T1", batch="000007"))
    old_closed = approve(record(j, date="2026-01-10", terminal="T2", batch="000003"))
    old_open_95 = approve(record(j, date="2026-01-11", terminal="T3", batch="000004"))
    old_no_batch = record(j, date="2026-01-11", terminal="T1", batch="", kind=Kind.NETWORK,
                          status=Status.APPROVED)
    today = [approve(record(j, date="2026-01-15", terminal="T2", batch="000004")),
             record(j, date="2026-01-15", terminal="T1", batch="", kind=Kind.NETWORK)]
    closed_today = approve(record(j, date="2026-01-15", terminal="T4", batch="000001"))
    closed_yesterday = approve(record(j, date="2026-01-14", terminal="T4", batch="000001"))
    for r in (old_open, old_closed, old_open_95, old_no_batch, *today, closed_today, closed_yesterday):
        j.insert(r)
    t = BatchTotals(0, 0, 1, 1000)
    j.record_batch_close("T2", "000003", "2026-01-10", "00", t, t)
    j.record_batch_close("T3", "000004", "2026-01-11", "95", t, BatchTotals(0, 0, 2, 2000))
    j.record_batch_close("T4", "000001", "2026-01-15", "00", t, t)
    # A late request on a closed batch (answered 12) does not reopen it.
    late = record(j, date="2026-01-12", terminal="T2", batch="000003", status=Status.DECLINED)
    j.insert(late)
    j.close()

    j = Journal.open(url(tmp_path), str(tmp_path))
    try:
        got = j.load_for_recovery(["2026-01-15"])
        assert got == sorted([old_open, old_open_95, *today, closed_today], key=lambda r: r.id)
        assert j.load_for_recovery([]) == [old_open, old_open_95, today[0]]
        both = j.load_for_recovery(["2026-01-15", "2026-01-11", "2026-01-15"])
        assert [r.id for r in both] == sorted({r.id for r in (old_open, old_open_95, old_no_batch,
                                                               *today, closed_today)})
        # Whole batches of those dates, closed ones too.
        whole = j.load_for_recovery(["2026-01-15"], open_batches_only=False)
        assert whole == sorted([old_open, old_open_95, *today, closed_today, closed_yesterday],
                               key=lambda r: r.id)
        assert j.closed_batches() == {("T2", "000003"), ("T4", "000001")}
    finally:
        j.close()


def test_batch_closed_after_95_and_trailer(journal):
    r = approve(record(journal, terminal="T9", batch="000002"))
    journal.insert(r)
    ours, theirs = BatchTotals(1, 500, 2, 3000), BatchTotals(1, 500, 3, 4000)
    journal.record_batch_close("T9", "000002", "2026-01-15", "95", ours, theirs)
    assert ("T9", "000002") not in journal.closed_batches()
    assert journal.load_for_recovery([]) == [r]
    journal.record_batch_close("T9", "000002", "2026-01-15", "00", ours, theirs)   # 960000 trailer
    assert journal.closed_batches() == {("T9", "000002")}
    assert journal.load_for_recovery([]) == []
    closes = journal.batch_closes("T9", "000002")
    assert [(c.result, c.switch_totals, c.terminal_totals) for c in closes] == [
        ("95", ours, theirs), ("00", ours, theirs)]
    assert closes[0].business_date == "2026-01-15" and closes[0].closed_at.endswith("Z")
    assert journal.batch_closes("T9", "000009") == []
    with pytest.raises(ValueError):
        journal.record_batch_close("T9", "000002", "2026-01-15", "12", ours, theirs)


def test_uploads(journal):
    a = UploadRow(rrn="601500000001", stan="000011", proc="000000", amount=1500,
                  auth_code="AB12", pan_masked=mask_pan(PAN))
    b = UploadRow(rrn="601500000002", stan="000012", proc="200000", amount=700,
                  auth_code="", pan_masked=mask_pan(TO_PAN))
    journal.record_upload("T1", "000005", a)
    journal.record_upload("T1", "000005", b)
    journal.record_upload("T1", "000005", a)          # the same 0320 again: kept once
    journal.record_upload("T2", "000005", a)
    changed = dataclasses.replace(a, amount=1600)     # differs: kept
    journal.record_upload("T1", "000005", changed)
    assert journal.uploads("T1", "000005") == [a, b, changed]
    assert journal.uploads("T2", "000005") == [a]
    assert journal.uploads("T1", "000006") == []


def test_state(tmp_path):
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        assert j.get_state("business_date") is None
        j.set_state("business_date", "2026-01-15")
        assert j.get_state("business_date") == "2026-01-15"   # read after write, no flush needed
        j.set_state("business_date", "2026-01-16")
        j.set_state("cutover:2026-01-15", "2026-01-15T15:00:00Z")
        j.set_state("cutover:2026-01-16", "2026-01-16T15:00:00Z")
        j.set_state("rrn:6015", "20000")
        with pytest.raises(TypeError):
            j.set_state("rrn:6015", 30000)  # type: ignore[arg-type]
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        assert j.get_state("business_date") == "2026-01-16"
        assert j.get_state("rrn:6015") == "20000"
        assert j.state_items("cutover:") == {"cutover:2026-01-15": "2026-01-15T15:00:00Z",
                                             "cutover:2026-01-16": "2026-01-16T15:00:00Z"}


# -- the event loop side ------------------------------------------------------------


def _blocked(journal: Journal):
    """Hold the writer thread until the returned event is set."""
    release, started = threading.Event(), threading.Event()

    def hold(con):
        started.set()
        release.wait(10)

    t = threading.Thread(target=journal.writer.call, args=(hold,))
    t.start()
    assert started.wait(10)
    return release, t


def _visible(path: str, txn_id: int) -> bool:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT COUNT(*) FROM txn WHERE id = ?", (txn_id,)).fetchone()[0] == 1
    finally:
        con.close()


def test_futures_resolve_only_after_commit(journal):
    seen_at_resolution: list[bool] = []

    async def main():
        loop = asyncio.get_running_loop()
        release, holder = _blocked(journal)
        rec = approve(record(journal))
        fut = journal.insert(rec, loop)
        fut.add_done_callback(lambda f: seen_at_resolution.append(_visible(journal.path, rec.id)))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not fut.done()                       # the writer cannot have committed it
        assert not _visible(journal.path, rec.id)
        release.set()
        await fut
        holder.join()
        assert fut.result() is None

    asyncio.run(main())
    assert seen_at_resolution == [True]             # committed before the future was done


def test_concurrent_writes_from_the_loop_are_grouped(journal):
    n = 300
    first_resumed: list[tuple[int, int]] = []

    async def main():
        loop = asyncio.get_running_loop()
        release, holder = _blocked(journal)
        write_aheads: list[asyncio.Future] = []

        async def txn(i: int) -> None:
            rec = record(journal, terminal=f"T{i % 7}", amount=100 + i)
            fut = journal.insert(rec, loop)         # write ahead
            write_aheads.append(fut)
            await fut
            if not first_resumed:                   # nothing else was queued before this point
                first_resumed.append((journal.writer.commits, sum(f.done() for f in write_aheads)))
            await journal.finish(approve(rec), loop)

        tasks = [asyncio.create_task(txn(i)) for i in range(n)]
        await asyncio.sleep(0)                      # every task has queued its insert
        assert len(write_aheads) == n and not any(f.done() for f in write_aheads)
        commits = journal.writer.commits
        release.set()
        await asyncio.gather(*tasks)
        holder.join()
        assert first_resumed == [(commits + 1, n)]  # all 300 write-aheads in one commit

    asyncio.run(main())
    rows = journal.rows()
    assert len(rows) == n and all(r.status == Status.APPROVED for r in rows)
    assert sorted(r.amount for r in rows) == [100 + i for i in range(n)]
    assert journal.writer.commits < 2 * n
    assert journal.healthy and journal.last_write_latency > 0


def test_writes_on_uvloop(journal):
    uvloop = pytest.importorskip("uvloop")

    async def main():
        loop = asyncio.get_running_loop()
        recs = [approve(record(journal)) for _ in range(50)]
        await asyncio.gather(*(journal.insert(r, loop) for r in recs))
        await journal.set_state("k", "v", loop)
        await journal.record_upload("T", "000001", UploadRow("r", "s", "p", 1, "", ""), loop)
        await journal.record_batch_close("T", "000001", "2026-01-15", "00",
                                         BatchTotals(), BatchTotals(), loop)
        await journal.mark_cancelled(recs[0].id, Cancel.REVERSED, recs[1].id, loop)
        return recs

    recs = uvloop.run(main())
    assert len(journal.rows()) == 50 and journal.get(recs[0].id).cancelled == Cancel.REVERSED


def test_health_and_close(tmp_path):
    j = Journal.open(url(tmp_path), str(tmp_path))
    assert j.healthy
    j.insert(record(j))
    j.close()
    j.close()                                       # idempotent
    assert not j.healthy
    with pytest.raises(JournalError, match="closed"):
        j.insert(record(j))
    with pytest.raises(JournalError, match="closed"):
        j.rows()


def test_failed_write_reaches_its_future_and_spares_the_others(journal):
    async def main():
        loop = asyncio.get_running_loop()
        release, holder = _blocked(journal)
        a = record(journal)
        fa = journal.insert(a, loop)
        dup = journal.insert(a, loop)               # same id again: a constraint error
        b = record(journal)
        fb = journal.insert(b, loop)
        release.set()
        holder.join()
        await fa
        await fb
        with pytest.raises(sqlite3.IntegrityError):
            await dup
        return a, b

    a, b = asyncio.run(main())
    assert journal.rows() == [a, b]
    assert journal.healthy                          # the database is fine; one statement was not
    assert journal.writer.failed == 1


# -- secrets ------------------------------------------------------------------------


def _files_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def test_no_pan_in_the_database_files(tmp_path):
    pan = "4761739001010119"        # a test PAN that appears nowhere else
    to_pan = "5413330089010608"
    assert mask_pan(pan) != pan
    j = Journal.open(url(tmp_path), str(tmp_path))
    for i in range(50):
        rec = record(j, pan=pan, kind=Kind.TRANSFER, to_pan_masked=mask_pan(to_pan),
                     to_pan_token=pan_token(to_pan, SECRET))
        j.insert(rec)
        j.finish(approve(rec))
    # A caller's mistake: a clear PAN where the masked one belongs is masked on the way in.
    oops = record(j, pan=pan)
    oops.pan_masked = pan
    oops.to_pan_masked = to_pan
    j.insert(oops)
    j.finish(approve(oops))
    j.record_upload("POS00001", "000001", UploadRow("601500000001", "000001", "000000", 1000,
                                                    "AB12", pan))          # the same mistake
    j.record_batch_close("POS00001", "000001", "2026-01-15", "95", BatchTotals(), BatchTotals())
    j.set_state("business_date", "2026-01-15")
    j.flush()
    directory = tmp_path / "j"
    live = _files_bytes(directory)                  # WAL included, before any checkpoint
    assert len(live) > 4096
    j.close()
    closed = _files_bytes(directory)
    for blob in (live, closed):
        for secret in (pan, to_pan):
            assert secret.encode() not in blob
            assert secret.encode("utf-16-le") not in blob
    with Journal.open(url(tmp_path), str(tmp_path), readonly=True) as ro:
        assert ro.get(oops.id).pan_masked == mask_pan(pan)
        assert ro.get(oops.id).to_pan_masked == mask_pan(to_pan)
        assert ro.uploads("POS00001", "000001")[0].pan_masked == mask_pan(pan)
        assert ro.get(1).pan_masked.startswith(pan[:6])   # the masked form is there


# -- property: any record round-trips -------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_any_record_round_trips(tmp_path):
    with Journal.open(url(tmp_path), str(tmp_path)) as j:

        @settings(max_examples=60, deadline=None, database=None)
        @given(data=st.data())
        def check(data):
            values = {"id": j.next_id()}
            for f in dataclasses.fields(TxnRecord):
                if f.name == "id":
                    continue
                hint = schema._HINTS[f.name]
                if hint is bool:
                    values[f.name] = data.draw(st.booleans())
                elif hint is int:
                    values[f.name] = data.draw(_int64)
                elif hint == (int | None):
                    values[f.name] = data.draw(st.none() | _int64)
                else:
                    values[f.name] = data.draw(_text)
            values["pan_masked"] = values["to_pan_masked"] = "622126******0017"
            first = TxnRecord(**values)
            j.insert(first)
            final = dataclasses.replace(first, status=data.draw(_text), response_code=data.draw(_text),
                                        latency_us=data.draw(_int64), stand_in=data.draw(st.booleans()),
                                        orig_id=data.draw(st.none() | _int64))
            j.finish(final)
            assert j.get(first.id) == final

        check()


def test_recovery_query_never_scans_the_journal():
    from cardswitch.switch.journal import recovery_sql

    con = sqlite3.connect(":memory:")
    con.executescript(schema.DDL)
    for only_open in (True, False):
        plan = [row[3] for row in con.execute("EXPLAIN QUERY PLAN " + recovery_sql(only_open),
                                              ("[]",) * (1 if only_open else 2))]
        scans = [step for step in plan if step.startswith("SCAN") and "json_each" not in step]
        assert scans and all(s.split()[1] in ("b", "d") for s in scans), plan
