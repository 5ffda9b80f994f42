"""Settlement at scale: time and peak memory of `settle` over a large day.

    .venv/bin/python bench/bench_settle.py [--txns 1000000] [--merchants 10000] [--runs 3] [--dir DIR]
        [--postgres URL|auto]

Builds (once per --dir; reused when it is already there) a network file of
--merchants merchants at 8 banks (written by ``netfile.dump_network`` and
read back by ``parse_network``), and a journal in the switch's own schema
holding --txns requests of one business date: mostly purchases, then
withdrawals, refunds, deposits, transfers (a third between banks), bill
payments, completions of pre-authorizations, balance inquiries, declines
(5%), voids and reversals on the same date (1%), and reversals of the
previous date's purchases; batch closes with an upload for a few terminals.
Rows go straight into SQLite with the journal's INSERT statement (the
Journal API's writer thread would take minutes to fill it, and the rows are
the same).

Each run settles the date in a child process (`python bench_settle.py
--child`), which reports its wall time and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: interpreter and imports
included). Reported: the median of --runs runs, each run's figures, and the
baseline of the same child doing nothing but importing cardswitch and
counting the date's rows with one SQL query (what a run costs before any
settlement work).

With ``--postgres URL`` (``auto``: ``postgresql://postgres@127.0.0.1:5432/postgres``)
the same day is settled from a PostgreSQL journal instead: the generated
SQLite journal's rows are bulk-copied (COPY, ``copy_records_to_table``)
into a fresh schema (the URL's ``?schema=`` if given, else
``bench_settle_<pid>``) created by ``PgJournal.open``, settled with the
network's journal URL pointing at it (output under ``<dir>/pg``), and the
schema is dropped afterwards unless the URL named it. The baseline counts
the date's rows in PostgreSQL. Goal (issue 5): 1,000,000 transactions over 10,000
merchants in under 30 s and under 1 GB peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cardswitch.config import (  # noqa: E402
    Bank,
    BinRange,
    Endpoint,
    HsmConfig,
    Merchant,
    Network,
    SwitchConfig,
    Terminal,
)
from cardswitch.netfile import dump_network, parse_network  # noqa: E402
from cardswitch.pan import luhn_check_digit, mask_pan  # noqa: E402
from cardswitch.switch import journal_schema as schema  # noqa: E402
from cardswitch.switch.cutover import STATE_BUSINESS_DATE  # noqa: E402
from cardswitch.switch.journal import Journal  # noqa: E402
from cardswitch.switch.records import Kind, Status  # noqa: E402

DATE = "2026-01-15"
PREVIOUS = "2026-01-14"
NEXT = "2026-01-16"
N_BANKS = 8

# (kind, proc, share)
MIX = ((Kind.PURCHASE, "000000", 0.66), (Kind.WITHDRAWAL, "011000", 0.08), (Kind.REFUND, "200000", 0.04),
       (Kind.DEPOSIT, "210000", 0.03), (Kind.TRANSFER, "401010", 0.04), (Kind.BILL_PAYMENT, "500000", 0.04),
       (Kind.PREAUTH, "000000", 0.02), (Kind.BALANCE, "301000", 0.04), (Kind.VOID, "020000", 0.0),
       (Kind.REVERSAL, "000000", 0.0))


def build_network(data_dir: Path, merchants: int) -> Network:
    banks = []
    for i in range(N_BANKS):
        banks.append(Bank(
            id=f"BANK{i:02d}", institution_id=f"1000{i:04d}", name=f"Bank {i}",
            hosts=(Endpoint("127.0.0.1", 9100 + i),), simulate=False,
            interchange_bps=30 + 5 * i, debit_cap=1000 + 100 * i, atm_fee=200 + 25 * i,
            bins=(BinRange(f"6{i:02d}100", f"6{i:02d}100", "debit"),
                  BinRange(f"6{i:02d}20000", f"6{i:02d}29999", "credit"))))
    ms = []
    for m in range(merchants):
        mid = f"8984401{m:08d}"
        atm = m % 20 == 0
        ms.append(Merchant(
            id=mid, acquirer=f"BANK{m % N_BANKS:02d}", name=f"Merchant {m}", city="Shanghai",
            mcc="6011" if atm else "5812", mdr_bps=0 if atm else 40 + m % 60,
            debit_cap=0 if atm else 1500 + m % 1000, min_fee=m % 3,
            terminals=(Terminal(f"T{m:07d}", "atm" if atm else "pos", mid),)))
    sw = SwitchConfig(institution_id="99900001", data_dir=str(data_dir),
                      journal=f"sqlite:///{data_dir}/journal.db", switch_fee=10)
    net = Network(switch=sw, hsm=HsmConfig(), banks=tuple(banks), merchants=tuple(ms), source="bench")
    return parse_network(dump_network(net), "bench-network.toml")


def card(bank: int, credit: bool, n: int) -> str:
    """A 16-digit PAN of ``bank``: debit under its 6-digit BIN, credit in its 8-digit range."""
    prefix = f"6{bank:02d}2{n % 10000:04d}" if credit else f"6{bank:02d}100"
    body = prefix + f"{n:015d}"[-(15 - len(prefix)):]
    return body + luhn_check_digit(body)


def build_journal(data_dir: Path, net: Network, txns: int, seed: int = 1) -> None:
    rnd = random.Random(seed)
    j = Journal.open(net.switch.journal, str(data_dir))   # creates the schema
    j.set_state(STATE_BUSINESS_DATE, NEXT)
    j.close()
    con = sqlite3.connect(str(data_dir / "journal.db"))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    merchants = net.merchants
    atm_merchants = [m for m in merchants if m.mcc == "6011"]
    pos_merchants = [m for m in merchants if m.mcc != "6011"]
    kinds = [k for k, _, s in MIX if s > 0]
    weights = [s for _, _, s in MIX if s > 0]
    procs = {k: p for k, p, _ in MIX}
    fields = schema.TXN_FIELDS
    base = {f: 0 if schema._HINTS[f] in (int, bool) else "" for f in fields}
    base.update(orig_id=None, cancelled_by=None)
    rows: list[tuple] = []
    approved: list[tuple[int, str, str, int, str, str, str]] = []   # for voids/reversals/completions
    next_id = 1

    def add(**kw) -> int:
        nonlocal next_id
        d = dict(base)
        d.update(kw)
        d["id"] = next_id
        rows.append(tuple(d[f] for f in fields))
        next_id += 1
        if len(rows) >= 50_000:
            flush()
        return d["id"]

    def flush() -> None:
        con.executemany(schema.TXN_INSERT, rows)
        con.commit()
        rows.clear()

    def common(date: str, m: Merchant, kind: str, amount: int, i: int) -> dict:
        bank = rnd.randrange(N_BANKS)
        credit = rnd.random() < 0.4
        pan = card(bank, credit, i)
        term = m.terminals[0]
        return dict(business_date=date, received_at=f"{date}T08:00:00.{i % 1000000:06d}Z", mti="0200",
                    proc=procs[kind], kind=kind, amount=amount, currency="156", terminal_id=term.id,
                    merchant_id=m.id, stan=f"{i % 1000000:06d}", transmitted=f"{date[5:7]}{date[8:10]}080000",
                    batch="000001", pan_masked=mask_pan(pan), pan_token=f"{i:032x}", acquirer_id=m.acquirer,
                    issuer_id=f"BANK{bank:02d}", rrn=f"6015{i:08d}", issuer_stan=f"{i % 1000000:06d}",
                    issuer_transmitted=f"{date[5:7]}{date[8:10]}080001", completed_at=f"{date}T08:00:01.000000Z",
                    latency_us=900)

    # the previous date: purchases, some reversed on DATE
    prev = []
    for i in range(max(1, txns // 200)):
        m = pos_merchants[rnd.randrange(len(pos_merchants))]
        c = common(PREVIOUS, m, Kind.PURCHASE, rnd.randint(100, 500000), 90_000_000 + i)
        c.update(status=Status.APPROVED, response_code="00", auth_code=f"{i % 1000000:06d}")
        prev.append((add(**c), c))
    serial = 0
    n = 0
    while n < txns:
        serial += 1
        kind = rnd.choices(kinds, weights)[0]
        m = (atm_merchants if kind in (Kind.WITHDRAWAL, Kind.DEPOSIT) else pos_merchants)
        m = m[rnd.randrange(len(m))]
        amount = 0 if kind == Kind.BALANCE else rnd.randint(100, 500000)
        c = common(DATE, m, kind, amount, serial)
        if kind == Kind.PREAUTH:
            c["mti"] = "0100"
        if kind == Kind.TRANSFER:
            to_bank = rnd.randrange(N_BANKS) if rnd.random() < 0.33 else int(c["issuer_id"][4:])
            to_pan = card(to_bank, False, serial + 7)
            c.update(to_issuer_id=f"BANK{to_bank:02d}", to_pan_masked=mask_pan(to_pan),
                     to_pan_token=f"{serial + 7:032x}", to_auth_code="T00001")
        if rnd.random() < 0.05:
            c.update(status=Status.DECLINED, response_code="51")
            add(**c)
            n += 1
            continue
        c.update(status=Status.APPROVED, response_code="00", auth_code=f"{serial % 1000000:06d}")
        rid = add(**c)
        n += 1
        if kind == Kind.PREAUTH and n < txns:
            serial += 1
            cc = dict(c, id=0, kind=Kind.COMPLETION, mti="0200", amount=max(1, amount - 100),
                      orig_id=rid, rrn=f"6015{serial:08d}", stan=f"{serial % 1000000:06d}")
            add(**cc)
            n += 1
        elif kind in (Kind.PURCHASE, Kind.WITHDRAWAL) and rnd.random() < 0.01 and n < txns:
            serial += 1
            undo = Kind.VOID if kind == Kind.PURCHASE and rnd.random() < 0.5 else Kind.REVERSAL
            uc = dict(c, kind=undo, mti="0400" if undo == Kind.REVERSAL else "0200",
                      proc=procs[Kind.VOID] if undo == Kind.VOID else c["proc"], orig_id=rid,
                      rrn=f"6015{serial:08d}", stan=f"{serial % 1000000:06d}", auth_code="")
            add(**uc)
            n += 1
    # reversals today of a fifth of the previous date's purchases
    for rid, c in prev[::5]:
        serial += 1
        add(**dict(c, business_date=DATE, kind=Kind.REVERSAL, mti="0400", orig_id=rid,
                   rrn=f"6015{serial:08d}", stan=f"{serial % 1000000:06d}", auth_code=""))
    flush()
    # batch closes: a few terminals answered 95 and uploaded
    for k in range(20):
        m = pos_merchants[k]
        con.execute(
            "INSERT INTO batch_close (terminal_id, batch, business_date, result, closed_at, "
            "switch_credits_number, switch_credits_amount, switch_debits_number, switch_debits_amount, "
            "terminal_credits_number, terminal_credits_amount, terminal_debits_number, terminal_debits_amount) "
            "VALUES (?, '000001', ?, ?, ?, 0, 0, 1, 100, 0, 0, 2, 200)",
            (m.terminals[0].id, DATE, "95" if k % 2 else "00", f"{DATE}T22:00:00Z"))
        if k % 2:
            con.execute("INSERT INTO batch_upload (terminal_id, batch, rrn, stan, proc, amount, auth_code, "
                        "pan_masked, received_at) VALUES (?, '000001', ?, '000001', '000000', 100, '', '', ?)",
                        (m.terminals[0].id, f"6999{k:08d}", f"{DATE}T22:00:00Z"))
    con.commit()
    con.execute("ANALYZE")
    con.close()


PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
_COPY_CHUNK = 50_000
_BATCH_CLOSE_COLS = ("terminal_id", "batch", "business_date", "result", "closed_at",
                     "switch_credits_number", "switch_credits_amount", "switch_debits_number",
                     "switch_debits_amount", "terminal_credits_number", "terminal_credits_amount",
                     "terminal_debits_number", "terminal_debits_amount")
_UPLOAD_COLS = ("terminal_id", "batch", "rrn", "stan", "proc", "amount", "auth_code", "pan_masked", "received_at")


def pg_url(url: str) -> tuple[str, bool]:
    """(the journal URL to settle from, whether its schema is ours to drop)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    url = PG_DEFAULT if url == "auto" else url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "schema" for k, _ in query):
        return url, False
    query.append(("schema", f"bench_settle_{os.getpid()}"))
    return urlunsplit(parts._replace(query=urlencode(query))), True


