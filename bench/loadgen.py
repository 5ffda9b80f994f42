"""Load generator: N simulated POS terminals sending purchases over TCP.

    python bench/loadgen.py --target 127.0.0.1:8583 --terminals 32 --duration 5
    python bench/loadgen.py --target ... --network net.toml --rate 2000 --procs 2

Each simulated terminal keeps one connection and one request in flight. With
``--rate 0`` (default) the loop is closed: a terminal sends its next request as
soon as the previous answer arrives. With ``--rate R`` the terminals together
aim at R requests/s: each sends on its own schedule (every N/R seconds), or at
once when its previous answer came back late (rate-limited, still one in
flight per terminal).

Requests are 0200 purchases (wire.md 3) encoded once per terminal with
pyiso8583 (``default_ascii``, as a real terminal would); per request only
fields 7, 11, 12 and 13 are patched in place. With ``--security`` (needs
``--network``) the terminals are POS terminals with a TPK and a TAK: each
request carries a PIN block (field 52, the card's PIN under the TPK, made
once per terminal: format 0 has no random fill) and a MAC (field 64, ISO
9797-1 algorithm 3 under the TAK), recomputed per request over the patched
bytes with ``cardswitch.crypto.mac.mac_alg3`` (about 13 us). Field 11 is unique per terminal
ID within a run (several simulated terminals sharing one terminal ID take
interleaved STANs), wraps at 999999, and field 7 moves with the clock, so no
two requests share 41 + 11 + 7 and the switch never sees a duplicate.
``--stan-start`` continues a previous run's numbering (``stan_next`` in its
report) so that back-to-back runs never collide either.

Warm-up (``--warmup``) runs first and is not counted. The measured window is
``--duration`` seconds: TPS is the responses received in it divided by its
length; latencies are of those responses. Output: a readable summary on
stderr, and on stdout (for bench/run.py) ``measure-start`` / ``measure-end``
lines at the window's edges and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import sys
import time
from array import array
from dataclasses import dataclass

import iso8583
import iso8583.specs
import orjson
import uvloop

from wirebytes import ASCII_LAYOUT, RESPONSE_CODE, STAN, Frames2, Layout

from cardswitch.crypto.mac import mac_alg3
from cardswitch.iso8583.constants import F, MTI, RC

STAN_MAX = 999999
_MAC_PLACEHOLDER = b"0" * 16
CONNECT_TIMEOUT_S = 10.0


# -- who the terminals are --------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Identity:
    """What one simulated terminal puts in its requests."""

    terminal_id: str
    merchant_id: str
    currency: str
    pan: str
    expiry: str          # YYMM, "" = not sent
    pin_block: str = ""  # field 52 (hex), "" = not sent
    tak: bytes = b""     # MAC key: field 64 computed per request; b"" = no MAC


def luhn_complete(digits: str) -> str:
    """``digits`` plus its Luhn check digit."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return digits + str((10 - total % 10) % 10)


def synthetic_identities(n: int) -> list[Identity]:
    """Made-up terminals and cards, one terminal ID each (good for the relay)."""
    return [
        Identity(f"LG{j:06d}", "LOADGEN00000001", "156", luhn_complete(f"622126{j:09d}"), "")
        for j in range(n)
    ]


def _network_lists(path: str) -> tuple[list[tuple[str, str, str]], list[tuple[int, str, str]]]:
    """(terminals (tid, mid, currency), cards (balance, pan, expiry)) usable for purchases:
    enabled POS terminals without a MAC key, active cards that answer at once."""
    try:
        from cardswitch.netfile import load_network
    except ImportError:  # before netfile exists: read the same TOML shape directly
        return _toml_lists(path)
    terms, cards, _ = _secure_lists(load_network(path), secure=False)
    return terms, cards


