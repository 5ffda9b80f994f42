"""The journal's store-and-forward table and the reliability columns."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from cardswitch.switch import journal_schema as schema
from cardswitch.switch import saf
from cardswitch.switch.journal import Journal, JournalError
from cardswitch.switch.records import Kind, Status, TxnRecord
from cardswitch.switch.saf import SafEntry


def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/journal.db"


def rec(i: int, **kw) -> TxnRecord:
    base = dict(id=i, business_date="2026-03-14", received_at="2026-03-14T10:00:00.000000Z", mti="0200",
                proc="000000", kind=Kind.PURCHASE, amount=100 * i, currency="156", terminal_id="POS00001",
                merchant_id="898440158120001", stan=f"{i:06d}", transmitted="0314100000", batch="000001",
                pan_masked="622848******0015", pan_token="tok", issuer_id="BANKB", status=Status.APPROVED)
    base.update(kw)
    return TxnRecord(**base)


def entry(j: Journal, txn_id: int, **kw) -> SafEntry:
    base = dict(id=j.next_saf_id(), bank_id="BANKB", kind=saf.REVERSAL, txn_id=txn_id, leg=saf.DEBIT_LEG,
                mti="0420", proc="000000", amount=100, currency="156", orig_mti="0200", orig_stan="000001",
                orig_transmitted="0314100000", stan="000500", transmitted="0314100100", rrn="607300000001",
                terminal_id="POS00001", merchant_id="898440158120001", acquirer_inst="10000001",
                business_date="2026-03-14", created_at="2026-03-14T10:01:00.000000Z")
    base.update(kw)
    return SafEntry(**base)


def test_saf_rows_round_trip_and_survive_reopening(tmp_path):
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        a, b, c = entry(j, 1), entry(j, 2, bank_id="BANKA"), entry(j, 3, kind=saf.STAND_IN, mti="0220",
                                                                   pan_sealed="c2VhbGVk", auth_code="S00003")
        for e in (a, b, c):
            j.saf_insert(e)
        b.state, b.attempts, b.last_error, b.updated_at = saf.DELIVERED, 2, "", "2026-03-14T10:02:00Z"
        j.saf_update(b)
        assert [e.id for e in j.saf_queued()] == [1, 3]
        assert j.saf_entries(txn_id=2) == [b]
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        assert j.saf_queued() == [a, c]
        assert j.saf_counts() == {("BANKA", "delivered"): 1, ("BANKB", "queued"): 2}
        assert j.next_saf_id() == 4                     # ids go on from the journal


def test_saf_update_is_a_future_when_given_a_loop(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        with Journal.open(url(tmp_path), str(tmp_path)) as j:
            e = entry(j, 1)
            await j.saf_insert(e, loop)
            e.state = saf.PARKED
            await j.saf_update(e, loop)
            (row,) = j.saf_entries(state=saf.PARKED)
            assert row.id == e.id and row.updated_at.startswith("20")

    asyncio.run(main())


def test_saf_state_is_checked_and_money_is_int(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        with Journal.open(url(tmp_path), str(tmp_path)) as j:
            with pytest.raises(TypeError):
                j.saf_insert(entry(j, 1, amount=1.5))
            with pytest.raises(sqlite3.IntegrityError):
                await j.saf_insert(entry(j, 1, state="lost"), loop)     # the CHECK constraint
            assert j.healthy and j.saf_entries() == []

    asyncio.run(main())


def test_no_saf_column_can_hold_a_clear_secret():
    assert not set(schema.SAF_FIELDS) & schema.FORBIDDEN_COLUMNS
    assert "pan_sealed" in schema.SAF_FIELDS


def test_late_response_stand_in_usage_and_last_stan(tmp_path):
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        j.insert(rec(1, issuer_stan="000007"))
        j.insert(rec(2, stand_in=True, pan_token="t1", amount=500))
        j.insert(rec(3, stand_in=True, pan_token="t1", amount=700, issuer_stan="000009"))
        j.insert(rec(4, stand_in=True, pan_token="t2", amount=100, status=Status.DECLINED))
        j.insert(rec(5, stand_in=True, pan_token="t1", amount=100, business_date="2026-03-15"))
        j.insert(rec(6, issuer_id="BANKA", issuer_stan="000003"))
        j.set_late_response(1, "00")
        assert j.get(1).late_response_code == "00"
        assert j.standin_usage("2026-03-14") == [("t1", 2, 1200)]
        assert j.last_issuer_stan("BANKB") == "000009"
        assert j.last_issuer_stan("BANKA") == "000003" and j.last_issuer_stan("BANKC") == ""


def test_a_version_1_journal_is_upgraded(tmp_path):
    path = tmp_path / "journal.db"
    con = sqlite3.connect(path)
    v1_columns = [(n, t) for n, t in schema.TXN_COLUMNS if n != "late_response_code"]
    con.executescript(
        "CREATE TABLE txn (" + ", ".join(f"{n} {t}" for n, t in v1_columns) + ") STRICT;"
        "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL) STRICT;"
        "INSERT INTO state VALUES ('schema_version', '1', '2026-01-01T00:00:00Z');")
    con.execute(f"INSERT INTO txn ({', '.join(n for n, _ in v1_columns)}) VALUES "
                f"({', '.join('?' * len(v1_columns))})",
                tuple(getattr(rec(1), n) if not isinstance(getattr(rec(1), n), bool) else 0
                      for n, _ in v1_columns))
    con.commit()
    con.close()
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        assert j.get(1).late_response_code == ""
        assert j.saf_queued() == []
        assert j.get_state("schema_version") == str(schema.SCHEMA_VERSION) == "2"


def test_readonly_journal_reads_saf_but_cannot_queue(tmp_path):
    with Journal.open(url(tmp_path), str(tmp_path)) as j:
        j.saf_insert(entry(j, 1))
    ro = Journal.open(url(tmp_path), str(tmp_path), readonly=True)
    try:
        assert len(ro.saf_queued()) == 1
        with pytest.raises(JournalError):
            ro.next_saf_id()
    finally:
        ro.close()
