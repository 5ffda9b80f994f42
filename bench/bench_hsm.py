"""HSM simulator throughput: CA (PIN translation) and M6 (MAC) calls per second over TCP.

    .venv/bin/python bench/bench_hsm.py [--repeat 5] [--duration 2] [--inflight 64]

The simulator runs in its own process (``python -m cardswitch.hsm_sim``);
this process is the load generator (asyncio + uvloop, closed loop: each
connection keeps ``--inflight`` requests outstanding, pipelined). Cases:
one connection, and a pool of 4 connections sharing the same total in
flight. B2 (echo: framing and dispatch only, no cryptography) is the
baseline measured in the same run; the ratio command / B2 shows what the
cryptography costs. Each figure is the median of ``--repeat`` runs.

The server's CPU time per call (utime + stime from /proc over the measured
window) gives calls per second per core: 1 / CPU per call. That is the
figure for the goal (>= 5,000 CA per second on one core): the measured rate
also depends on the load generator sharing the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from children import Child, cpu_seconds  # noqa: E402

from cardswitch.crypto.des import fix_parity  # noqa: E402
from cardswitch.hsm_sim.lmk import encrypt_under_lmk  # noqa: E402

HEADER = b"0000"
CA = b"CA0406FBB23A5214DFBAB32D775A38E4AB12DC80B186C30902B00301550000025321"
_ZAK = encrypt_under_lmk(fix_parity(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")), "008").encode()
_MSG = bytes(range(256))[:180]       # about a 0200 with its bitmap and fields
M6 = b"M6" + b"00" + b"03" + b"1" + b"008" + _ZAK + b"%04X" % len(_MSG) + _MSG
B2 = b"B2" + b"%04X" % 64 + b"e" * 64
COMMANDS = {"B2": B2, "CA": CA, "M6": M6}
EXPECT = {"B2": b"B300", "CA": b"CB00", "M6": b"M700"}


def frame(body: bytes) -> bytes:
    msg = HEADER + body
    return len(msg).to_bytes(2, "big") + msg


class LoadConn(asyncio.Protocol):
    """Keeps ``inflight`` requests outstanding; counts answers (checked for error 00)."""

    def __init__(self, request: bytes, expect: bytes, inflight: int) -> None:
        self.request = frame(request)
        self.expect = HEADER + expect
        self.inflight = inflight
        self.count = 0
        self.errors = 0
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.stopping = False
        self.outstanding = 0
        self.drained: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.outstanding = self.inflight
        transport.write(self.request * self.inflight)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        n = 0
        end = len(buf)
        exp = self.expect
        el = len(exp)
        while end - pos >= 2:
            ln = (buf[pos] << 8) | buf[pos + 1]
            if end - pos - 2 < ln:
                break
            if buf[pos + 2:pos + 2 + el] != exp:
                self.errors += 1
            pos += 2 + ln
            n += 1
        del buf[:pos]
        if not n:
            return
        self.count += n
        self.outstanding -= n
        if not self.stopping:
            self.outstanding += n
            self.transport.write(self.request * n)
        elif self.outstanding == 0 and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)


async def one_run(port: int, cmd: str, conns: int, inflight: int, warmup: float, duration: float,
                  server_pid: int) -> dict:
    loop = asyncio.get_running_loop()
    per_conn = max(1, inflight // conns)
    protos = []
    for _ in range(conns):
        _, p = await loop.create_connection(lambda: LoadConn(COMMANDS[cmd], EXPECT[cmd], per_conn),
                                            "127.0.0.1", port)
        protos.append(p)
    await asyncio.sleep(warmup)
    c0, cpu0, t0 = sum(p.count for p in protos), cpu_seconds(server_pid), time.perf_counter()
    await asyncio.sleep(duration)
    c1, cpu1, t1 = sum(p.count for p in protos), cpu_seconds(server_pid), time.perf_counter()
    for p in protos:
        p.stopping = True
        p.drained = loop.create_future()
        if p.outstanding == 0:
            p.drained.set_result(None)
    await asyncio.wait_for(asyncio.gather(*(p.drained for p in protos)), 10)
    for p in protos:
        p.transport.close()
    calls = c1 - c0
    return {
        "calls_per_s": calls / (t1 - t0),
        "server_cpu_us_per_call": (cpu1 - cpu0) / calls * 1e6 if calls else float("nan"),
        "errors": sum(p.errors for p in protos),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--duration", type=float, default=2.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--inflight", type=int, default=64, help="requests outstanding per case (split over the pool)")
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args()

    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    log_dir = Path(tempfile.mkdtemp(prefix="bench_hsm."))
    max_s = 60 + a.repeat * 3 * 2 * (a.duration + a.warmup + 1) * 2
    server = Child("hsm_sim", [sys.executable, "-m", "cardswitch.hsm_sim", "--port", "0",
                               "--max-seconds", str(int(max_s))], log_dir)
    try:
        port = int(server.wait_ready(30).split()[1])
        server.drain_stdout()
        cases = [(cmd, conns) for conns in (1, a.pool) for cmd in ("B2", "CA", "M6")]
        runs: dict[str, list[dict]] = {f"{cmd} x{conns}": [] for cmd, conns in cases}
        for _ in range(a.repeat):          # interleave the cases so drift hits them all alike
            for cmd, conns in cases:
                r = asyncio.run(one_run(port, cmd, conns, a.inflight, a.warmup, a.duration, server.pid))
                if r["errors"]:
                    print(f"{cmd} x{conns}: {r['errors']} answers were not '{EXPECT[cmd].decode()}'",
                          file=sys.stderr)
                    return 1
                runs[f"{cmd} x{conns}"].append(r)
    finally:
        server.stop()

    med = {k: {"calls_per_s": statistics.median(r["calls_per_s"] for r in v),
               "server_cpu_us_per_call": statistics.median(r["server_cpu_us_per_call"] for r in v)}
           for k, v in runs.items()}
    print(f"{'case':10} {'calls/s':>10} {'srv CPU µs/call':>16} {'calls/s/core':>13} {'vs B2':>7}")
    for conns in (1, a.pool):
        base = med[f"B2 x{conns}"]["calls_per_s"]
        for cmd in ("B2", "CA", "M6"):
            m = med[f"{cmd} x{conns}"]
            per_core = 1e6 / m["server_cpu_us_per_call"]
            print(f"{cmd + ' x' + str(conns):10} {m['calls_per_s']:10.0f} {m['server_cpu_us_per_call']:16.1f} "
                  f"{per_core:13.0f} {m['calls_per_s'] / base:7.2f}")
    ca_core = 1e6 / med["CA x1"]["server_cpu_us_per_call"]
    goal = ca_core >= 5000
    print(f"goal: >= 5,000 CA/s on one core: {ca_core:,.0f} -> {'met' if goal else 'NOT met'} "
          f"(median of {a.repeat} runs, {a.inflight} in flight)")
    result = {"medians": med, "runs": runs, "goal_ca_per_core": 5000, "ca_per_core": ca_core,
              "goal_met": goal, "args": vars(a)}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0 if goal else 2


if __name__ == "__main__":
    sys.exit(main())