def _secure_lists(net, secure: bool):
    """``_network_lists`` of a loaded network; with ``secure``, POS terminals with a
    TPK and a TAK instead, and cards with a PIN. Third item: tid -> (tpk, tak), pan -> pin."""
    this_month = time.strftime("%y%m", time.gmtime())
    terms: list[tuple[str, str, str]] = []
    cards: list[tuple[int, str, str]] = []
    secrets: dict[str, object] = {}
    for m in net.merchants:
        if not m.enabled:
            continue
        for t in m.terminals:
            if t.kind != "pos" or not t.enabled:
                continue
            if not secure and t.tak is None:
                terms.append((t.id, m.id, m.currency))
            elif secure and t.tak is not None and t.tpk is not None:
                if not (t.tak.is_clear and t.tpk.is_clear):
                    continue      # keys under an LMK: the load generator cannot use them
                terms.append((t.id, m.id, m.currency))
                secrets[t.id] = (t.tpk.clear_bytes(), t.tak.clear_bytes())
    for b in net.banks:
        for c in b.cards:
            if c.status == "active" and c.delay_ms == 0 and c.expiry >= this_month:
                if secure:
                    if not c.pin:
                        continue
                    secrets[c.pan] = c.pin
                cards.append((c.balance, c.pan, c.expiry))
    return terms, cards, secrets


def _toml_lists(path: str) -> tuple[list[tuple[str, str, str]], list[tuple[int, str, str]]]:
    """``_network_lists`` from the TOML alone, without the network file's checks."""
    import tomllib

    this_month = time.strftime("%y%m", time.gmtime())
    terms: list[tuple[str, str, str]] = []
    cards: list[tuple[int, str, str]] = []
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    for m in doc.get("merchants", []):
        if not m.get("enabled", True):
            continue
        for t in m.get("terminals", []):
            if t.get("kind") == "pos" and t.get("enabled", True) and not t.get("tak"):
                terms.append((t["id"], m["id"], m.get("currency", "156")))
    for b in doc.get("banks", []):
        for c in b.get("cards", []):
            if (c.get("status", "active") == "active" and not c.get("delay_ms", 0)
                    and str(c["expiry"]) >= this_month):
                cards.append((int(c["balance"]), str(c["pan"]), str(c["expiry"])))
    return terms, cards


def network_identities(path: str, n: int, amount: int, *, security: bool = False) -> list[Identity]:
    """N identities from a network file: its POS terminals (reused round robin when
    there are fewer than N) and its richest cards (enough balance for many purchases).

    ``security``: POS terminals with a clear TPK and TAK, cards with a PIN; each
    identity carries the PIN block under its terminal's TPK and the TAK."""
    if security:
        from cardswitch.netfile import load_network

        terms, cards, secrets = _secure_lists(load_network(path), secure=True)
        if not terms:
            raise SystemExit(f"loadgen: {path}: no enabled POS terminal with a clear TPK and TAK")
    else:
        terms, cards = _network_lists(path)
        secrets = {}
        if not terms:
            raise SystemExit(f"loadgen: {path}: no enabled POS terminal without a MAC key")
    if not cards:
        raise SystemExit(f"loadgen: {path}: no active card that answers at once"
                         + (" and has a PIN" if security else ""))
    cards.sort(reverse=True)
    rich = [c for c in cards if c[0] >= amount * 100_000] or cards[:1]
    out = []
    for j in range(n):
        tid, mid, cur = terms[j % len(terms)]
        _, pan, exp = rich[j % len(rich)]
        if security:
            from cardswitch.crypto.pinblock import encrypt_pin_block

            tpk, tak = secrets[tid]
            out.append(Identity(tid, mid, cur, pan, exp, encrypt_pin_block(secrets[pan], pan, tpk), tak))
        else:
            out.append(Identity(tid, mid, cur, pan, exp))
    return out


def stan_slot(j: int, distinct_ids: int, n_terminals: int) -> tuple[int, int]:
    """(first position, step) of simulated terminal ``j``'s STANs.

    Terminal ``j`` uses terminal ID number ``j % distinct_ids``; the terminals
    sharing an ID interleave: the g-th of G takes positions g, g+G, g+2G, ...
    """
    return j // distinct_ids, -(-n_terminals // distinct_ids)


def stan_at(base: int, pos: int) -> int:
    """The STAN at a position of a run starting at ``base``: 1..999999, wrapping."""
    return (base + pos) % STAN_MAX + 1


# -- the request bytes -------------------------------------------------------------


