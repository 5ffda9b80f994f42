"""A bank outage under load: stand-in throughput, and how fast the SAF queue drains.

    python bench/bench_outage.py [--terminals 32] [--duration 5] [--repeat 3] [--kill term|kill]

Each repeat starts a fresh network (the bench's one-bank network from
``run.builtin_network_text``, its bank simulated and given a generous
``stand_in`` profile; plain purchases from POS terminals without PIN or MAC,
on the bank's rich cards) as three processes: ``cardswitch up --only hsm``,
``--only banks`` (its own process, so that it can be stopped) and
``--only switch``. Then:

1. baseline (bank up): TPS, p50, p99;
2. the banks process is stopped (``--kill term``: SIGTERM, ``kill``: SIGKILL)
   and the same load measured again: TPS, p99, and the share of approvals
   (stand-in) and of 91s;
3. the banks process is started again; from its ``ready`` line the admin
   server's ``GET /api/queue`` is polled every 100 ms until the total SAF depth
   is 0: that time, and the advices delivered (the depth just before the
   restart, as nothing is delivered while the bank is down).

Before that, in the same run, the bare relay baseline (bench/relay.py in front
of bench/instant_bank.py) is measured as bench/run.py does, and every TPS is
also printed as a ratio to it. The table shows medians over the repeats;
everything goes to bench/results/outage.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from children import Child, ChildFailed, descendants, python_argv
from run import (BENCH_DIR, Bench, builtin_network_text, fmt, free_port, progress, repeated,
                 summary, wait_until_approving)
import run as _run

DEFAULT_OUT = BENCH_DIR / "results" / "outage.json"
POLL_S = 0.1
RC_APPROVED = "00"           # cardswitch.iso8583.constants.RC values, as loadgen reports them
RC_UNAVAILABLE = "91"


@dataclasses.dataclass(slots=True)
class OutageNetwork:
    path: Path
    listen_port: int
    admin_port: int
    bank_id: str


def write_outage_network(path: Path, data_dir: Path, amount: int) -> OutageNetwork:
    """The bench's one-bank network, its bank simulated and standing in for anything the run sends."""
    from cardswitch.config import StandIn
    from cardswitch.netfile import dump_network, load_network

    text = builtin_network_text(data_dir=str(data_dir), listen=free_port(), admin=free_port(),
                                hsm=free_port(), bank=free_port(), simulate=True)
    path.write_text(text, "utf-8")
    net = load_network(str(path))
    generous = StandIn(max_amount=max(amount * 10, 100_000), daily_count=100_000_000,
                       daily_amount=10**15, allowed="00")
    net = dataclasses.replace(net, banks=tuple(dataclasses.replace(b, stand_in=generous) for b in net.banks))
    path.write_text(dump_network(net), "utf-8")
    net = load_network(str(path))          # the file as the switch will read it
    assert all(b.stand_in.max_amount > amount for b in net.banks)
    return OutageNetwork(path, net.switch.listen.port, net.switch.admin.port, net.banks[0].id)


