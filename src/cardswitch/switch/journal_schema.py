"""The journal's tables, as SQLite DDL.

The ``txn`` table has one column per ``TxnRecord`` field, derived from the
dataclass so that a field added to the record (with a default) becomes a
column, and an existing journal gains it when opened (``missing_columns``).
Tables are STRICT: a float or a string can never land in a money column.

There is no column for a full PAN, PIN block, track data or CVV, and the
record has no such field; ``FORBIDDEN_COLUMNS`` keeps it that way (checked
at import and by the tests).

``open_batch`` holds the terminal batches not yet closed by a 0500 answered
00, kept by triggers as rows arrive and closes are recorded, so that the
start-up query for open batches reads a handful of rows, not the journal.

``saf`` is the store-and-forward queue (``cardswitch.switch.saf``): one row
per advice owed to an issuer, one column per ``SafEntry`` field, derived the
same way. Delivered and parked rows stay (for the operators); the partial
index keeps the start-up query for the queued ones to a handful of rows.
"""

from __future__ import annotations

import dataclasses
import typing

from cardswitch.iso8583.constants import RC
from cardswitch.switch import saf
from cardswitch.switch.records import Status, TxnRecord

# 2: the saf table (store-and-forward) and txn.late_response_code.
SCHEMA_VERSION = 2

FORBIDDEN_COLUMNS = frozenset({
    "pan", "to_pan", "track2", "track", "pin", "pin_block", "cvv", "cvv2", "cvc",
    "clear_key", "tpk", "tak", "tmk", "zpk", "zak",
})


def _column_type(name: str, hint: object, default: object) -> str:
    if name == "id":
        return "INTEGER PRIMARY KEY"
    if hint is bool:
        sql, zero = "INTEGER NOT NULL", 0
    elif hint is int:
        sql, zero = "INTEGER NOT NULL", 0
    elif hint is str:
        sql, zero = "TEXT NOT NULL", ""
    elif hint is float:
        sql, zero = "REAL NOT NULL", 0.0
    elif hint == (int | None):
        return "INTEGER"
    elif hint == (str | None):
        return "TEXT"
    else:
        raise TypeError(f"TxnRecord.{name}: type {hint!r} has no journal column type")
    if default is dataclasses.MISSING:
        return sql
    value = int(default) if isinstance(default, bool) else default
    return f"{sql} DEFAULT {_literal(value if value is not None else zero)}"