class Clock:
    """Fields 7 (UTC MMDDhhmmss), 12 (hhmmss) and 13 (MMDD), recomputed once a second."""

    __slots__ = ("sec", "f7", "f12", "f13")

    def __init__(self) -> None:
        self.sec = -1
        self.tick()

    def tick(self) -> None:
        now = time.time()
        sec = int(now)
        if sec != self.sec:
            t = time.gmtime(sec)
            self.f7 = time.strftime("%m%d%H%M%S", t).encode()
            self.f12 = self.f7[4:]
            self.f13 = self.f7[:4]
            self.sec = sec


class Template:
    """One terminal's 0200, framed, split around the bytes patched per request.

    With a TAK the message ends with field 64, computed per request over
    everything after the length prefix and before the MAC (wire.md 7)."""

    __slots__ = ("pieces", "order", "tak")

    PATCHED = (int(F.TRANSMISSION_DT), int(F.STAN), int(F.LOCAL_TIME), int(F.LOCAL_DATE))

    def __init__(self, ident: Identity, amount: int, batch: str, layout: Layout = ASCII_LAYOUT) -> None:
        msg = {
            F.MTI: MTI.FIN_REQUEST,
            F.PAN: ident.pan,
            F.PROC: "000000",
            F.AMOUNT: f"{amount:012d}",
            F.TRANSMISSION_DT: "0101000000",
            F.STAN: "000000",
            F.LOCAL_TIME: "000000",
            F.LOCAL_DATE: "0101",
            F.ENTRY_MODE: "012",
            F.CONDITION_CODE: "00",
            F.TERMINAL_ID: ident.terminal_id,
            F.MERCHANT_ID: ident.merchant_id,
            F.CURRENCY: ident.currency,
            F.BATCH_NUMBER: batch,
        }
        if ident.expiry:
            msg[F.EXPIRY] = ident.expiry
        if ident.pin_block:
            msg[F.PIN_BLOCK] = ident.pin_block
            msg[F.ENTRY_MODE] = "011"        # manual entry, PIN entry capable
        self.tak = ident.tak
        if ident.tak:
            msg[F.MAC] = _MAC_PLACEHOLDER.decode()
        raw, _ = iso8583.encode(msg, iso8583.specs.default_ascii)
        frame = len(raw).to_bytes(2, "big") + bytes(raw)
        spans = sorted((layout.find(raw, n), n) for n in self.PATCHED)
        self.pieces: list[bytes] = []
        self.order: list[int] = []
        pos = 0
        for (s, e), n in spans:
            self.pieces.append(frame[pos:s + 2])
            self.order.append(self.PATCHED.index(n))
            pos = e + 2
        self.pieces.append(frame[pos:])
        if self.tak:
            assert self.pieces[-1].endswith(_MAC_PLACEHOLDER), "field 64 must be the last field"
            self.pieces[-1] = self.pieces[-1][:-len(_MAC_PLACEHOLDER)]

    def frame(self, values: tuple[bytes, bytes, bytes, bytes]) -> bytes:
        """The framed request with (7, 11, 12, 13) = ``values`` (and its MAC)."""
        p = self.pieces
        o = self.order
        out = b"".join((p[0], values[o[0]], p[1], values[o[1]], p[2],
                        values[o[2]], p[3], values[o[3]], p[4]))
        if self.tak:
            return out + mac_alg3(self.tak, out[2:]).hex().upper().encode()
        return out


# -- one process's share of the terminals --------------------------------------------


@dataclass(slots=True)
class Schedule:
    """Monotonic nanoseconds (CLOCK_MONOTONIC is the same in every process)."""

    start: int
    measure: int
    end: int


class Counters:
    __slots__ = ("lat", "rc", "sent", "warm", "after", "timeouts", "disconnects", "unmatched",
                 "stan_next", "schedule", "clock", "layout", "rate_ns", "timeout_ns", "loop")

    def __init__(self) -> None:
        self.lat: list[int] = []
        self.rc: dict[bytes, int] = {}
        self.sent = self.warm = self.after = 0
        self.timeouts = self.disconnects = self.unmatched = 0
        self.stan_next = 0