def queue_depth(admin_port: int, timeout: float = 1.0) -> int | None:
    """Total SAF depth from the admin server's /api/queue, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/api/queue", timeout=timeout) as r:
            body = orjson.loads(r.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None
    if not body.get("available", True):
        return None
    return int(body["total"])


def wait_empty(admin_port: int, deadline: float) -> tuple[float | None, int]:
    """Poll every POLL_S until the queue is empty: (monotonic time it was seen empty, polls)."""
    polls = 0
    while time.monotonic() < deadline:
        polls += 1
        if queue_depth(admin_port) == 0:
            return time.monotonic(), polls
        time.sleep(POLL_S)
    return None, polls


def stop_banks(bench: Bench, banks: Child, how: str) -> None:
    """Take the simulated issuers away: SIGTERM (they close their sockets) or SIGKILL."""
    if how == "kill":
        for pid in [*descendants(banks.pid), banks.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        banks.proc.wait(timeout=10)
    bench.stop(banks)


def rc_share(report: dict, rc: str) -> float | None:
    done = report["completed"]
    return report["responses"].get(rc, 0) / done if done else None


def one_repeat(bench: Bench, i: int) -> dict:
    """One network start to finish: baseline, outage, recovery."""
    a = bench.args
    data_dir = bench.workdir / f"data{i}"
    net = write_outage_network(bench.workdir / f"network{i}.toml", data_dir, a.amount)
    up = _run.cardswitch_argv() + ["up", "-c", str(net.path), "--only"]
    out: dict = {"bank": net.bank_id}
    hsm = switch = None
    try:
        progress(f"repeat {i + 1}: starting hsm, banks, switch")
        hsm, _ = bench.start(f"hsm{i}", up + ["hsm"])
        banks, _ = bench.start(f"banks{i}", up + ["banks"])
        switch, _ = bench.start(f"switch{i}", up + ["switch"])
        middle = {"switch": switch.pid, "bank": banks.pid, "hsm": hsm.pid}
        wait_until_approving(bench, net.listen_port, net.path)

        progress(f"repeat {i + 1}: baseline")
        out["baseline"] = bench.measure(net.listen_port, middle, network=net.path)

        progress(f"repeat {i + 1}: stopping the banks ({a.kill})")
        stop_banks(bench, banks, a.kill)
        middle = {"switch": switch.pid, "hsm": hsm.pid}
        out["outage"] = r = bench.measure(net.listen_port, middle, network=net.path)
        r["approved_share"] = rc_share(r, RC_APPROVED)
        r["unavailable_share"] = rc_share(r, RC_UNAVAILABLE)
        progress(f"repeat {i + 1}: outage {r['tps']:.0f} TPS, responses {r['responses']}")

        queued = queue_depth(net.admin_port)
        progress(f"repeat {i + 1}: {queued} advices queued; restarting the banks")
        t0 = time.monotonic()
        banks, _ = bench.start(f"banks{i}b", up + ["banks"])
        ready = time.monotonic()
        empty, polls = wait_empty(net.admin_port, ready + a.drain_timeout)
        out["recovery"] = {
            "queued_at_return": queued,
            "advices_delivered": queued if empty is not None else None,
            "bank_start_s": ready - t0,
            "drain_s": None if empty is None else empty - ready,
            "polls": polls,
            "left_in_queue": None if empty is not None else queue_depth(net.admin_port),
        }
        progress(f"repeat {i + 1}: recovery {out['recovery']}")
    finally:
        for child in (switch, hsm):
            if child is not None:
                bench.stop(child)
        bench.stop_all_named(f"banks{i}")
    return out


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def medians(repeats: list[dict], relay_tps: float | None) -> dict:
    base = [r["baseline"] for r in repeats]
    outage = [r["outage"] for r in repeats]
    rec = [r["recovery"] for r in repeats]

    def ratio(v):
        return v / relay_tps if v is not None and relay_tps else None

    m = {
        "baseline": {k: _median([r[k] for r in base]) for k in ("tps", "p50_ms", "p99_ms")},
        "outage": {k: _median([r[k] for r in outage])
                   for k in ("tps", "p50_ms", "p99_ms", "approved_share", "unavailable_share")},
        "recovery": {k: _median([r[k] for r in rec]) for k in ("drain_s", "advices_delivered", "bank_start_s")},
    }
    m["baseline"]["tps_to_relay"] = ratio(m["baseline"]["tps"])
    m["outage"]["tps_to_relay"] = ratio(m["outage"]["tps"])
    m["outage"]["responses"] = _run._sum_dicts(r["responses"] for r in outage)
    m["baseline"]["responses"] = _run._sum_dicts(r["responses"] for r in base)
    m["recovery"]["advices_per_s"] = _median([
        r["advices_delivered"] / r["drain_s"] for r in rec
        if r["advices_delivered"] is not None and r["drain_s"]])
    return m


def table(result: dict) -> str:
    a = result["config"]
    m = result["median"]
    relay = result["relay"]["median"]
    b, o, r = m["baseline"], m["outage"], m["recovery"]

    def pct(v):
        return fmt(None if v is None else v * 100, "6.1f")

    lines = [
        f"cardswitch outage bench: {a['terminals']} terminals, {a['duration']:g} s measured after "
        f"{a['warmup']:g} s warm-up, medians of {a['repeat']} repeats; banks stopped with SIG"
        f"{'KILL' if a['kill'] == 'kill' else 'TERM'}",
        "",
        f"{'':24}{'TPS':>9}{'x relay':>9}{'p50 ms':>9}{'p99 ms':>9}{'00 %':>8}{'91 %':>8}",
        f"{'relay (baseline)':24}{fmt(relay['tps'], '9.0f')}{fmt(1.0, '9.3f')}{fmt(relay['p50_ms'], '9.2f')}"
        f"{fmt(relay['p99_ms'], '9.2f')}{'':8}{'':8}",
        f"{'switch, bank up':24}{fmt(b['tps'], '9.0f')}{fmt(b['tps_to_relay'], '9.3f')}"
        f"{fmt(b['p50_ms'], '9.2f')}{fmt(b['p99_ms'], '9.2f')}"
        f"{pct(_share(b['responses'], '00')):>8}{pct(_share(b['responses'], '91')):>8}",
        f"{'switch, bank down':24}{fmt(o['tps'], '9.0f')}{fmt(o['tps_to_relay'], '9.3f')}"
        f"{fmt(o['p50_ms'], '9.2f')}{fmt(o['p99_ms'], '9.2f')}"
        f"{pct(o['approved_share']):>8}{pct(o['unavailable_share']):>8}",
        "",
        f"bank back: ready -> SAF queue empty {fmt(r['drain_s'], '.2f')} s, "
        f"{fmt(r['advices_delivered'], '.0f')} advices delivered "
        f"({fmt(r['advices_per_s'], '.0f')}/s); banks process start to ready {fmt(r['bank_start_s'], '.2f')} s",
    ]
    per = [f"  repeat {i + 1}: bank up {x['baseline']['tps']:.0f} TPS, down {x['outage']['tps']:.0f} TPS "
           f"(p99 {x['outage']['p99_ms']:.2f} ms), drain {fmt(x['recovery']['drain_s'], '.2f')} s for "
           f"{x['recovery']['queued_at_return']} advices"
           for i, x in enumerate(result["repeats"])]
    return "\n".join(lines + ["", "per repeat:"] + per)


def _share(responses: dict, rc: str) -> float | None:
    total = sum(responses.values())
    return responses.get(rc, 0) / total if total else None


class OutageBench(Bench):
    def stop_all_named(self, prefix: str) -> None:
        for child in [c for c in self.children if c.name.startswith(prefix)]:
            self.stop(child)


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="cardswitch-outage-"))
    bench = OutageBench(args, workdir)
    result: dict = {
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "config": {k: getattr(args, k) for k in (
            "terminals", "procs", "duration", "warmup", "repeat", "amount", "kill", "drain_timeout")},
        "command": " ".join(["python", "bench/bench_outage.py", *sys.argv[1:]]),
    }
    try:
        progress("relay baseline: starting the instant bank and the relay")
        bank, line = bench.start("instant_bank", python_argv("instant_bank.py") + [
            "--port", "0", "--max-seconds", str(bench.max_seconds)])
        bank_port = int(line.split()[1])
        relay, line = bench.start("relay", python_argv("relay.py") + [
            "--listen", "0", "--upstream", f"127.0.0.1:{bank_port}", "--max-seconds", str(bench.max_seconds)])
        runs = repeated(bench, "relay", int(line.split()[1]), {"relay": relay.pid, "bank": bank.pid})
        result["relay"] = {"runs": runs, "median": summary(runs, "relay")}
        bench.stop(relay)
        bench.stop(bank)

        result["repeats"] = [one_repeat(bench, i) for i in range(args.repeat)]
        result["median"] = medians(result["repeats"], result["relay"]["median"]["tps"])
    finally:
        bench.stop_all()
        if args.keep:
            print(f"bench: logs and network files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--terminals", type=int, default=32, help="simulated terminals (default 32)")
    ap.add_argument("--procs", type=int, default=1, help="load generator processes (default 1)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per phase (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per phase (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="whole runs; medians reported (default 3)")
    ap.add_argument("--amount", type=int, default=100, help="purchase amount, minor units")
    ap.add_argument("--kill", choices=("term", "kill"), default="term",
                    help="how the banks process is stopped: SIGTERM (default) or SIGKILL")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="seconds to wait for the SAF queue to empty after the bank is back")
    ap.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for 'ready'")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, network files)")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.terminals < 1 or args.procs < 1 or args.duration <= 0 or args.warmup < 0:
        ap.error("--repeat, --terminals, --procs must be >= 1, --duration > 0, --warmup >= 0")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except (ChildFailed, RuntimeError, OSError, ValueError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