def _literal(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


_HINTS = typing.get_type_hints(TxnRecord)


def _txn_columns() -> tuple[tuple[str, str], ...]:
    cols = []
    for f in dataclasses.fields(TxnRecord):
        if f.name in FORBIDDEN_COLUMNS:
            raise TypeError(f"TxnRecord.{f.name}: the journal never stores that")
        cols.append((f.name, _column_type(f.name, _HINTS[f.name], f.default)))
    return tuple(cols)


# (name, SQL type) in TxnRecord field order: SELECTs return rows in this order,
# so a row is ``TxnRecord(*row)`` with its bool fields turned back into bools.
TXN_COLUMNS = _txn_columns()
TXN_FIELDS = tuple(name for name, _ in TXN_COLUMNS)
BOOL_FIELDS = tuple(name for name in TXN_FIELDS if _HINTS[name] is bool)

# ``finish`` updates every column but these: the request as received (fixed
# at insert; several are indexed) and the cancel mark, which belongs to
# ``mark_cancelled`` and may be written before the outcome (a reversal that
# overtakes its original's response). A field added to the record later is
# an outcome field unless it is named here.
REQUEST_FIELDS = frozenset({
    "id", "business_date", "received_at", "mti", "proc", "kind", "amount", "currency",
    "terminal_id", "merchant_id", "stan", "transmitted", "batch",
})
CANCEL_FIELDS = frozenset({"cancelled", "cancelled_by"})
OUTCOME_FIELDS = tuple(f for f in TXN_FIELDS if f not in REQUEST_FIELDS | CANCEL_FIELDS)

TXN_SELECT = "SELECT " + ", ".join(TXN_FIELDS) + " FROM txn"
TXN_INSERT = (f"INSERT INTO txn ({', '.join(TXN_FIELDS)}) "
              f"VALUES ({', '.join('?' * len(TXN_FIELDS))})")
# An upsert, so that an outcome is kept even if its write-ahead row was lost.
# A plain UPDATE of the outcome columns: the write-ahead row is always there
# (same writer thread, queued first), and an update by primary key is much
# cheaper than an upsert that first tries the insert.
# Every outcome column, by primary key: the write-ahead row is always there
# (same writer thread, queued first), and a plain UPDATE is cheaper than an
# upsert that first tries the insert.
FINISH_FIELDS = OUTCOME_FIELDS
TXN_FINISH = ("UPDATE txn SET " + ", ".join(f"{c} = ?" for c in FINISH_FIELDS) + " WHERE id = ?")
FINISH_INDEXES = tuple(TXN_FIELDS.index(c) for c in FINISH_FIELDS)

_SAF_HINTS = typing.get_type_hints(saf.SafEntry)


def _saf_columns() -> tuple[tuple[str, str], ...]:
    cols = []
    for f in dataclasses.fields(saf.SafEntry):
        if f.name in FORBIDDEN_COLUMNS:
            raise TypeError(f"SafEntry.{f.name}: the journal never stores that")
        cols.append((f.name, _column_type(f.name, _SAF_HINTS[f.name], f.default)))
    return tuple(cols)


SAF_COLUMNS = _saf_columns()
SAF_FIELDS = tuple(name for name, _ in SAF_COLUMNS)
SAF_SELECT = "SELECT " + ", ".join(SAF_FIELDS) + " FROM saf"
SAF_INSERT = (f"INSERT INTO saf ({', '.join(SAF_FIELDS)}) "
              f"VALUES ({', '.join('?' * len(SAF_FIELDS))})")
SAF_UPDATE = "UPDATE saf SET state = ?, attempts = ?, last_error = ?, updated_at = ? WHERE id = ?"

_TOTALS = ("credits_number", "credits_amount", "debits_number", "debits_amount")

DDL = f"""
CREATE TABLE IF NOT EXISTS txn (
    {(',' + chr(10) + '    ').join(f'{n} {t}' for n, t in TXN_COLUMNS)}
) STRICT;
CREATE INDEX IF NOT EXISTS txn_business_date ON txn (business_date);
CREATE INDEX IF NOT EXISTS txn_terminal_batch ON txn (terminal_id, batch);
CREATE INDEX IF NOT EXISTS txn_rrn ON txn (rrn);
-- Partial: only rows still waiting for an outcome, so finished rows cost nothing here.
CREATE INDEX IF NOT EXISTS txn_pending ON txn (status) WHERE status = '{Status.PENDING}';

CREATE TABLE IF NOT EXISTS batch_close (
    id INTEGER PRIMARY KEY,
    terminal_id TEXT NOT NULL,
    batch TEXT NOT NULL,
    business_date TEXT NOT NULL,
    result TEXT NOT NULL CHECK (result IN ('{RC.APPROVED}', '{RC.RECONCILE_ERROR}')),
    closed_at TEXT NOT NULL,
    {(',' + chr(10) + '    ').join(f'switch_{t} INTEGER NOT NULL' for t in _TOTALS)},
    {(',' + chr(10) + '    ').join(f'terminal_{t} INTEGER NOT NULL' for t in _TOTALS)}
) STRICT;
CREATE INDEX IF NOT EXISTS batch_close_terminal_batch ON batch_close (terminal_id, batch);

-- 0320 rows as the terminal uploaded them (masked PAN only). An exact
-- re-send is kept once; anything that differs is kept.
CREATE TABLE IF NOT EXISTS batch_upload (
    id INTEGER PRIMARY KEY,
    terminal_id TEXT NOT NULL,
    batch TEXT NOT NULL,
    rrn TEXT NOT NULL,
    stan TEXT NOT NULL,
    proc TEXT NOT NULL,
    amount INTEGER NOT NULL,
    auth_code TEXT NOT NULL,
    pan_masked TEXT NOT NULL,
    received_at TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS batch_upload_row
    ON batch_upload (terminal_id, batch, stan, rrn, proc, amount, auth_code, pan_masked);

CREATE TABLE IF NOT EXISTS open_batch (
    terminal_id TEXT NOT NULL,
    batch TEXT NOT NULL,
    PRIMARY KEY (terminal_id, batch)
) STRICT, WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS txn_opens_batch AFTER INSERT ON txn
WHEN NEW.batch != '' AND NOT EXISTS (
    SELECT 1 FROM batch_close c
    WHERE c.terminal_id = NEW.terminal_id AND c.batch = NEW.batch AND c.result = '{RC.APPROVED}')
BEGIN
    INSERT OR IGNORE INTO open_batch (terminal_id, batch) VALUES (NEW.terminal_id, NEW.batch);
END;
CREATE TRIGGER IF NOT EXISTS batch_close_closes AFTER INSERT ON batch_close
WHEN NEW.result = '{RC.APPROVED}'
BEGIN
    DELETE FROM open_batch WHERE terminal_id = NEW.terminal_id AND batch = NEW.batch;
END;

CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at TEXT NOT NULL
) STRICT, WITHOUT ROWID;

-- Store-and-forward: advices owed to issuers (never a clear PAN: pan_sealed is AES-GCM).
CREATE TABLE IF NOT EXISTS saf (
    {(',' + chr(10) + '    ').join(f'{n} {t}' for n, t in SAF_COLUMNS)},
    CHECK (state IN ({', '.join(repr(x) for x in saf.STATES)}))
) STRICT;
CREATE INDEX IF NOT EXISTS saf_queued ON saf (bank_id, id) WHERE state = '{saf.QUEUED}';
CREATE INDEX IF NOT EXISTS saf_txn ON saf (txn_id);
"""


def missing_columns(existing: set[str]) -> list[str]:
    """ALTER statements adding the record's fields an older journal lacks."""
    return [f"ALTER TABLE txn ADD COLUMN {name} {sql}"
            for name, sql in TXN_COLUMNS if name not in existing]