class Term(asyncio.Protocol):
    """One simulated terminal: one connection, one request in flight."""

    __slots__ = ("c", "template", "stan_pos", "stan_step", "stan_base", "stan", "sent_at",
                 "due", "inflight", "transport", "frames", "closing", "stopped")

    def __init__(self, c: Counters, template: Template, first_pos: int, step: int, base: int) -> None:
        self.c = c
        self.template = template
        self.stan_pos = first_pos
        self.stan_step = step
        self.stan_base = base
        self.stan = b""
        self.sent_at = 0
        self.due = 0
        self.inflight = False
        self.transport = None
        self.frames = Frames2()
        self.closing = False
        self.stopped = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.closing:
            self.c.disconnects += 1
        self.stopped = True
        self.inflight = False

    def data_received(self, data: bytes) -> None:
        try:
            payloads = self.frames.feed(data)
        except ValueError:
            self.c.unmatched += 1
            self.transport.close()
            return
        for p in payloads:
            self.response(p)

    def response(self, p: bytes) -> None:
        now = time.monotonic_ns()
        c = self.c
        layout = c.layout
        try:
            s11 = layout.find(p, STAN)
            s39 = layout.find(p, RESPONSE_CODE)
        except ValueError:
            s11 = None
        if not self.inflight or s11 is None or p[s11[0]:s11[1]] != self.stan:
            c.unmatched += 1  # late (after a timeout), foreign or broken
            return
        self.inflight = False
        sched = c.schedule
        if now < sched.measure:
            c.warm += 1
        elif now < sched.end:
            rc = p[s39[0]:s39[1]] if s39 is not None else b"--"
            c.rc[rc] = c.rc.get(rc, 0) + 1
            c.lat.append(now - self.sent_at)
        else:
            c.after += 1
        self.next(now)

    def next(self, now: int) -> None:
        c = self.c
        if now >= c.schedule.end or self.stopped:
            return
        if c.rate_ns:
            due = self.due
            self.due = due + c.rate_ns
            if due > now:
                c.loop.call_later((due - now) / 1e9, self.send)
                return
        self.send()

    def send(self) -> None:
        c = self.c
        now = time.monotonic_ns()
        if self.stopped or now >= c.schedule.end or self.transport.is_closing():
            return
        c.clock.tick()
        n = (self.stan_base + self.stan_pos) % STAN_MAX + 1   # stan_at, inlined
        self.stan_pos += self.stan_step
        self.stan = stan = b"%06d" % n
        clock = c.clock
        frame = self.template.frame((clock.f7, stan, clock.f12, clock.f13))
        self.inflight = True
        self.sent_at = now
        c.sent += 1
        self.transport.write(frame)


@dataclass(slots=True)
class Job:
    target: tuple[str, int]
    identities: list[tuple[int, Identity]]   # (global index, identity)
    distinct_ids: int                       # distinct terminal IDs
    stan_start: int
    amount: int
    batch: str
    rate: float                              # total over all processes; 0 = closed loop
    total_terminals: int
    timeout_s: float


