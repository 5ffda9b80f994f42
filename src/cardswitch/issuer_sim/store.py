"""A simulated bank's persistence: ``<data_dir>/banks/<BANK_ID>.db`` (SQLite, WAL).

The ledger lives in memory (``IssuerLogic``) and is written through: each
outcome becomes a few statements queued on a group-commit ``SqliteWriter``,
and the host answers only once they are committed. Stored: card state
(balance, PIN tries, today's withdrawals, and the PVV or IBM offset the bank
verifies PINs with, computed at card issuance) keyed by PAN token, and every
processed request with its response. Never a full PAN, a PIN, a PIN block,
track data or a key; the token secret is per bank and kept in the same
database.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from cardswitch.config import Card
from cardswitch.issuer_sim.cards import PinRef
from cardswitch.issuer_sim.ledger import Account, Hold, Outcome, Txn
from cardswitch.pan import pan_token
from cardswitch.storage.sqlite_writer import SqliteWriter, Statement
from cardswitch.switch.records import Kind

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    token TEXT PRIMARY KEY,
    pan_masked TEXT NOT NULL,
    expiry TEXT NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    daily_withdrawal_limit INTEGER NOT NULL,
    delay_ms INTEGER NOT NULL,
    balance INTEGER NOT NULL,
    pin_fails INTEGER NOT NULL DEFAULT 0,
    pin_day TEXT NOT NULL DEFAULT '',
    withdrawn INTEGER NOT NULL DEFAULT 0,
    withdrawn_day TEXT NOT NULL DEFAULT '',
    pin_method TEXT NOT NULL DEFAULT 'pvv',
    pvv TEXT NOT NULL DEFAULT '',
    pin_offset TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS txns (
    id INTEGER PRIMARY KEY,
    idem_key TEXT NOT NULL,
    ref TEXT NOT NULL,
    mti TEXT NOT NULL,
    proc TEXT NOT NULL,
    kind TEXT NOT NULL,
    pan_masked TEXT NOT NULL,
    pan_token TEXT NOT NULL,
    to_pan_masked TEXT NOT NULL,
    to_pan_token TEXT NOT NULL,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    response_code TEXT NOT NULL,
    auth_code TEXT NOT NULL,
    rrn TEXT NOT NULL,
    stan TEXT NOT NULL,
    transmitted TEXT NOT NULL,
    business_date TEXT NOT NULL,
    received_at TEXT NOT NULL,
    orig_ref TEXT NOT NULL,
    orig_id INTEGER,
    effects TEXT NOT NULL,
    reversed INTEGER NOT NULL DEFAULT 0,
    voided INTEGER NOT NULL DEFAULT 0,
    hold TEXT NOT NULL DEFAULT '',
    response TEXT NOT NULL,
    had_pan INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS txns_key ON txns(idem_key);
CREATE INDEX IF NOT EXISTS txns_ref ON txns(ref);
CREATE INDEX IF NOT EXISTS txns_bdate ON txns(business_date);
CREATE INDEX IF NOT EXISTS txns_hold ON txns(hold) WHERE hold = 'active';
"""

_TXN_COLS = ("id, idem_key, ref, mti, proc, kind, pan_masked, pan_token, to_pan_masked, "
             "to_pan_token, amount, currency, response_code, auth_code, rrn, stan, transmitted, "
             "business_date, received_at, orig_ref, orig_id, effects, reversed, voided, hold, "
             "response, had_pan")
_INSERT_TXN = f"INSERT OR REPLACE INTO txns ({_TXN_COLS}) VALUES ({', '.join('?' * 27)})"
_UPDATE_TXN = "UPDATE txns SET reversed = ?, voided = ?, hold = ?, orig_id = ? WHERE id = ?"
_CARD_COLS = ("token, pan_masked, expiry, currency, status, daily_withdrawal_limit, delay_ms, "
              "balance, pin_fails, pin_day, withdrawn, withdrawn_day, pin_method, pvv, pin_offset")