def load_postgres(data_dir: Path, url: str) -> int:
    """Copy the generated SQLite journal into the PostgreSQL journal ``url``; rows copied."""
    import asyncio

    import asyncpg

    from cardswitch.switch.journal_pg import PgJournal, pg_target

    target = pg_target(url)
    j = PgJournal.open(url)                 # creates the schema, as the switch would
    j.set_state(STATE_BUSINESS_DATE, NEXT)
    j.close()
    src = sqlite3.connect(str(data_dir / "journal.db"))
    fields = schema.TXN_FIELDS
    bools = [i for i, f in enumerate(fields) if schema._HINTS[f] is bool]

    async def copy() -> int:
        con = await asyncpg.connect(target.dsn)
        n = 0
        try:
            await con.execute(f"TRUNCATE {target.schema}.txn, {target.schema}.batch_close, "
                              f"{target.schema}.batch_upload, {target.schema}.open_batch")
            cur = src.execute(f"SELECT {', '.join(fields)} FROM txn ORDER BY id")
            while chunk := cur.fetchmany(_COPY_CHUNK):
                if bools:
                    chunk = [tuple(bool(v) if i in bools else v for i, v in enumerate(r)) for r in chunk]
                await con.copy_records_to_table("txn", records=chunk, columns=list(fields),
                                                schema_name=target.schema)
                n += len(chunk)
            for table, cols in (("batch_close", _BATCH_CLOSE_COLS), ("batch_upload", _UPLOAD_COLS)):
                rows = src.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY id").fetchall()
                if rows:
                    await con.copy_records_to_table(table, records=rows, columns=list(cols),
                                                    schema_name=target.schema)
            await con.execute(f"ANALYZE {target.schema}.txn")
        finally:
            await con.close()
        return n

    try:
        return asyncio.run(copy())
    finally:
        src.close()