async def run_job(job: Job, get_schedule, markers: bool = False) -> dict:
    """Connect, wait for the schedule, drive the load, return this process's counts."""
    loop = asyncio.get_running_loop()
    c = Counters()
    c.clock = Clock()
    c.layout = ASCII_LAYOUT
    c.loop = loop
    c.rate_ns = int(job.total_terminals / job.rate * 1e9) if job.rate > 0 else 0
    c.timeout_ns = int(job.timeout_s * 1e9)
    host, port = job.target
    terms: list[Term] = []
    for j, ident in job.identities:
        first, step = stan_slot(j, job.distinct_ids, job.total_terminals)
        t = Term(c, Template(ident, job.amount, job.batch), first, step, job.stan_start)
        terms.append(t)
    failed = 0
    sem = asyncio.Semaphore(64)

    async def connect(t: Term) -> None:
        nonlocal failed
        async with sem:
            try:
                await asyncio.wait_for(loop.create_connection(lambda: t, host, port), CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError):
                failed += 1
                t.stopped = True

    await asyncio.gather(*(connect(t) for t in terms))
    if failed == len(terms):
        raise ConnectionError(f"cannot connect to {host}:{port}")
    sched = await get_schedule()
    c.schedule = sched
    usage: dict[str, float] = {}

    def snap(name: str) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        usage[name] = ru.ru_utime + ru.ru_stime
        if markers:
            print(f"measure-{name}", flush=True)

    def at(ns: int, fn, *args) -> None:
        loop.call_later(max(0.0, (ns - time.monotonic_ns()) / 1e9), fn, *args)

    at(sched.measure, snap, "start")
    at(sched.end, snap, "end")
    await asyncio.sleep(max(0.0, (sched.start - time.monotonic_ns()) / 1e9))

    live = [t for t in terms if not t.stopped]
    now = time.monotonic_ns()
    for i, t in enumerate(live):
        if c.rate_ns:  # spread the first sends over one interval
            t.due = now + c.rate_ns * i // max(1, len(live))
        t.next(now)

    def sweep() -> None:
        now = time.monotonic_ns()
        for t in live:
            if t.inflight and now - t.sent_at > c.timeout_ns:
                c.timeouts += 1
                t.inflight = False
                t.next(now)
        if now < sched.end:
            loop.call_later(0.25, sweep)

    loop.call_later(0.25, sweep)
    await asyncio.sleep(max(0.0, (sched.end - time.monotonic_ns()) / 1e9))
    drain_until = time.monotonic_ns() + int(min(job.timeout_s, 5.0) * 1e9)
    while any(t.inflight for t in live) and time.monotonic_ns() < drain_until:
        await asyncio.sleep(0.005)
    unanswered = sum(1 for t in live if t.inflight)
    for t in terms:
        t.closing = True
        if t.transport is not None:
            t.transport.close()
    await asyncio.sleep(0)
    stan_next = (job.stan_start + max((t.stan_pos for t in terms), default=0)) % STAN_MAX
    return {
        "lat": array("q", c.lat).tobytes(),
        "rc": {k.decode("ascii", "replace"): v for k, v in c.rc.items()},
        "sent": c.sent,
        "warm": c.warm,
        "after": c.after,
        "timeouts": c.timeouts,
        "disconnects": c.disconnects,
        "unmatched": c.unmatched,
        "connect_failed": failed,
        "unanswered": unanswered,
        "stan_next": stan_next,
        "cpu_s": usage.get("end", 0.0) - usage.get("start", 0.0),
    }


# -- several processes ------------------------------------------------------------------


def _child(conn, job: Job) -> None:
    from children import die_with_parent

    die_with_parent()
    async def get_schedule() -> Schedule:
        conn.send(("ready", None))
        return await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    try:
        result = uvloop.run(run_job(job, get_schedule))
        conn.send(("result", result))
    except KeyboardInterrupt:
        pass
    except BaseException as e:  # report, never a traceback from a worker
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass


def plan_schedule(warmup_s: float, duration_s: float) -> Schedule:
    start = time.monotonic_ns() + 50_000_000
    measure = start + int(warmup_s * 1e9)
    return Schedule(start, measure, measure + int(duration_s * 1e9))


def run_processes(jobs: list[Job], warmup_s: float, duration_s: float, timeout_s: float) -> list[dict]:
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    try:
        for job in jobs:
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_child, args=(theirs, job), daemon=True)
            p.start()
            pipes.append(ours)
            procs.append(p)
        for conn in pipes:
            if not conn.poll(CONNECT_TIMEOUT_S + 20):
                raise RuntimeError("a load generator process did not get ready")
            kind, payload = conn.recv()
            if kind == "error":
                raise RuntimeError(payload)
        sched = plan_schedule(warmup_s, duration_s)
        for conn in pipes:
            conn.send(sched)
        for ns, word in ((sched.measure, "start"), (sched.end, "end")):
            time.sleep(max(0.0, (ns - time.monotonic_ns()) / 1e9))
            print(f"measure-{word}", flush=True)
        results = []
        for conn in pipes:
            if not conn.poll(min(timeout_s, 5.0) + 20):
                raise RuntimeError("a load generator process did not report")
            kind, payload = conn.recv()
            if kind != "result":
                raise RuntimeError(payload)
            results.append(payload)
        return results
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)


# -- the report ---------------------------------------------------------------------------