# Columns added after the first release: (name, declaration) for ALTER TABLE.
_LATER_CARD_COLS = (("pin_method", "TEXT NOT NULL DEFAULT 'pvv'"), ("pvv", "TEXT NOT NULL DEFAULT ''"),
                    ("pin_offset", "TEXT NOT NULL DEFAULT ''"))
_UPSERT_CARD = (
    f"INSERT INTO cards ({_CARD_COLS}) VALUES ({', '.join('?' * 15)}) "
    "ON CONFLICT(token) DO UPDATE SET pan_masked = excluded.pan_masked, expiry = excluded.expiry, "
    "currency = excluded.currency, status = excluded.status, "
    "daily_withdrawal_limit = excluded.daily_withdrawal_limit, delay_ms = excluded.delay_ms, "
    "balance = excluded.balance, pin_fails = excluded.pin_fails, pin_day = excluded.pin_day, "
    "withdrawn = excluded.withdrawn, withdrawn_day = excluded.withdrawn_day, "
    "pin_method = excluded.pin_method, pvv = excluded.pvv, pin_offset = excluded.pin_offset"
)


def db_path(data_dir: str | os.PathLike, bank_id: str) -> Path:
    return Path(data_dir) / "banks" / f"{bank_id}.db"


def open_writer(data_dir: str | os.PathLike, bank_id: str) -> SqliteWriter:
    path = db_path(data_dir, bank_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteWriter(str(path), SCHEMA)


# -- rows ----------------------------------------------------------------------

def txn_row(t: Txn) -> tuple:
    return (t.id, t.key, t.ref, t.mti, t.proc, t.kind, t.pan_masked, t.token, t.to_pan_masked,
            t.to_token, t.amount, t.currency, t.rc, t.auth_code, t.rrn, t.stan, t.transmitted,
            t.business_date, t.received_at, t.orig_ref, t.orig_id,
            orjson.dumps(t.effects).decode(), int(t.reversed), int(t.voided), t.hold,
            t.response.decode(), int(t.had_pan))


def txn_from_row(r: sqlite3.Row | tuple) -> Txn:
    (id_, key, ref, mti, proc, kind, pan_masked, token, to_masked, to_token, amount, currency,
     rc, auth, rrn, stan, transmitted, bdate, received, orig_ref, orig_id, effects, reversed_,
     voided, hold, response, had_pan) = r
    return Txn(id=id_, key=key, ref=ref, mti=mti, proc=proc, kind=kind, token=token,
               pan_masked=pan_masked, amount=amount, currency=currency, rc=rc, auth_code=auth,
               rrn=rrn, stan=stan, transmitted=transmitted, business_date=bdate,
               received_at=received, orig_ref=orig_ref, orig_id=orig_id, to_token=to_token,
               to_pan_masked=to_masked, effects=tuple(tuple(e) for e in orjson.loads(effects)),
               reversed=bool(reversed_), voided=bool(voided), hold=hold,
               response=response.encode(), had_pan=bool(had_pan))


def card_row(a: Account) -> tuple:
    return (a.token, a.pan_masked, a.expiry, a.currency, a.status, a.daily_withdrawal_limit,
            a.delay_ms, a.balance, a.pin_fails, a.pin_day, a.withdrawn, a.withdrawn_day,
            a.pin_method, a.pvv, a.pin_offset)


def statements(outcome: Outcome) -> list[Statement]:
    """What to write for an outcome. Rows are built now: the objects change later."""
    out: list[Statement] = []
    if outcome.new is not None:
        out.append((_INSERT_TXN, txn_row(outcome.new)))
    for t in outcome.txns:
        out.append((_UPDATE_TXN, (int(t.reversed), int(t.voided), t.hold, t.orig_id, t.id)))
    for a in outcome.accounts:
        out.append((_UPSERT_CARD, card_row(a)))
    return out


# -- loading -------------------------------------------------------------------

@dataclass(slots=True)
class Loaded:
    secret: bytes
    accounts: list[Account]
    txns: list[Txn]
    next_id: int
    new_cards: int
    complete: bool                  # every stored record was loaded


def _migrate(con: sqlite3.Connection) -> None:
    have = {r[1] for r in con.execute("PRAGMA table_info(cards)")}
    for name, decl in _LATER_CARD_COLS:
        if name not in have:
            con.execute(f"ALTER TABLE cards ADD COLUMN {name} {decl}")


def load(con: sqlite3.Connection, cards: Iterable[Card], max_cached: int,
         pin_ref: Callable[[Card], PinRef] | None = None) -> Loaded:
    """Read a bank's state and merge the network file's cards into it.

    Runs on the writer's thread (``SqliteWriter.call``). Cards already known
    keep their balances and counters; their static data (expiry, status,
    limits, delay) follow the file. Cards new in the file are added.
    ``pin_ref`` gives each card's PVV or IBM offset (card issuance, see
    ``cards.pin_ref_for``): that is what is stored, never the PIN; a card it
    gives nothing for keeps what is stored.
    """
    _migrate(con)
    row = con.execute("SELECT v FROM meta WHERE k = 'token_secret'").fetchone()
    if row is None:
        secret = secrets.token_bytes(32)
        con.execute("INSERT INTO meta (k, v) VALUES ('token_secret', ?)", (secret.hex(),))
    else:
        secret = bytes.fromhex(row[0])
    stored = {r[0]: r for r in con.execute(f"SELECT {_CARD_COLS} FROM cards")}
    accounts: dict[str, Account] = {}
    for r in stored.values():
        accounts[r[0]] = Account(token=r[0], pan_masked=r[1], expiry=r[2], currency=r[3],
                                 status=r[4], daily_withdrawal_limit=r[5], delay_ms=r[6],
                                 balance=r[7], pin_fails=r[8], pin_day=r[9], withdrawn=r[10],
                                 withdrawn_day=r[11], pin_method=r[12], pvv=r[13], pin_offset=r[14])
    new_cards = 0
    upserts = []
    for c in cards:
        tok = pan_token(c.pan, secret)
        ref = pin_ref(c) if pin_ref is not None else None
        a = accounts.get(tok)
        if a is None:
            a = accounts[tok] = Account.from_card(c, secret, ref)
            new_cards += 1
        else:
            a.follow(c, ref)
        upserts.append(card_row(a))
    con.execute("BEGIN")
    con.executemany(_UPSERT_CARD, upserts)
    con.execute("COMMIT")
    # Recent records for idempotency and reversals, plus everything still
    # open however old: active holds and reversals whose original never came.
    txns = {}
    for r in con.execute(f"SELECT {_TXN_COLS} FROM txns ORDER BY id DESC LIMIT ?", (max_cached,)):
        txns[r[0]] = txn_from_row(r)
    for r in con.execute(f"SELECT {_TXN_COLS} FROM txns WHERE hold = ? OR (kind = ? AND orig_id IS NULL)",
                         (Hold.ACTIVE, Kind.REVERSAL)):
        txns.setdefault(r[0], txn_from_row(r))
    max_id, count = con.execute("SELECT COALESCE(MAX(id), 0), COUNT(*) FROM txns").fetchone()
    return Loaded(secret=secret, accounts=list(accounts.values()),
                  txns=sorted(txns.values(), key=lambda t: t.id), next_id=max_id + 1,
                  new_cards=new_cards, complete=count <= len(txns))


class Reader:
    """Read-only lookups of records no longer cached in memory (WAL readers never block the writer)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._con = sqlite3.connect(str(path), check_same_thread=False)
        self._con.execute("PRAGMA busy_timeout=5000")

    def lookup(self, what: str, value: str | int) -> Txn | None:
        col = {"key": "idem_key", "ref": "ref", "id": "id"}[what]
        r = self._con.execute(f"SELECT {_TXN_COLS} FROM txns WHERE {col} = ? ORDER BY id DESC LIMIT 1",
                              (value,)).fetchone()
        return txn_from_row(r) if r is not None else None

    def close(self) -> None:
        self._con.close()
