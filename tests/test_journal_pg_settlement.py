"""Settlement from a PostgreSQL journal: ``PgSettlementSource`` answers every
read exactly as the SQLite source does on the same rows, settling a date from
either journal writes byte-identical files, and the source reads one snapshot
while the switch nodes go on writing."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import asyncpg
import pytest

from cardswitch.settlement.run import settle
from cardswitch.settlement.source import SourceError, SqliteSource
from cardswitch.switch.cutover import STATE_BUSINESS_DATE
from cardswitch.switch.index import BatchTotals
from cardswitch.switch.journal import UploadRow
from cardswitch.switch.journal_pg import PgJournal, PgSettlementSource, pg_target
from cardswitch.switch.records import Kind
from services import require_postgres
from test_settlement_support import D1, D2, D3, Day, make_network, write_journal

pytestmark = pytest.mark.services


async def _drop(url: str) -> None:
    target = pg_target(url)
    con = await asyncpg.connect(target.dsn)
    try:
        await con.execute(f'DROP SCHEMA IF EXISTS "{target.schema}" CASCADE')
    finally:
        await con.close()


@pytest.fixture
def pg_url():
    url = f"{require_postgres()}?schema=test_settle_{uuid.uuid4().hex[:12]}"
    yield url
    asyncio.run(_drop(url))


def _extras(j) -> None:
    """Batch closes and uploads (the report's inputs), the same on both journals."""
    t = BatchTotals(1, 2000, 12, 1_100_000)
    j.record_batch_close("POS00001", "000001", D1, "95", t, BatchTotals(1, 2000, 11, 1_000_000))
    j.record_batch_close("POS00001", "000001", D1, "00", t, t)
    j.record_upload("POS00001", "000001", UploadRow("606000000001", "000001", "000000", 12345, "A00001",
                                                     "622126******0013"))


@pytest.fixture
def journals(tmp_path, pg_url):
    """The settlement tests' day of traffic in a SQLite journal and in a PostgreSQL one."""
    day = Day()
    lite_dir = tmp_path / "lite"
    write_journal(lite_dir, day.rows.all, business_date=D3)
    from cardswitch.switch.journal import Journal

    with Journal.open(f"sqlite:///{lite_dir}/journal.db", str(lite_dir)) as lj:
        _extras(lj)
    with PgJournal.open(pg_url, "") as pj:
        for r in day.rows.all:
            pj.insert(r)
        pj.set_state(STATE_BUSINESS_DATE, D3)
        _extras(pj)
    return day, lite_dir, pg_url


def _answers(src, day: Day) -> list:
    ids = [r.id for r in day.rows.all]
    out = [src.current_business_date()]
    for d in (D1, D2, D3):
        out += [src.count_pending(d), src.count_requests(d), list(src.iter_candidates(d)),
                src.undo_rows_between(d, d), src.request_mix(d), src.batch_closes_on(d)]
        for bank in ("BANKA", "BANKB", "BANKC", "NOBANK"):
            out.append(list(src.iter_candidates(d, bank)))
    out += [src.undo_rows_between(D1, D3), src.rows_by_ids(ids[::3] + [10**9]), src.rows_by_ids([]),
            src.uploads("POS00001", "000001"), src.uploads("POS00002", "000001"),
            src.batch_rows("POS00001", "000001"), src.batch_rows("NOPE", "000001")]
    return out


def test_implements_the_settlement_source_protocol():
    """Every method settlement's ``SettlementSource`` names, with the same parameters."""
    import inspect

    from cardswitch.settlement.source import SettlementSource

    for name, member in vars(SettlementSource).items():
        if name.startswith("_") or not callable(member):
            continue
        assert hasattr(PgSettlementSource, name), f"PgSettlementSource lacks {name}"
        want = list(inspect.signature(member).parameters)
        assert list(inspect.signature(getattr(PgSettlementSource, name)).parameters) == want, name


def test_every_read_answers_as_the_sqlite_source(journals):
    day, lite_dir, url = journals
    with SqliteSource(str(lite_dir / "journal.db")) as lite:
        expected = _answers(lite, day)
    with PgSettlementSource(url) as pg:
        got = _answers(pg, day)
    assert got == expected
    assert any(rows for rows in expected[3:6])          # the day is not empty


def test_settling_from_either_journal_writes_the_same_files(journals, tmp_path):
    day, lite_dir, url = journals
    lite_net = make_network(lite_dir)
    pg_dir = tmp_path / "pg"
    pg_net = make_network(pg_dir)
    pg_net = dataclasses.replace(pg_net, switch=dataclasses.replace(pg_net.switch, journal=url))
    for date in (D1, D2):
        a = settle(lite_net, date)
        b = settle(pg_net, date, opener=lambda net: PgSettlementSource(net.switch.journal))
        assert a.fingerprint == b.fingerprint
        names = sorted(p.name for p in a.folder.iterdir() if p.is_file())
        assert names == sorted(p.name for p in b.folder.iterdir() if p.is_file())
        assert any(n.startswith("clearing_") for n in names)
        for name in names:
            if name.endswith(".csv"):
                assert (a.folder / name).read_bytes() == (b.folder / name).read_bytes(), name


def test_the_source_reads_one_snapshot(journals):
    day, _, url = journals
    src = PgSettlementSource(url)
    try:
        before = len(list(src.iter_candidates(D1)))
        first = next(src.iter_candidates(D1))
        with PgJournal.open(url, "") as node:          # a switch node goes on writing
            late = dataclasses.replace(first, id=node.next_id(), rrn="000000000000", kind=Kind.PURCHASE)
            node.insert(late)
            node.set_state(STATE_BUSINESS_DATE, "2026-03-09")
        assert len(list(src.iter_candidates(D1))) == before
        assert src.current_business_date() == D3
        assert late.id not in {r.id for r in src.iter_candidates(D1)}
    finally:
        src.close()
    with PgSettlementSource(url) as fresh:
        assert len(list(fresh.iter_candidates(D1))) == before + 1
        assert fresh.current_business_date() == "2026-03-09"


def test_no_journal_is_a_source_error(pg_url):
    with pytest.raises(SourceError, match="no journal"):
        PgSettlementSource(pg_url)
    with pytest.raises(SourceError, match="schema"):
        PgSettlementSource(pg_url.replace("?schema=", "?schema=Bad-"))


def test_many_rows_stream_in_order(pg_url):
    """More candidates than one cursor fetch: all of them, in (rrn, id) order."""
    day = Day()
    template = day.p1
    with PgJournal.open(pg_url, "") as j:
        for i in range(4500):
            j.insert(dataclasses.replace(template, id=10_000 + i, rrn=f"{(i * 7919) % 4500:012d}"))
        j.set_state(STATE_BUSINESS_DATE, D3)
    with PgSettlementSource(pg_url) as src:
        rows = list(src.iter_candidates(D1))
    assert len(rows) == 4500
    assert [(r.rrn, r.id) for r in rows] == sorted((r.rrn, r.id) for r in rows)
