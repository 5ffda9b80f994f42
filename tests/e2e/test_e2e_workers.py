"""End to end: `cardswitch up --workers 2` (operations.md 4, scale-out).

Two switch processes listen on one port (SO_REUSEPORT) and share Redis
(duplicates) and PostgreSQL (journal, a fresh schema per module). The test
finds which worker holds each of its connections (Linux /proc), so it knows
it talks to both:

1. the same request (41 + 11 + 7) sent to each worker: the second gets 94;
2. approved purchases through both workers, an operator cutover on worker 0
   (the admin port), both workers then answer with the new date, and
   `cardswitch settle` over PostgreSQL counts every worker's purchases: the
   merchant totals equal what the test itself saw approved.
3. `--workers 2` on a SQLite journal is refused with one line naming the key.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from services import require_postgres, require_redis

from e2e_support import (
    PURCHASE, Conn, Driver, Stans, assert_response_shape, default_test_network, part_pids, write_network,
)

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"    # default network: BANKA debit card, PIN-less purchases approved
C_DEBIT = "6217000000000014"
ADMIN_TOKEN = "e2e-workers-admin-token"


def _pg_admin(url: str, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        con = await asyncpg.connect(url)
        try:
            await con.execute(sql)
        finally:
            await con.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def net(workdir):
    redis_url = require_redis().url
    base = require_postgres().url
    schema = f"e2e_workers_{uuid.uuid4().hex[:12]}"
    net = default_test_network(workdir / "var")
    net = replace(net, switch=replace(net.switch, journal=f"{base}?schema={schema}", redis=redis_url,
                                      admin_token=ADMIN_TOKEN))
    yield net
    _pg_admin(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="module")
def run(launch, workdir, net):
    r = launch(net, workdir, name="workers", args=("--workers", "2"))
    yield r
    assert r.stop() == 0, r.logs()[-3000:]


def switch_workers(run) -> dict[int, int]:
    """{worker index: pid} of the `serve switch --worker K` processes `up` started."""
    out: dict[int, int] = {}
    for child in Path(f"/proc/{run.proc.pid}/task/{run.proc.pid}/children").read_text().split():
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and b"switch" in argv and b"--worker" in argv:
            out[int(argv[argv.index(b"--worker") + 1])] = int(child)
    return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def worker_of(conn: Conn, workers: dict[int, int], port: int) -> int | None:
    """Which worker accepted ``conn``: the one holding its server-side socket."""
    client_port = conn.sock.getsockname()[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                local, remote = cols[1], cols[2]
                if (int(local.rsplit(":", 1)[1], 16) == port and int(remote.rsplit(":", 1)[1], 16) == client_port
                        and cols[3] == "01"):
                    inodes.add(cols[9])
        for k, pid in workers.items():
            if inodes & _socket_inodes(pid):
                return k
        time.sleep(0.05)     # accepted by the kernel, not yet by the worker's loop
    return None


def conn_per_worker(run, n: int = 2) -> dict[int, Conn]:
    """One connection held by each worker (SO_REUSEPORT spreads them by hash: keep trying)."""
    workers = switch_workers(run)
    assert sorted(workers) == list(range(n)), f"expected workers 0..{n - 1}, found {workers}"
    got: dict[int, Conn] = {}
    spare: list[Conn] = []
    for _ in range(64):
        c = run.conn()
        k = worker_of(c, workers, run.port)
        if k is not None and k not in got:
            got[k] = c
        else:
            spare.append(c)
        if len(got) == n:
            break
    for c in spare:
        c.close()
    assert len(got) == n, f"connections reached workers {sorted(got)} only"
    return got


@pytest.fixture(scope="module")
def conns(run):
    got = conn_per_worker(run)
    yield got
    for c in got.values():
        c.close()


@pytest.fixture(scope="module")
def driver(run):
    d = Driver(run, Stans(random.randrange(1, 900_000)))    # Redis outlives the test: fresh STANs
    yield d
    d.close()


def test_two_workers_share_the_port(run):
    pids = switch_workers(run)
    assert sorted(pids) == [0, 1]
    assert "switch" in part_pids(run)


def test_duplicate_across_workers_is_94(run, conns, driver):
    first = driver.fin("POS00002", PURCHASE, A_DEBIT, 1_234)
    driver.ask(first, "00", conn=conns[0])
    again = dict(first)
    resp = driver.ask(again, conn=conns[1])     # same 41 + 11 + 7, the other process
    assert resp["39"] == "94", resp
    # and the other way round
    second = driver.fin("POS00002", PURCHASE, A_DEBIT, 1_111)
    driver.ask(second, "00", conn=conns[1])
    assert driver.ask(dict(second), conn=conns[0])["39"] == "94"


def test_rrns_differ_across_workers(run, conns, driver):
    rrns = []
    for k in (0, 1, 0, 1):
        rrns.append(driver.ask(driver.fin("POS00002", PURCHASE, A_DEBIT, 10), "00", conn=conns[k])["37"])
    assert len(set(rrns)) == 4, rrns
    # worker 1's sequence lives in its own range (wire.md: YDDD + 8 digits)
    assert rrns[1][4] == "1" and rrns[0][4] == "0", rrns


def http(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {},
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_settlement_sums_both_workers(run, conns, driver, workdir):
    for i in range(12):
        tid, pan, amount = ("POS00002", A_DEBIT, 100 + i) if i % 3 else ("POS00001", C_DEBIT, 2_000 + i)
        req = driver.fin(tid, PURCHASE, pan, amount, pin="1234" if pan == C_DEBIT else None)
        driver.ask(req, "00", conn=conns[i % 2])
    # Expected: every purchase this module saw approved, on either worker (the
    # duplicates' first sends and the RRN probes included; the 94s not).
    approved: Counter = Counter()
    counts: Counter = Counter()
    for req, resp in driver.log:
        if resp.get("39") == "00" and req["t"] == "0200" and req["3"][:2] == PURCHASE:
            approved[req["42"]] += int(req["4"])
            counts[req["42"]] += 1
    assert sum(counts.values()) == 12 + 6

    base = f"http://{run.net.switch.admin.host}:{run.net.switch.admin.port}"
    status, body = http("POST", base + "/api/cutover", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, body
    moved = json.loads(body)
    day, new_day = moved["previous"], moved["business_date"]
    assert new_day > day

    # Both workers follow the shared business date (worker 1 re-reads it).
    new_mmdd = new_day[5:7] + new_day[8:10]
    for k in (0, 1):
        deadline = time.monotonic() + 15
        while True:
            req = driver.fin("POS00002", "30", A_DEBIT, None, batch=99)
            resp = conns[k].request(req)
            assert resp["39"] == "00", resp
            if resp.get("15") == new_mmdd or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert resp.get("15") == new_mmdd, f"worker {k} still on {resp.get('15')}, expected {new_mmdd}"

    out = subprocess.run([sys.executable, "-m", "cardswitch.cli", "settle", "-c", str(run.netfile),
                          "--date", day], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = Path(run.net.switch.data_dir) / "settlement" / day / "merchant_settlement.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = {r["merchant_id"]: r for r in csv.DictReader(f)}
    got = {mid: int(r["purchase_amount"]) for mid, r in rows.items() if int(r["purchase_amount"])}
    assert got == dict(approved)
    assert {mid: int(r["purchase_count"]) for mid, r in rows.items() if int(r["purchase_count"])} == dict(counts)


def test_workers_need_postgres_and_redis(workdir):
    net = default_test_network(workdir / "sqlite_var")
    path = write_network(net, workdir / "sqlite.toml")
    out = subprocess.run([sys.executable, "-m", "cardswitch.cli", "up", "-c", str(path), "--workers", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "cardswitch: --workers 2 needs [switch] journal = postgresql://... (SQLite has one writer)"]
    pg = replace(net, switch=replace(net.switch, journal="postgresql://postgres@127.0.0.1:1/x"))
    path = write_network(pg, workdir / "noredis.toml")
    out = subprocess.run([sys.executable, "-m", "cardswitch.cli", "up", "-c", str(path), "--workers", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "needs [switch] redis" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -- RRN ranges per node (pure: SwitchApp's reserve over a dict as the journal state) ----------


class _State:
    def __init__(self) -> None:
        self.state: dict[str, str] = {}

    def get_state(self, key: str) -> str | None:
        return self.state.get(key)

    def set_state(self, key: str, value: str) -> None:
        self.state[key] = value

    def flush(self) -> None:
        pass


def _allocator(worker: int, state: _State):
    from datetime import datetime, timezone

    from cardswitch.netfile import load_network
    from cardswitch.switch.app import SwitchApp
    from cardswitch.switch.clock import RrnAllocator

    app = SwitchApp(load_network(None), worker=worker)
    app.journal = state
    rrn = RrnAllocator(app._reserve_rrn)
    now = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    return lambda: rrn.next(now)


def test_rrn_ranges_and_keys_per_node():
    state = _State()
    n0, n1, n9 = _allocator(0, state), _allocator(1, state), _allocator(9, state)
    assert [n0(), n0()] == ["633200000000", "633200000001"]    # node 0: today's format and key
    assert [n1(), n1()] == ["633210000000", "633210000001"]
    assert n9() == "633290000000"
    assert set(state.state) == {"rrn:6332", "rrn:1:6332", "rrn:9:6332"}
    # a restart of node 1 goes on past its reserved block, still inside its range
    again = _allocator(1, state)()
    assert again.startswith("63321") and int(again[4:]) >= 10_010_000


def test_rrn_range_of_a_node_is_bounded():
    from cardswitch.netfile import load_network
    from cardswitch.switch.app import RRN_NODE_SPAN, SwitchApp

    with pytest.raises(ValueError):
        SwitchApp(load_network(None), worker=10)
    state = _State()
    state.state["rrn:1:6332"] = str(2 * RRN_NODE_SPAN)        # node 1's range used up today
    with pytest.raises(OverflowError):
        _allocator(1, state)()