def percentile(sorted_values, q: float) -> int:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def summarise(results: list[dict], args, n_terminals: int) -> dict:
    lat = array("q")
    rc: dict[str, int] = {}
    for r in results:
        lat.frombytes(r["lat"])
        for k, v in r["rc"].items():
            rc[k] = rc.get(k, 0) + v
    lat = sorted(lat)
    completed = len(lat)
    ms = 1e6
    errors = {k: sum(r[k] for r in results)
              for k in ("timeouts", "disconnects", "unmatched", "connect_failed", "unanswered")}
    return {
        "target": args.target_text,
        "terminals": n_terminals,
        "procs": len(results),
        "security": bool(getattr(args, "security", False)),
        "rate": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "completed": completed,
        "tps": completed / args.duration if args.duration else 0.0,
        "p50_ms": percentile(lat, 50) / ms,
        "p90_ms": percentile(lat, 90) / ms,
        "p99_ms": percentile(lat, 99) / ms,
        "max_ms": (lat[-1] if lat else 0) / ms,
        "mean_ms": (sum(lat) / completed / ms) if completed else 0.0,
        "responses": dict(sorted(rc.items())),
        "approved": rc.get(RC.APPROVED, 0),
        "errors": errors,
        "error_count": sum(errors.values()),
        "sent": sum(r["sent"] for r in results),
        "stan_next": max(r["stan_next"] for r in results),
        "loadgen_cpu_s": sum(r["cpu_s"] for r in results),
    }


def human(report: dict) -> str:
    rc = ", ".join(f"{k}: {v}" for k, v in report["responses"].items()) or "none"
    errs = ", ".join(f"{k} {v}" for k, v in report["errors"].items() if v) or "none"
    mode = f"rate {report['rate']:g}/s" if report["rate"] else "closed loop"
    return (
        f"{report['target']}: {report['terminals']} terminals, {mode}, "
        f"{report['duration_s']:g} s measured after {report['warmup_s']:g} s warm-up\n"
        f"  TPS {report['tps']:.0f}   latency ms p50 {report['p50_ms']:.2f}  p90 {report['p90_ms']:.2f}"
        f"  p99 {report['p99_ms']:.2f}  max {report['max_ms']:.2f}\n"
        f"  responses (field 39): {rc}\n  errors: {errs}"
    )


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=parse_target, required=True, help="HOST:PORT of the switch or relay")
    ap.add_argument("--terminals", type=int, default=32, help="simulated terminals (connections)")
    ap.add_argument("--procs", type=int, default=1, help="processes to spread the terminals over")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    ap.add_argument("--rate", type=float, default=0.0, help="target requests/s over all terminals (0 = closed loop)")
    ap.add_argument("--network", help="network file: take terminal IDs, merchants and cards from it")
    ap.add_argument("--amount", type=int, default=100, help="purchase amount in minor units")
    ap.add_argument("--batch", default="000001", help="field 60 batch number")
    ap.add_argument("--stan-start", type=int, default=0, help="continue STANs from a previous run's stan_next")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds before a request counts as timed out")
    ap.add_argument("--security", action="store_true",
                    help="terminals with a TPK and TAK from --network: every request carries a PIN "
                         "block (52) and a MAC (64)")
    args = ap.parse_args(argv)
    if args.terminals < 1 or args.procs < 1 or args.duration <= 0 or args.warmup < 0 or args.rate < 0:
        ap.error("--terminals and --procs must be >= 1, --duration > 0, --warmup and --rate >= 0")
    args.target_text = f"{args.target[0]}:{args.target[1]}"
    procs = min(args.procs, args.terminals)

    if args.security and not args.network:
        ap.error("--security needs --network (the terminals' keys and the cards' PINs)")
    if args.network:
        try:
            idents = network_identities(args.network, args.terminals, args.amount, security=args.security)
        except (OSError, ValueError) as e:  # NetworkFileError is a ValueError or names itself
            print(f"loadgen: {e}", file=sys.stderr)
            return 2
    else:
        idents = synthetic_identities(args.terminals)
    distinct = len({i.terminal_id for i in idents})
    jobs = [
        Job(args.target, [(j, idents[j]) for j in range(w, args.terminals, procs)], distinct,
            args.stan_start % STAN_MAX, args.amount, args.batch, args.rate, args.terminals, args.timeout)
        for w in range(procs)
    ]
    try:
        if procs == 1:
            async def get_schedule() -> Schedule:
                return plan_schedule(args.warmup, args.duration)

            results = [uvloop.run(run_job(jobs[0], get_schedule, markers=True))]
        else:
            results = run_processes(jobs, args.warmup, args.duration, args.timeout)
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, RuntimeError, OSError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 1
    report = summarise(results, args, args.terminals)
    print(human(report), file=sys.stderr, flush=True)
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
