"""The PostgreSQL journal against the real local server: the SQLite journal's
behaviours (round trip across restart, recovery queries, batches and uploads,
state, commit-before-resolve, grouping, failures contained, no PAN stored),
the same answers as SQLite for the same calls, and several nodes sharing one
journal. Each test gets a fresh schema, dropped afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import socket
import subprocess
import sys
import textwrap
import threading
import uuid

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.pan import mask_pan, pan_token
from cardswitch.switch import journal_schema as schema
from cardswitch.switch.journal import BatchTotals, Journal, JournalError, UploadRow
from cardswitch.switch.journal_pg import (
    PG_SCHEMA_VERSION,
    PgJournal,
    is_environment_error,
    pg_target,
    recovery_sql,
)
from cardswitch.switch.journals import is_postgres_url, open_journal
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord
from cardswitch.switch.saf import DELIVERED, PARKED, QUEUED, REVERSAL, STAND_IN, SafEntry
from services import require_postgres

pytestmark = pytest.mark.services

PAN = "6221260000000017"
TO_PAN = "6228480000000012"
SECRET = b"test-secret"


def _run(coro_fn, *args):
    """Run an admin coroutine on a loop of its own (never inside a test's loop)."""
    return asyncio.run(coro_fn(*args))


async def _admin(url: str, sql: str, *args):
    con = await asyncpg.connect(pg_target(url).dsn)
    try:
        return await con.fetch(sql, *args)
    finally:
        await con.close()


def admin(url: str, sql: str, *args) -> list:
    return _run(_admin, url, sql, *args)


@pytest.fixture
def pg_url():
    base = require_postgres()
    name = f"test_journal_{uuid.uuid4().hex[:12]}"
    url = f"{base}?schema={name}"
    yield url
    admin(base, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def journal(pg_url):
    j = PgJournal.open(pg_url, "")
    yield j
    j.close()


def record(j, *, date="2026-01-15", terminal="POS00001", batch="000001", stan=None,
           kind=Kind.PURCHASE, amount=1000, status=Status.PENDING, pan=PAN, **kw) -> TxnRecord:
    txn_id = j.next_id()
    return TxnRecord(
        id=txn_id, business_date=date, received_at="2026-01-15T10:00:00.123456Z", mti="0200",
        proc="000000", kind=kind, amount=amount, currency="156", terminal_id=terminal,
        merchant_id="898440154110001", stan=stan or f"{txn_id % 1000000:06d}", transmitted="0115100000",
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


def advice(j, txn: TxnRecord, *, bank="BANKB", kind=REVERSAL, **kw) -> SafEntry:
    return SafEntry(
        id=j.next_saf_id(), bank_id=bank, kind=kind, txn_id=txn.id, leg="debit",
        mti="0420" if kind == REVERSAL else "0220", proc=txn.proc, amount=txn.amount,
        currency=txn.currency, orig_mti="0200", orig_stan="000777", orig_transmitted="0115100001",
        stan="000900", transmitted="0115100009", rrn=txn.rrn, terminal_id=txn.terminal_id,
        merchant_id=txn.merchant_id, acquirer_inst="10000001", business_date=txn.business_date,
        created_at="2026-01-15T10:00:01.000000Z", updated_at="2026-01-15T10:00:01.000000Z", **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- URLs and opening ----------------------------------------------------------------


def test_url_parsing_and_dispatch(tmp_path):
    t = pg_target("postgresql://alice:s3cret@db.example:5433/switch?schema=node_a&sslmode=disable")
    assert t.schema == "node_a"
    assert "schema" not in t.dsn and "sslmode=disable" in t.dsn and "s3cret" in t.dsn
    assert "s3cret" not in t.display and t.display.startswith("postgresql://alice@db.example:5433/switch")
    assert pg_target("postgres://u@h/db").schema == "public"
    assert pg_target("postgres://u@h/db?schema=a", "b").schema == "b"
    for bad in ("Bad", "x-y", "1abc", "a" * 64, "a;drop"):
        with pytest.raises(JournalError, match="schema"):
            pg_target(f"postgresql://u@h/db?schema={bad}")
    assert is_postgres_url("postgresql://u@h/db") and is_postgres_url("POSTGRES://u@h/db")
    assert not is_postgres_url("sqlite:///x.db") and not is_postgres_url("postgresql")
    with open_journal(f"sqlite:///{tmp_path}/j.db", str(tmp_path)) as j:
        assert isinstance(j, Journal)


def test_same_public_api_as_the_sqlite_journal():
    """Every public member of Journal, with a compatible signature; the same schema version."""
    assert PG_SCHEMA_VERSION == schema.SCHEMA_VERSION, "mirror the SQLite journal's schema change"
    for name, lite in inspect.getmembers(Journal):
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        assert hasattr(PgJournal, name), f"PgJournal lacks {name}"
        pg = inspect.getattr_static(PgJournal, name)
        lite = inspect.getattr_static(Journal, name)
        assert type(pg) is type(lite), name                     # property, classmethod, function
        if isinstance(lite, property):
            continue
        lite_params = inspect.signature(getattr(Journal, name)).parameters
        pg_params = inspect.signature(getattr(PgJournal, name)).parameters
        for pname, p in lite_params.items():
            assert pname in pg_params, f"{name}: no parameter {pname}"
            q = pg_params[pname]
            assert q.kind == p.kind, f"{name}({pname})"
            if p.default is not inspect.Parameter.empty:
                assert q.default == p.default, f"{name}({pname})"
        for pname, q in pg_params.items():
            if pname not in lite_params:
                assert q.default is not inspect.Parameter.empty, f"{name}: extra {pname} needs a default"


def test_url_options_reach_the_server_and_win(pg_url):
    def setting(j, name):
        return j.writer.call(lambda con: con.fetchval(f"SHOW {name}"))

    with PgJournal.open(pg_url, "") as j:
        assert setting(j, "synchronous_commit") == "on"         # durable by default
        assert setting(j, "application_name") == "cardswitch-journal"
        assert setting(j, "search_path") == f'"{j.schema}"'
    with PgJournal.open(pg_url, "", synchronous="OFF") as j:
        assert setting(j, "synchronous_commit") == "off"
    with PgJournal.open(pg_url + "&synchronous_commit=off&application_name=node7", "") as j:
        assert setting(j, "synchronous_commit") == "off" and setting(j, "application_name") == "node7"
        assert "synchronous_commit=off" in j.path


def test_server_down_or_no_database_is_a_clear_error():
    base = require_postgres()
    with pytest.raises(JournalError, match="cannot open journal postgresql://"):
        PgJournal.open(f"postgresql://postgres@127.0.0.1:{_free_port()}/test?schema=x", "")
    missing = base.rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(JournalError, match="no_such_database_here"):
        open_journal(missing, "")


def test_readonly_needs_an_existing_journal(pg_url):
    with pytest.raises(JournalError, match="no journal"):
        PgJournal.open(pg_url, "", readonly=True)


def test_several_writers_and_a_readonly_reader(pg_url):
    a = open_journal(pg_url, "")
    b = open_journal(pg_url, "")                     # no lock: several nodes write at once
    ro = open_journal(pg_url, "", readonly=True)
    try:
        assert isinstance(a, PgJournal)
        rec = approve(record(a))
        a.insert(rec)
        a.flush()
        assert ro.rows() == [rec] and b.rows() == [rec]
        with pytest.raises(JournalError, match="read-only"):
            ro.insert(rec)
        with pytest.raises(JournalError, match="read-only"):
            ro.next_id()
        rec2 = record(b)
        b.insert(rec2)
        b.flush()
        assert [r.id for r in ro.rows()] == [rec.id, rec2.id]
        assert ro.writer is None and a.writer is not None
    finally:
        for j in (a, b, ro):
            j.close()


def test_schema_version_and_newer_journal_refused(pg_url):
    with PgJournal.open(pg_url, "") as j:
        assert j.get_state("schema_version") == str(PG_SCHEMA_VERSION)
    name = pg_target(pg_url).schema
    admin(pg_url, f"UPDATE \"{name}\".state SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(JournalError, match="newer"):
        PgJournal.open(pg_url, "")
    with pytest.raises(JournalError, match="newer"):
        PgJournal.open(pg_url, "", readonly=True)


def test_older_journal_gains_new_record_fields(pg_url):
    with PgJournal.open(pg_url, "") as j:
        old = approve(record(j))
        j.insert(old)
    name = pg_target(pg_url).schema
    admin(pg_url, f'ALTER TABLE "{name}".txn DROP COLUMN to_auth_code')   # as before that field
    with PgJournal.open(pg_url, "") as j:
        assert j.rows() == [old]
        new = approve(record(j), to_auth_code="XYZ123")
        j.insert(new)
        assert j.get(new.id).to_auth_code == "XYZ123"


def test_schema_types_indexes_and_no_secret_columns(journal, pg_url):
    name = pg_target(pg_url).schema
    cols = admin(pg_url, "SELECT table_name, column_name, data_type, collation_name "
                         "FROM information_schema.columns WHERE table_schema = $1", name)
    tables: dict[str, dict[str, tuple[str, str | None]]] = {}
    for t, c, typ, coll in cols:
        tables.setdefault(t, {})[c] = (typ, coll)
    assert {"txn", "batch_close", "batch_upload", "state", "open_batch"} <= set(tables)
    assert list(schema.TXN_FIELDS) == [f.name for f in dataclasses.fields(TxnRecord)]
    assert set(tables["txn"]) == set(schema.TXN_FIELDS)
    for table, columns in tables.items():
        assert not set(columns) & schema.FORBIDDEN_COLUMNS, table
        for column, (typ, coll) in columns.items():
            if typ == "text":
                assert coll == "C", (table, column)       # byte order, as in SQLite
    txn = tables["txn"]
    for money_or_id in ("id", "amount", "latency_us", "orig_id", "cancelled_by"):
        assert txn[money_or_id][0] == "bigint"
    assert txn["stand_in"][0] == "boolean"
    for col in ("switch_debits_amount", "terminal_credits_amount"):
        assert tables["batch_close"][col][0] == "bigint"
    assert tables["batch_upload"]["amount"][0] == "bigint"
    defs = {r[0] for r in admin(pg_url, "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 "
                                        "AND tablename = 'txn'", name)}
    for cols_sql in ("(business_date)", "(terminal_id, batch)", "(rrn)", "(status) WHERE"):
        assert any(cols_sql in d for d in defs), (cols_sql, defs)
    inc = admin(pg_url, "SELECT increment_by FROM pg_sequences WHERE schemaname = $1 "
                        "AND sequencename = 'txn_id_seq'", name)
    assert [r[0] for r in inc] == [1000]


# -- records ----------------------------------------------------------------------


def test_round_trip_across_restart(pg_url):
    j = PgJournal.open(pg_url, "")
    a = approve(record(j), stand_in=True, orig_id=None)
    b = record(j, kind=Kind.TRANSFER, to_pan_masked=mask_pan(TO_PAN),
               to_pan_token=pan_token(TO_PAN, SECRET), to_issuer_id="BANKC")
    c = approve(record(j, kind=Kind.VOID), orig_id=a.id)
    for r in (a, b, c):
        j.insert(r)
    j.mark_cancelled(a.id, Cancel.VOIDED, c.id)
    a.cancelled, a.cancelled_by = Cancel.VOIDED, c.id
    j.close()

    j = PgJournal.open(pg_url, "")
    try:
        got = j.rows()
        assert got == [a, b, c]
        assert got[0].stand_in is True and got[1].stand_in is False
        assert got[1].orig_id is None and got[2].orig_id == a.id
        assert type(got[0].amount) is int and type(got[0].id) is int
        assert j.next_id() > c.id                  # a new block: never an id already used
        assert j.get(b.id) == b and j.get(10**9) is None
    finally:
        j.close()


def test_ids_come_in_blocks_and_never_repeat(pg_url):
    seen: list[int] = []
    for _ in range(3):
        with PgJournal.open(pg_url, "") as j:
            ids = [j.next_id() for _ in range(1500)]   # crosses a block boundary
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            seen += ids
    assert len(set(seen)) == len(seen)
    assert seen[:3] == [1, 2, 3]                      # a fresh journal starts at 1


def test_insert_takes_the_record_as_it_is_at_the_call(journal):
    rec = record(journal)
    journal.insert(rec)
    rec.status = Status.APPROVED
    rec.amount = 999_999
    assert journal.get(rec.id).status == Status.PENDING
    assert journal.get(rec.id).amount == 1000


def test_finish_writes_the_outcome_only(journal):
    orig = approve(record(journal))
    journal.insert(orig)
    rev = record(journal)
    journal.insert(rev)
    journal.mark_cancelled(rev.id, Cancel.REVERSED, orig.id)
    approve(rev, response_code="00", to_issuer_stan="000888", to_auth_code="QQ")
    rev.terminal_id = "SOMEONE_ELSE"
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


def test_money_must_be_int_and_flags_become_bool(journal):
    rec = record(journal)
    rec.amount = 10.5  # type: ignore[assignment]
    with pytest.raises(TypeError, match="minor units"):
        journal.insert(rec)
    with pytest.raises(TypeError):
        journal.record_batch_close("T", "000001", "2026-01-15", "00",
                                   BatchTotals(0, 1.5, 0, 0), BatchTotals())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        journal.record_upload("T", "000001", UploadRow("r", "s", "p", 1.0, "", ""))  # type: ignore[arg-type]
    assert journal.rows() == []
    flagged = record(journal, stand_in=1)             # an int where a bool belongs: stored as true
    journal.insert(flagged)
    assert journal.get(flagged.id).stand_in is True
    assert journal.healthy


def test_pending(journal):
    sent = record(journal)
    journal.insert(sent)
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
    assert journal.rows(limit=2) == recs[-2:]
    assert journal.rows(limit=0) == []
    assert journal.count_by_status() == {Status.APPROVED: 2, Status.PENDING: 4}
    assert journal.count_by_status("2026-01-16") == {Status.PENDING: 2}


# -- recovery, batches, uploads, state -------------------------------------------------


def test_load_for_recovery(pg_url):
    j = PgJournal.open(pg_url, "")
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
    late = record(j, date="2026-01-12", terminal="T2", batch="000003", status=Status.DECLINED)
    j.insert(late)
    j.close()

    j = PgJournal.open(pg_url, "")
    try:
        got = j.load_for_recovery(["2026-01-15"])
        assert got == sorted([old_open, old_open_95, *today, closed_today], key=lambda r: r.id)
        assert j.load_for_recovery([]) == [old_open, old_open_95, today[0]]
        both = j.load_for_recovery(["2026-01-15", "2026-01-11", "2026-01-15"])
        assert [r.id for r in both] == sorted({r.id for r in (old_open, old_open_95, old_no_batch,
                                                               *today, closed_today)})
        whole = j.load_for_recovery(["2026-01-15"], open_batches_only=False)
        assert whole == sorted([old_open, old_open_95, *today, closed_today, closed_yesterday],
                               key=lambda r: r.id)
        assert j.closed_batches() == {("T2", "000003"), ("T4", "000001")}
    finally:
        j.close()


def test_recovery_query_uses_the_indexes(pg_url):
    """On a journal too big to scan, the planner starts from open_batch and the indexes."""
    PgJournal.open(pg_url, "").close()
    name = pg_target(pg_url).schema
    admin(pg_url, f"""
        INSERT INTO "{name}".txn (id, business_date, received_at, mti, proc, kind, amount, currency,
                                 terminal_id, merchant_id, stan, transmitted, batch, status)
        SELECT g, '2025-12-' || lpad((1 + g % 28)::text, 2, '0'), 'x', '0200', '000000', 'purchase',
               100, '156', 'T' || (g % 500), 'M', lpad((g % 999999)::text, 6, '0'), '0101000000',
               lpad((g % 50)::text, 6, '0'), 'approved'
        FROM generate_series(1000000, 1040000) g""")
    admin(pg_url, f'DELETE FROM "{name}".open_batch WHERE terminal_id <> $1', "T7")   # all closed but one
    admin(pg_url, f'ANALYZE "{name}".txn')            # autovacuum's job on a live journal
    with PgJournal.open(pg_url, "") as j:             # a restart
        for only_open in (True, False):
            plan = _run(_explain, pg_url, name, recovery_sql(only_open))
            assert "Seq Scan on txn" not in plan, plan
        assert {r.terminal_id for r in j.load_for_recovery([])} == {"T7"}


async def _explain(url: str, name: str, sql: str) -> str:
    con = await asyncpg.connect(pg_target(url).dsn, server_settings={"search_path": f'"{name}"'})
    try:
        rows = await con.fetch("EXPLAIN " + sql.replace("$1::text[]", "ARRAY['2026-01-15']::text[]"))
        return "\n".join(r[0] for r in rows)
    finally:
        await con.close()


def test_batch_closed_after_95_and_trailer(journal):
    r = approve(record(journal, terminal="T9", batch="000002"))
    journal.insert(r)
    ours, theirs = BatchTotals(1, 500, 2, 3000), BatchTotals(1, 500, 3, 4000)
    journal.record_batch_close("T9", "000002", "2026-01-15", "95", ours, theirs)
    assert ("T9", "000002") not in journal.closed_batches()
    assert journal.load_for_recovery([]) == [r]
    journal.record_batch_close("T9", "000002", "2026-01-15", "00", ours, theirs)
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
    journal.record_upload("T1", "000005", a)
    journal.record_upload("T2", "000005", a)
    changed = dataclasses.replace(a, amount=1600)
    journal.record_upload("T1", "000005", changed)
    assert journal.uploads("T1", "000005") == [a, b, changed]
    assert journal.uploads("T2", "000005") == [a]
    assert journal.uploads("T1", "000006") == []


def test_state(pg_url):
    with PgJournal.open(pg_url, "") as j:
        assert j.get_state("business_date") is None
        j.set_state("business_date", "2026-01-15")
        assert j.get_state("business_date") == "2026-01-15"
        j.set_state("business_date", "2026-01-16")
        j.set_state("cutover:2026-01-15", "2026-01-15T15:00:00Z")
        j.set_state("cutover:2026-01-16", "2026-01-16T15:00:00Z")
        j.set_state("cutover_x", "not under the prefix 'cutover:'")
        j.set_state("rrn:6015", "20000")
        with pytest.raises(TypeError):
            j.set_state("rrn:6015", 30000)  # type: ignore[arg-type]
    with PgJournal.open(pg_url, "") as j:
        assert j.get_state("business_date") == "2026-01-16"
        assert j.get_state("rrn:6015") == "20000"
        assert j.state_items("cutover:") == {"cutover:2026-01-15": "2026-01-15T15:00:00Z",
                                             "cutover:2026-01-16": "2026-01-16T15:00:00Z"}
        assert j.state_items("%") == {}                  # no LIKE pattern: a plain prefix
        assert "schema_version" in j.state_items()


def _scenario_writes(j) -> None:
    """The same writes on either journal, interleaved as the pipeline interleaves them."""
    recs = []
    for i in range(12):
        r = record(j, date=f"2026-01-1{i % 3 + 4}", terminal=f"T{i % 4}", batch=f"00000{i % 3}",
                   kind=Kind.PURCHASE if i % 5 else Kind.REFUND, amount=100 * i)
        if i % 2:
            approve(r)
        j.insert(r)
        recs.append(r)
        if i % 4 == 3:
            j.finish(approve(recs[i - 1], latency_us=i))
    j.mark_cancelled(recs[0].id, Cancel.REVERSED, recs[3].id)   # the cancel mark before the outcome
    j.finish(approve(recs[0], stand_in=True))
    j.mark_cancelled(recs[1].id, Cancel.REVERSED, recs[3].id)
    j.mark_cancelled(recs[1].id, Cancel.NONE, None)               # undone again: the last one wins
    t = BatchTotals(1, 2, 3, 4)
    j.record_batch_close("T1", "000001", "2026-01-15", "95", t, BatchTotals())
    j.record_batch_close("T1", "000001", "2026-01-15", "00", t, t)
    late = record(j, date="2026-01-15", terminal="T1", batch="000001", status=Status.DECLINED)
    j.insert(late)                                                # after the close: stays closed
    j.finish(approve(record(j, terminal="T5", batch="000009")))   # an outcome with no row: no row
    j.record_batch_close("T2", "000002", "2026-01-16", "00", t, t)
    j.record_upload("T1", "000001", UploadRow("r1", "000001", "000000", 100, "A", mask_pan(PAN)))
    j.record_upload("T1", "000001", UploadRow("r1", "000001", "000000", 100, "A", mask_pan(PAN)))
    j.record_upload("T1", "000001", UploadRow("r2", "000002", "200000", 50, "", PAN))
    j.set_state("business_date", "2026-01-15")
    j.set_state("business_date", "2026-01-16")
    j.set_state("cutover:2026-01-15", "x")
    j.set_state("keys:T1", "y")
    j.finish(approve(recs[5], auth_code="LAST01"))
    adv = advice(j, recs[7])
    j.saf_insert(adv)
    j.insert(approve(record(j, terminal="T6"), stand_in=True, pan_token="tokX"))
    adv.state, adv.attempts = DELIVERED, 1
    j.saf_update(adv)
    j.saf_insert(advice(j, recs[8], bank="BANKC", kind=STAND_IN))
    j.set_late_response(recs[9].id, "05")
    j.finish(approve(recs[9], latency_us=99))              # the late answer is an outcome column too
    j.set_late_response(recs[9].id, "00")


def _scenario_reads(j) -> list:
    out: list = [j.rows(), j.rows(business_date="2026-01-15", limit=2), j.count_by_status(), j.pending()]
    for dates in ([], ["2026-01-14"], ["2026-01-16", "2026-01-15"]):
        out.append(j.load_for_recovery(dates))
        out.append(j.load_for_recovery(dates, open_batches_only=False))
    out.append(sorted(j.closed_batches()))
    out.append([(c.id, c.terminal_id, c.batch, c.result, c.switch_totals, c.terminal_totals)
                for c in j.batch_closes()])
    out.append(j.uploads("T1", "000001"))
    out.append({k: v for k, v in j.state_items().items() if k != "schema_version"})
    out.append(j.get(6))
    out.append(j.saf_entries())
    out.append(j.saf_queued())
    out.append(j.saf_counts())
    out.append(j.standin_usage("2026-01-15"))
    out.append([j.last_issuer_stan(b) for b in ("BANKB", "BANKC")])
    return out


@pytest.fixture(scope="module")
def sqlite_answers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lite")
    with Journal.open(f"sqlite:///{tmp}/journal.db", str(tmp)) as lite:
        _scenario_writes(lite)
        return _scenario_reads(lite)


def test_same_answers_as_the_sqlite_journal(journal, sqlite_answers):
    _scenario_writes(journal)
    assert _scenario_reads(journal) == sqlite_answers
    assert journal.get(6).auth_code == "LAST01" and journal.get(1).cancelled == Cancel.REVERSED


def test_same_answers_when_everything_commits_in_one_group(journal, sqlite_answers):
    """The writer groups inserts and outcomes out of queue order: the result must not change."""
    release, holder = _blocked(journal)
    commits = journal.writer.commits
    _scenario_writes(journal)
    release.set()
    holder.join()
    journal.flush()
    assert journal.writer.commits == commits + 1
    assert _scenario_reads(journal) == sqlite_answers


# -- the event loop side ------------------------------------------------------------


def _blocked(journal: PgJournal):
    """Hold the writer (without blocking the journal's loop) until the event is set."""
    release, started = threading.Event(), threading.Event()

    async def hold(con):
        started.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)

    t = threading.Thread(target=journal.writer.call, args=(hold,))
    t.start()
    assert started.wait(10)
    return release, t


def test_futures_resolve_only_after_commit(pg_url, journal):
    seen_at_resolution: list[bool] = []
    other = PgJournal.open(pg_url, "", readonly=True)     # another session: sees commits only

    async def main():
        loop = asyncio.get_running_loop()
        release, holder = _blocked(journal)
        rec = approve(record(journal))
        fut = journal.insert(rec, loop)
        fut.add_done_callback(lambda f: seen_at_resolution.append(other.get(rec.id) == rec))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not fut.done()
        assert other.get(rec.id) is None
        release.set()
        await fut
        holder.join()
        assert fut.result() is None

    try:
        asyncio.run(main())
    finally:
        other.close()
    assert seen_at_resolution == [True]


def test_concurrent_writes_from_the_loop_are_grouped(journal):
    n = 300
    first_resumed: list[tuple[int, int]] = []

    async def main():
        loop = asyncio.get_running_loop()
        release, holder = _blocked(journal)
        write_aheads: list[asyncio.Future] = []

        async def txn(i: int) -> None:
            rec = record(journal, terminal=f"T{i % 7}", amount=100 + i)
            fut = journal.insert(rec, loop)
            write_aheads.append(fut)
            await fut
            if not first_resumed:
                first_resumed.append((journal.writer.commits, sum(f.done() for f in write_aheads)))
            await journal.finish(approve(rec), loop)

        tasks = [asyncio.create_task(txn(i)) for i in range(n)]
        await asyncio.sleep(0)
        assert len(write_aheads) == n and not any(f.done() for f in write_aheads)
        commits = journal.writer.commits
        release.set()
        await asyncio.gather(*tasks)
        holder.join()
        assert first_resumed == [(commits + 1, n)]     # all 300 write-aheads in one commit

    asyncio.run(main())
    rows = journal.rows()
    assert len(rows) == n and all(r.status == Status.APPROVED for r in rows)
    assert sorted(r.amount for r in rows) == [100 + i for i in range(n)]
    assert journal.writer.commits < 2 * n
    assert journal.healthy and journal.last_write_latency > 0


def test_writes_on_uvloop_and_the_commit_hook(journal):
    uvloop = pytest.importorskip("uvloop")
    committed: list[int] = []
    journal.writer.on_commit = lambda n, latency: committed.append(n)

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
    assert sum(committed) == 54 == journal.writer.rows


def test_opened_used_and_closed_inside_a_running_loop(pg_url):
    """As the switch does it: open in its start coroutine, write, read back, close at stop."""
    async def main():
        loop = asyncio.get_running_loop()
        j = open_journal(pg_url, "var")
        try:
            rec = approve(record(j))
            await j.insert(rec, loop)
            await j.set_state("business_date", "2026-01-15", loop)
            assert j.load_for_recovery(["2026-01-15"]) == [rec]
            assert j.get_state("business_date") == "2026-01-15"
        finally:
            j.close()
        return rec

    rec = asyncio.run(main())
    with PgJournal.open(pg_url, "", readonly=True) as ro:
        assert ro.rows() == [rec]


def test_health_and_close(pg_url):
    j = PgJournal.open(pg_url, "")
    assert j.healthy
    j.insert(record(j))
    j.close()
    j.close()
    assert not j.healthy
    with pytest.raises(JournalError, match="closed"):
        j.insert(record(j))
    with pytest.raises(JournalError, match="closed"):
        j.rows()
    with PgJournal.open(pg_url, "") as again:
        assert len(again.rows()) == 1                 # what was queued at close was committed


def test_failed_write_reaches_its_future_and_spares_the_others(journal):
    async def main():
        loop = asyncio.get_running_loop()
        release, holder = _blocked(journal)
        a = record(journal)
        fa = journal.insert(a, loop)
        dup = journal.insert(a, loop)                 # same id again: a constraint error
        fa_done = journal.finish(approve(a), loop)    # grouped after the inserts, replayed in order
        b = record(journal)
        fb = journal.insert(b, loop)
        nul = record(journal, terminal="POS\x0001")    # PostgreSQL text holds no NUL
        fnul = journal.insert(nul, loop)
        release.set()
        holder.join()
        await fa
        await fa_done
        await fb
        with pytest.raises(asyncpg.UniqueViolationError):
            await dup
        with pytest.raises(asyncpg.DataError):
            await fnul
        return a, b

    a, b = asyncio.run(main())
    assert journal.rows() == [a, b]
    assert journal.healthy
    assert journal.writer.failed == 2


def test_losing_the_server_connection_is_survived(pg_url, journal):
    """The server ends the writer's and readers' sessions: writes fail or go on, then reconnect."""
    first = record(journal)
    journal.insert(first)
    journal.flush()
    writer_pid = journal.writer.call(lambda con: con.get_server_pid())
    reader_pid = journal.writer.fetch("SELECT pg_backend_pid()")[0][0]
    admin(pg_url, "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", [writer_pid, reader_pid])
    assert journal.get(first.id) == first               # the read retries on a fresh connection

    async def main():
        loop = asyncio.get_running_loop()
        results = []
        for _ in range(3):
            rec = record(journal)
            try:
                await journal.insert(rec, loop)
            except Exception as e:
                assert is_environment_error(e), repr(e)   # the connection, not the row
                results.append(None)
            else:
                results.append(rec)
        return results

    results = asyncio.run(main())
    assert results[-1] is not None                      # reconnected by the next group at the latest
    assert journal.healthy
    stored = {r.id for r in journal.rows()}
    assert {first.id} | {r.id for r in results if r is not None} == stored
    assert journal.writer.call(lambda con: con.get_server_pid()) != writer_pid


def test_server_lost_in_the_middle_of_a_group(journal):
    """The group in flight fails as a whole (nothing half-committed), health drops, then returns."""
    first = record(journal)
    journal.insert(first)
    journal.flush()

    async def main():
        loop = asyncio.get_running_loop()
        release, holder = _blocked(journal)
        a, b = record(journal), record(journal)
        fa = journal.insert(a, loop)
        fkill = journal.writer.write("SELECT pg_terminate_backend(pg_backend_pid())", (), loop)
        fb = journal.insert(b, loop)
        release.set()
        holder.join()
        for fut in (fa, fkill, fb):
            with pytest.raises(Exception) as info:
                await fut
            assert is_environment_error(info.value), repr(info.value)
        assert not journal.healthy and journal.writer.last_error is not None
        c = record(journal)
        await journal.insert(c, loop)                 # the next group reconnects
        assert journal.healthy
        return c

    c = asyncio.run(main())
    assert journal.rows() == [first, c]
    assert journal.writer.reconnects >= 1 and journal.writer.failed == 3


def test_store_and_forward_queue(pg_url):
    j = PgJournal.open(pg_url, "")
    txn = approve(record(j))
    j.insert(txn)
    a = advice(j, txn)
    b = advice(j, txn, bank="BANKC", kind=STAND_IN, auth_code="SW0001", pan_sealed="c2VhbGVk")
    c = advice(j, txn)
    assert a.id < b.id < c.id
    for e in (a, b, c):
        j.saf_insert(e)
    a.state, a.attempts, a.last_error, a.updated_at = DELIVERED, 2, "", "2026-01-15T10:00:05.000000Z"
    j.saf_update(a)
    c.state, c.attempts, c.last_error = PARKED, 7, "too old"
    j.saf_update(c)
    c.updated_at = j.saf_entries(state=PARKED)[0].updated_at    # stamped by the journal when empty
    assert c.updated_at.endswith("Z")
    j.close()

    j = PgJournal.open(pg_url, "")
    try:
        assert j.saf_queued() == [b]
        assert j.saf_entries() == [a, b, c]
        assert j.saf_entries(txn_id=txn.id, bank_id="BANKB") == [a, c]
        assert j.saf_entries(state=DELIVERED) == [a]
        assert j.saf_counts() == {("BANKB", DELIVERED): 1, ("BANKC", QUEUED): 1, ("BANKB", PARKED): 1}
        assert j.next_saf_id() > c.id                            # a new block after a restart
        bad = advice(j, txn)
        bad.state = "lost"                                       # not a state: refused by the CHECK
        with pytest.raises(asyncpg.CheckViolationError):
            async def go():
                await j.saf_insert(bad, asyncio.get_running_loop())
            asyncio.run(go())
        money = advice(j, txn)
        money.amount = 1.5  # type: ignore[assignment]
        with pytest.raises(TypeError, match="minor units"):
            j.saf_insert(money)
    finally:
        j.close()


def test_late_answers_issuer_stans_and_stand_in_usage(journal):
    a = approve(record(journal), issuer_stan="000100")
    b = approve(record(journal), issuer_stan="000101", stand_in=True, pan_token="tok1")
    c = approve(record(journal), issuer_stan="000102", stand_in=True, pan_token="tok1", amount=250)
    d = record(journal, status=Status.TIMEOUT, issuer_stan="000103", stand_in=True)
    d.pan_token = "tok2"                                         # not approved: not counted
    e = approve(record(journal, date="2026-01-16"), stand_in=True, pan_token="tok2", issuer_stan="000104")
    other = approve(record(journal), issuer_id="BANKC", issuer_stan="000555")
    for r in (a, b, c, d, e, other):
        journal.insert(r)
    journal.set_late_response(d.id, "00")
    assert journal.get(d.id).late_response_code == "00"
    assert journal.last_issuer_stan("BANKB") == "000104"
    assert journal.last_issuer_stan("BANKC") == "000555"
    assert journal.last_issuer_stan("NOBANK") == ""
    assert sorted(journal.standin_usage("2026-01-15")) == [("tok1", 2, 1250)]
    assert journal.standin_usage("2026-01-17") == []


# -- several nodes -------------------------------------------------------------------


def test_two_nodes_writing_at_once_get_distinct_ids_and_see_all_rows(pg_url):
    nodes = [PgJournal.open(pg_url, ""), PgJournal.open(pg_url, "")]
    per_node = 1300                                      # more than a block of ids each
    written: list[list[TxnRecord]] = [[], []]

    def run_node(k: int) -> None:
        j = nodes[k]

        async def main():
            loop = asyncio.get_running_loop()

            async def txn(i: int) -> None:
                rec = record(j, terminal=f"NODE{k}T{i % 5}", batch="000001", amount=k * 100000 + i)
                written[k].append(rec)
                await j.insert(rec, loop)
                await j.finish(approve(rec), loop)

            for start in range(0, per_node, 100):
                await asyncio.gather(*(txn(i) for i in range(start, min(per_node, start + 100))))

        asyncio.run(main())

    threads = [threading.Thread(target=run_node, args=(k,)) for k in (0, 1)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        ids = [r.id for rs in written for r in rs]
        assert len(ids) == 2 * per_node and len(set(ids)) == len(ids)
        for rs in written:                                # increasing within a node
            assert [r.id for r in rs] == sorted(r.id for r in rs)
        everything = sorted((r for rs in written for r in rs), key=lambda r: r.id)
        assert nodes[0].rows() == everything == nodes[1].rows()
        # Shared state: one node sets the business date, the other reads it.
        nodes[0].set_state("business_date", "2026-01-16")
        nodes[0].flush()                                  # committed: every node sees it
        assert nodes[1].get_state("business_date") == "2026-01-16"
        nodes[1].record_batch_close("NODE0T1", "000001", "2026-01-16", "00", BatchTotals(), BatchTotals())
        nodes[1].flush()
        assert ("NODE0T1", "000001") in nodes[0].closed_batches()
        assert all(r.terminal_id != "NODE0T1" for r in nodes[0].load_for_recovery([]))
    finally:
        for j in nodes:
            j.close()


CHILD = textwrap.dedent("""
    import asyncio, sys
    from cardswitch.switch.journals import open_journal
    from cardswitch.switch.records import Kind, Status, TxnRecord

    async def main():
        loop = asyncio.get_running_loop()
        j = open_journal(sys.argv[1], "")
        tag = sys.argv[2]
        recs = []
        for i in range(int(sys.argv[3])):
            n = j.next_id()
            recs.append(TxnRecord(id=n, business_date="2026-01-15", received_at="x", mti="0200",
                                  proc="000000", kind=Kind.PURCHASE, amount=n, currency="156",
                                  terminal_id=tag, merchant_id="M", stan=f"{i:06d}",
                                  transmitted="0115100000", batch="000001",
                                  pan_masked="622126******0017", status=Status.APPROVED))
        await asyncio.gather(*(j.insert(r, loop) for r in recs))
        j.close()
        print(" ".join(str(r.id) for r in recs))

    asyncio.run(main())
""")


@pytest.mark.timeout(120)
def test_two_processes_opening_a_fresh_journal_at_once(pg_url):
    """Two switch processes start together on an empty schema: one creates it, both write."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, pg_url, f"P{k}", "1200"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=100)
        assert p.returncode == 0, err[-2000:]
        outs.append([int(x) for x in out.split()])
    ids = outs[0] + outs[1]
    assert len(ids) == 2400 and len(set(ids)) == 2400
    with PgJournal.open(pg_url, "", readonly=True) as ro:
        rows = ro.rows()
        assert [r.id for r in rows] == sorted(ids)
        assert {r.terminal_id for r in rows} == {"P0", "P1"}
        assert all(r.amount == r.id for r in rows)


# -- secrets ------------------------------------------------------------------------


def test_no_pan_in_any_table(pg_url):
    pan = "4761739001010119"
    to_pan = "5413330089010608"
    j = PgJournal.open(pg_url, "")
    try:
        for _ in range(20):
            rec = record(j, pan=pan, kind=Kind.TRANSFER, to_pan_masked=mask_pan(to_pan),
                         to_pan_token=pan_token(to_pan, SECRET))
            j.insert(rec)
            j.finish(approve(rec))
        oops = record(j, pan=pan)
        oops.pan_masked = pan                        # a caller's mistake: masked on the way in
        oops.to_pan_masked = to_pan
        j.insert(oops)
        j.finish(approve(oops))
        j.record_upload("POS00001", "000001", UploadRow("601500000001", "000001", "000000", 1000,
                                                        "AB12", pan))
        j.record_batch_close("POS00001", "000001", "2026-01-15", "95", BatchTotals(), BatchTotals())
        j.set_state("business_date", "2026-01-15")
        j.flush()
        assert j.get(oops.id).pan_masked == mask_pan(pan)
        assert j.get(oops.id).to_pan_masked == mask_pan(to_pan)
        assert j.uploads("POS00001", "000001")[0].pan_masked == mask_pan(pan)
    finally:
        j.close()
    name = pg_target(pg_url).schema
    tables = [r[0] for r in admin(pg_url, "SELECT table_name FROM information_schema.tables "
                                          "WHERE table_schema = $1", name)]
    assert {"txn", "batch_close", "batch_upload", "state", "open_batch"} <= set(tables)
    dump = "\n".join(str(row[0]) for t in tables
                     for row in admin(pg_url, f'SELECT t::text FROM "{name}"."{t}" t'))
    assert mask_pan(pan) in dump and len(dump) > 2000      # the scan sees the rows
    for secret in (pan, to_pan):
        assert secret not in dump


# -- property: any record round-trips -------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=12)
_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_any_record_round_trips(journal):
    hints = schema._HINTS

    @settings(max_examples=60, deadline=None, database=None)
    @given(data=st.data())
    def check(data):
        values = {"id": journal.next_id()}
        for f in dataclasses.fields(TxnRecord):
            if f.name == "id":
                continue
            hint = hints[f.name]
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
        journal.insert(first)
        final = dataclasses.replace(first, status=data.draw(_text), response_code=data.draw(_text),
                                    latency_us=data.draw(_int64), stand_in=data.draw(st.booleans()),
                                    orig_id=data.draw(st.none() | _int64))
        journal.finish(final)
        assert journal.get(first.id) == final

    check()


def test_a_writer_bug_fails_what_is_queued_and_close_still_cleans_up(pg_url, monkeypatch):
    j = PgJournal.open(pg_url, "")
    store = j.writer

    async def broken(batch):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(store, "_process", broken)

    async def main():
        fut = j.insert(record(j), asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="a bug"):
            await fut

    asyncio.run(main())
    assert not j.healthy and isinstance(store.last_error, RuntimeError)
    with pytest.raises(JournalError, match="closed"):
        j.insert(record(j))
    j.close()
    assert not store._thread.is_alive() and store._loop.is_closed()


def test_error_text_never_carries_a_row_value():
    from cardswitch.switch.journal_pg import _describe

    pan = "4761739001010119"
    text = _describe(asyncpg.DataError(f"invalid input for query argument $8: '{pan}' (expected str)"))
    assert pan not in text and "$8" in text
    assert pan not in _describe(ValueError(f"card {pan}")) and mask_pan(pan) in _describe(ValueError(pan))


def test_environment_errors_are_told_apart():
    assert is_environment_error(ConnectionRefusedError())
    assert is_environment_error(asyncpg.exceptions.AdminShutdownError())
    assert is_environment_error(asyncpg.exceptions.DiskFullError())
    assert not is_environment_error(asyncpg.exceptions.UniqueViolationError())
    assert not is_environment_error(asyncpg.exceptions.CharacterNotInRepertoireError())
    assert not is_environment_error(ValueError())