def pg_row_count(url: str) -> int:
    import asyncio

    import asyncpg

    from cardswitch.switch.journal_pg import pg_target

    target = pg_target(url)

    async def count() -> int:
        con = await asyncpg.connect(target.dsn)
        try:
            return await con.fetchval(f"SELECT COUNT(*) FROM {target.schema}.txn WHERE business_date = $1", DATE)
        finally:
            await con.close()

    return asyncio.run(count())


def drop_pg_schema(url: str) -> None:
    import asyncio

    import asyncpg

    from cardswitch.switch.journal_pg import pg_target

    target = pg_target(url)

    async def drop() -> None:
        con = await asyncpg.connect(target.dsn)
        try:
            await con.execute(f"DROP SCHEMA IF EXISTS {target.schema} CASCADE")
        finally:
            await con.close()

    asyncio.run(drop())


def child(data_dir: str, mode: str, pg: str | None = None) -> None:
    t0 = time.perf_counter()
    from cardswitch.netfile import load_network
    net = load_network(os.path.join(data_dir, "network.toml"))
    if pg:
        import dataclasses
        out = os.path.join(data_dir, "pg")
        net = dataclasses.replace(net, switch=dataclasses.replace(net.switch, journal=pg, data_dir=out))
    if mode == "baseline":
        if pg:
            n = pg_row_count(pg)
        else:
            con = sqlite3.connect(os.path.join(data_dir, "journal.db"))
            n = con.execute("SELECT COUNT(*) FROM txn WHERE business_date = ?", (DATE,)).fetchone()[0]
            con.close()
        result = {"rows": n}
    else:
        from cardswitch.settlement.run import settle
        res = settle(net, DATE, lock_timeout_s=60)
        result = {"counted": res.entries, "merchants": len(res.merchant_rows),
                  "participants": len(res.position_rows), "fingerprint": res.fingerprint}
    result["seconds"] = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = ru.ru_utime + ru.ru_stime
    result["max_rss_mb"] = ru.ru_maxrss / 1024
    print(json.dumps(result))


