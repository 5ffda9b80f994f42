"""Journal write throughput: rows/s through ``Journal.insert``/``finish``
from an event loop, against raw SQLite in the same run as the baseline.

    .venv/bin/python bench/bench_journal.py [--txns 20000] [--concurrency 200] [--runs 3]

Scenarios, each on a fresh journal in a temporary directory:

- ``pipeline``: ``--concurrency`` tasks on one uvloop loop; each transaction
  does what the pipeline does for a request sent to an issuer: insert
  (write ahead, await the commit), then finish (await the commit). Two rows
  written per transaction.
- ``fire``: insert + finish for each transaction without awaiting (the
  declined-locally path), then one flush.
- ``raw``: the baseline: the same rows straight into a bare SQLite table of
  the same shape in WAL mode, executemany in batches of 2,000, one thread,
  no indexes, no triggers, no futures.

Reported per scenario: the median of --runs runs of rows/s, the loop
thread's CPU per row (building the record included: an upper bound on what
the journal costs the event loop), and the ratio to the raw baseline.
Commits per run show the group commit at work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cardswitch.pan import mask_pan, pan_token  # noqa: E402
from cardswitch.switch import journal_schema as schema  # noqa: E402
from cardswitch.switch.journal import Journal  # noqa: E402
from cardswitch.switch.records import Kind, Status, TxnRecord  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

SECRET = b"bench"


def make_record(txn_id: int) -> TxnRecord:
    pan = f"622126{txn_id:010d}"
    return TxnRecord(
        id=txn_id, business_date="2026-01-15", received_at="2026-01-15T10:00:00.000000Z",
        mti="0200", proc="000000", kind=Kind.PURCHASE, amount=1000 + txn_id % 5000,
        currency="156", terminal_id=f"POS{txn_id % 500:05d}", merchant_id="898440154110001",
        stan=f"{txn_id % 1000000:06d}", transmitted="0115100000", batch="000001",
        pan_masked=mask_pan(pan), pan_token=pan_token(pan, SECRET), acquirer_id="BANKA",
        issuer_id="BANKB", rrn=f"6015{txn_id:08d}")


def finish_record(rec: TxnRecord) -> None:
    rec.status = Status.APPROVED
    rec.response_code = "00"
    rec.auth_code = "123456"
    rec.issuer_stan = rec.stan
    rec.issuer_transmitted = rec.transmitted
    rec.completed_at = "2026-01-15T10:00:00.010000Z"
    rec.latency_us = 1500


async def pipeline_run(journal: Journal, txns: int, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    ids = iter(range(txns))

    async def worker() -> None:
        for _ in ids:
            rec = make_record(journal.next_id())
            await journal.insert(rec, loop)
            finish_record(rec)
            await journal.finish(rec, loop)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def fire_run(journal: Journal, txns: int, concurrency: int) -> None:
    for _ in range(txns):
        rec = make_record(journal.next_id())
        journal.insert(rec)
        finish_record(rec)
        journal.finish(rec)


def run_journal(kind: str, txns: int, concurrency: int) -> tuple[float, float, int]:
    """(rows/s, loop CPU µs per row, commits)."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal.open(f"sqlite:///{tmp}/journal.db", tmp)
        body = pipeline_run if kind == "pipeline" else fire_run
        loop = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
        try:
            t0, c0 = time.perf_counter(), time.thread_time()
            loop.run_until_complete(body(journal, txns, concurrency))
            cpu = time.thread_time() - c0
            journal.flush()
            elapsed = time.perf_counter() - t0
        finally:
            loop.close()
        commits = journal.writer.commits if journal.writer else 0
        assert len(journal.rows()) == txns, "rows missing"
        journal.close()
    rows = 2 * txns
    return rows / elapsed, cpu / rows * 1e6, commits


def run_raw(txns: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        con = sqlite3.connect(os.path.join(tmp, "raw.db"), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("CREATE TABLE txn (" + ", ".join(f"{n} {t}" for n, t in schema.TXN_COLUMNS) + ")")
        insert = schema.TXN_INSERT
        update = ("UPDATE txn SET " + ", ".join(f"{c} = ?" for c in schema.OUTCOME_FIELDS)
                  + " WHERE id = ?")
        t0 = time.perf_counter()
        commits = 0
        for start in range(0, txns, 1000):
            recs = [make_record(i + 1) for i in range(start, min(txns, start + 1000))]
            con.execute("BEGIN")
            con.executemany(insert, [tuple(getattr(r, f) for f in schema.TXN_FIELDS) for r in recs])
            for r in recs:
                finish_record(r)
            con.executemany(update, [tuple(getattr(r, f) for f in schema.OUTCOME_FIELDS) + (r.id,)
                                     for r in recs])
            con.execute("COMMIT")
            commits += 1
        elapsed = time.perf_counter() - t0
        con.close()
    return 2 * txns / elapsed, 0.0, commits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--txns", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    results: dict[str, list[tuple[float, float, int]]] = {"raw": [], "pipeline": [], "fire": []}
    for _ in range(args.runs):  # interleaved, so that machine noise hits all alike
        results["raw"].append(run_raw(args.txns))
        results["pipeline"].append(run_journal("pipeline", args.txns, args.concurrency))
        results["fire"].append(run_journal("fire", args.txns, args.concurrency))

    base = statistics.median(r[0] for r in results["raw"])
    print(f"journal bench: {args.txns} transactions (2 rows each), concurrency "
          f"{args.concurrency}, median of {args.runs} runs")
    print(f"{'scenario':10} {'rows/s':>10} {'txn/s':>10} {'loop µs/row':>12} {'commits':>8} {'vs raw':>7}")
    for name, rs in results.items():
        rate = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs)
        commits = int(statistics.median(r[2] for r in rs))
        print(f"{name:10} {rate:10,.0f} {rate / 2:10,.0f} {cpu:12.1f} {commits:8d} {rate / base:7.2f}")


if __name__ == "__main__":
    main()
