"""PostgreSQL journal write throughput: rows/s through ``PgJournal.insert``/
``finish`` from an event loop, against raw asyncpg in the same run as the
baseline, and with two switch processes sharing the journal.

    .venv/bin/python bench/bench_journal_pg.py [--url postgresql://postgres@127.0.0.1:5432/test]
        [--txns 20000] [--concurrency 200] [--runs 3]

Scenarios, each in a fresh schema (dropped afterwards):

- ``pipeline``: ``--concurrency`` tasks on one uvloop loop; each transaction
  does what the pipeline does for a request sent to an issuer: insert
  (write ahead, await the commit), then finish (await the commit). Two rows
  written per transaction.
- ``fire``: insert + finish for each transaction without awaiting (the
  declined-locally path), then one flush.
- ``2 nodes``: ``pipeline`` in two processes at once on the same journal,
  ``--txns`` each; rows/s of both together, from the first start to the
  last finish.
- ``raw``: the baseline: the same rows straight into a bare table of the
  same shape (no indexes, no triggers, no futures) with asyncpg
  ``executemany`` in transactions of 1,000 transactions, one connection.

Reported per scenario: the median of --runs runs of rows/s, the loop
thread's CPU per row (building the record included), commits per run and
the ratio to the raw baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg  # noqa: E402

from bench_journal import finish_record, make_record  # noqa: E402
from cardswitch.switch import journal_schema as schema  # noqa: E402
from cardswitch.switch.journal_pg import TXN_COLUMNS, PgJournal, pg_target  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


async def pipeline_run(journal: PgJournal, txns: int, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    ids = iter(range(txns))

    async def worker() -> None:
        for _ in ids:
            rec = make_record(journal.next_id())
            await journal.insert(rec, loop)
            finish_record(rec)
            await journal.finish(rec, loop)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def fire_run(journal: PgJournal, txns: int, concurrency: int) -> None:
    for _ in range(txns):
        rec = make_record(journal.next_id())
        journal.insert(rec)
        finish_record(rec)
        journal.finish(rec)


def run_journal(url: str, kind: str, txns: int, concurrency: int, check: bool = True
                ) -> tuple[float, float, int]:
    """(rows/s, loop CPU µs per row, commits) of one scenario in ``url``'s schema."""
    journal = PgJournal.open(url, "")
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
    if check:
        assert sum(journal.count_by_status().values()) == txns, "rows missing"
    journal.close()
    rows = 2 * txns
    return rows / elapsed, cpu / rows * 1e6, commits


def run_nodes(url: str, txns: int, concurrency: int, nodes: int = 2) -> tuple[float, float, int]:
    PgJournal.open(url, "").close()  # the schema exists before the nodes start
    cmd = [sys.executable, __file__, "--child", "--url", url, "--txns", str(txns),
           "--concurrency", str(concurrency)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(nodes)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a node failed")
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    with PgJournal.open(url, "", readonly=True) as ro:
        assert sum(ro.count_by_status().values()) == nodes * txns, "rows missing"
    cpu = statistics.mean(r["cpu_us"] for r in results)
    return 2 * nodes * txns / (end - start), cpu, sum(r["commits"] for r in results)


def child(url: str, txns: int, concurrency: int) -> None:
    journal = PgJournal.open(url, "")
    loop = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
    start, c0 = time.time(), time.thread_time()
    loop.run_until_complete(pipeline_run(journal, txns, concurrency))
    journal.flush()
    end, cpu = time.time(), time.thread_time() - c0
    loop.close()
    commits = journal.writer.commits
    journal.close()
    print(json.dumps({"start": start, "end": end, "cpu_us": cpu / (2 * txns) * 1e6, "commits": commits}))


async def raw_run(url: str, txns: int) -> tuple[float, float, int]:
    target = pg_target(url)
    con = await asyncpg.connect(target.dsn)
    try:
        s = f'"{target.schema}"'
        await con.execute(f"CREATE SCHEMA {s}")
        await con.execute(f"CREATE TABLE {s}.raw ("
                          + ", ".join(f"{n} {t}" for n, t in TXN_COLUMNS) + ")")
        fields = schema.TXN_FIELDS
        insert = (f"INSERT INTO {s}.raw ({', '.join(fields)}) VALUES "
                  f"({', '.join(f'${i + 1}' for i in range(len(fields)))})")
        outcome = schema.OUTCOME_FIELDS
        update = (f"UPDATE {s}.raw SET " + ", ".join(f"{c} = ${i + 1}" for i, c in enumerate(outcome))
                  + f" WHERE id = ${len(outcome) + 1}")
        t0 = time.perf_counter()
        commits = 0
        for start in range(0, txns, 1000):
            recs = [make_record(i + 1) for i in range(start, min(txns, start + 1000))]
            async with con.transaction():
                await con.executemany(insert, [tuple(getattr(r, f) for f in fields) for r in recs])
                for r in recs:
                    finish_record(r)
                await con.executemany(update, [tuple(getattr(r, f) for f in outcome) + (r.id,)
                                               for r in recs])
            commits += 1
        elapsed = time.perf_counter() - t0
    finally:
        await con.close()
    return 2 * txns / elapsed, 0.0, commits


def fresh_url(base: str) -> str:
    return f"{base}{'&' if '?' in base else '?'}schema=bench_{uuid.uuid4().hex[:10]}"


def drop(url: str) -> None:
    async def go() -> None:
        target = pg_target(url)
        con = await asyncpg.connect(target.dsn)
        try:
            await con.execute(f'DROP SCHEMA IF EXISTS "{target.schema}" CASCADE')
        finally:
            await con.close()
    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--txns", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.url, args.txns, args.concurrency)
        return

    scenarios = {
        "raw": lambda url: asyncio.run(raw_run(url, args.txns)),
        "pipeline": lambda url: run_journal(url, "pipeline", args.txns, args.concurrency),
        "fire": lambda url: run_journal(url, "fire", args.txns, args.concurrency),
        "2 nodes": lambda url: run_nodes(url, args.txns, args.concurrency),
    }
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in scenarios}
    for _ in range(args.runs):  # interleaved, so that machine noise hits all alike
        for name, fn in scenarios.items():
            url = fresh_url(args.url)
            try:
                results[name].append(fn(url))
            finally:
                drop(url)

    base = statistics.median(r[0] for r in results["raw"])
    print(f"postgresql journal bench: {args.txns} transactions (2 rows each) per node, concurrency "
          f"{args.concurrency}, median of {args.runs} runs")
    print(f"{'scenario':10} {'rows/s':>10} {'txn/s':>10} {'loop µs/row':>12} {'commits':>8} {'vs raw':>7}")
    for name, rs in results.items():
        rate = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs)
        commits = int(statistics.median(r[2] for r in rs))
        print(f"{name:10} {rate:10,.0f} {rate / 2:10,.0f} {cpu:12.1f} {commits:8d} {rate / base:7.2f}")


if __name__ == "__main__":
    main()