def run_child(data_dir: Path, mode: str, pg: str | None = None) -> dict:
    extra = ["--pg-journal", pg] if pg else []
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(data_dir), *extra],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--txns", type=int, default=1_000_000)
    ap.add_argument("--merchants", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", help="where to keep the generated network and journal (reused if present)")
    ap.add_argument("--postgres", metavar="URL|auto",
                    help="settle from a PostgreSQL journal (a fresh schema unless the URL names one)")
    ap.add_argument("--child", choices=("settle", "baseline", "load"), help=argparse.SUPPRESS)
    ap.add_argument("--pg-journal", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "load":
        print(json.dumps({"rows": load_postgres(Path(args.dir), args.pg_journal)}))
        return 0
    if args.child:
        child(args.dir, args.child, args.pg_journal)
        return 0
    tmp = None
    if args.dir:
        data = Path(args.dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-settle-")
        data = Path(tmp.name)
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "journal.db").exists():
        t0 = time.perf_counter()
        net = build_network(data, args.merchants)
        (data / "network.toml").write_text(dump_network(net), encoding="utf-8")
        build_journal(data, net, args.txns)
        print(f"generated {args.txns:,} requests over {args.merchants:,} merchants in "
              f"{time.perf_counter() - t0:.1f}s ({data})", flush=True)
    pg, drop = pg_url(args.postgres) if args.postgres else (None, False)
    try:
        if pg:
            t0 = time.perf_counter()
            # In a child: the settle children's peak RSS (ru_maxrss) starts from this
            # process's RSS when they are spawned, so this one stays small.
            n = run_child(data, "load", pg)["rows"]
            print(f"copied {n:,} journal rows into PostgreSQL in {time.perf_counter() - t0:.1f}s "
                  f"({pg.split('@')[-1]})", flush=True)
        return report(args, data, tmp, pg)
    finally:
        if pg and drop:
            drop_pg_schema(pg)


def report(args: argparse.Namespace, data: Path, tmp, pg: str | None) -> int:
    journal = "PostgreSQL" if pg else "SQLite"
    base = run_child(data, "baseline", pg)
    runs = []
    for i in range(args.runs):
        r = run_child(data, "settle", pg)
        runs.append(r)
        print(f"run {i + 1}: {r['seconds']:.2f}s wall, {r['cpu_seconds']:.2f}s CPU, peak RSS {r['max_rss_mb']:.0f} MB, "
              f"{r['counted']:,} counted, {r['merchants']:,} merchant rows", flush=True)
    med_s = statistics.median(r["seconds"] for r in runs)
    med_m = statistics.median(r["max_rss_mb"] for r in runs)
    med_c = statistics.median(r["cpu_seconds"] for r in runs)
    print(f"baseline (start, read the network, count rows): {base['seconds']:.2f}s wall, "
          f"{base['cpu_seconds']:.2f}s CPU, "
          f"peak RSS {base['max_rss_mb']:.0f} MB, {base['rows']:,} rows")
    print(f"{journal} settle median of {len(runs)}: {med_s:.2f}s wall ({med_s / max(base['seconds'], 1e-9):.1f}x baseline), "
          f"{med_c:.2f}s CPU, peak RSS {med_m:.0f} MB (load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs: wall time on a shared machine is an upper bound)")
    ok = med_s < 30 and med_m < 1024
    print(f"goal (< 30 s, < 1 GB at 1,000,000 x 10,000): {'met' if ok else 'NOT met'}"
          + ("" if args.txns >= 1_000_000 else " (smaller run)"))
    if len({r['fingerprint'] for r in runs}) != 1:
        print("runs disagree on the fingerprint!")
        return 1
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
