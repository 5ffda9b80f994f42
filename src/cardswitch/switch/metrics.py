"""What operations staff and Prometheus see of a running switch.

``SwitchMetrics`` owns its own ``CollectorRegistry`` (never the process-wide
one, so two switches in one test process do not collide) and has two kinds
of figures:

- Events, counted as they happen: ``count(t, rc)`` is the pipeline's stats
  hook (called once at the end of every terminal transaction),
  ``observe_issuer(bank_id, seconds)`` times one issuer round trip, and
  ``journal_commit(writes, seconds)`` is the journal writer's ``on_commit``
  hook (it runs on the writer thread: prometheus-client's metric objects are
  thread-safe, and nothing else is touched there).
- State, read when scraped: in-flight requests, terminal connections, bank
  link states, SAF depth, HSM and journal health come from the switch
  object given to ``attach`` (duck-typed: ``.acceptor``, ``.links``,
  ``.journal``, ``.hsm``), so nothing has to push them.

For the dashboard it also keeps, in memory and on the event loop only, the
last few hundred transactions (masked PAN, never PIN, track or CVV) and a
rolling per-second window (``Rolling``): rates over 10 s and 60 s, the mix of
response codes and latency percentiles over the last minute.

Label cardinality is bounded by construction: MTI (the request MTIs the
pipeline serves), transaction type (positions 1-2 of field 3: the full
processing code adds account types for no operational insight), issuer
(bank ids from the network file, ``none`` when unrouted) and response code
(two characters).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cardswitch.iso8583.constants import RC, RC_TEXT
from cardswitch.pan import mask_pan
from cardswitch.switch import banklink

__all__ = [
    "JOURNAL_BUCKETS", "LATENCY_BUCKETS", "LINK_STATES", "Rolling", "SwitchMetrics", "rc_name",
]

log = logging.getLogger("cardswitch.metrics")

# End-to-end and issuer latency: a switch answers in about a millisecond, an
# issuer in tens of milliseconds, a timeout in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A group commit takes from a tenth of a millisecond to (on a sick disk) a second.
JOURNAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0)
LINK_STATES = (banklink.STARTING, banklink.CONNECTING, banklink.SIGNING_ON, banklink.ONLINE,
               banklink.OFFLINE, banklink.STOPPED)

RECENT_SIZE = 200        # transactions kept for the dashboard
WINDOW_S = 60            # seconds the rolling figures cover
NONE = "none"            # label value of something absent (an unrouted request has no issuer)
_MAX_CHILDREN = 4096     # label sets cached for ``count``; beyond, looked up each time

_PREFIX = "cardswitch"


def rc_name(rc: str) -> str:
    """A response code's name for people: "approved", "not sufficient funds", ..."""
    return RC_TEXT.get(rc, "other")


# -- label values -------------------------------------------------------------------


def _mti_label(mti: str) -> str:
    return mti if len(mti) == 4 and mti.isdigit() else "other"


def _txn_type_label(proc: str) -> str:
    tt = proc[:2]
    if len(tt) == 2 and tt.isdigit():
        return tt
    return NONE if not proc else "other"


def _rc_label(rc: str) -> str:
    return rc if len(rc) == 2 and rc.isascii() and rc.isalnum() else "other"


def _issuer_label(bank_id: str) -> str:
    if not bank_id:
        return NONE
    return bank_id if len(bank_id) <= 32 and bank_id.isprintable() else "other"


# -- the rolling window (pure, event loop only) ---------------------------------------


def _latency_bounds() -> tuple[float, ...]:
    """Upper bounds (µs) of the dashboard's latency cells: 8 % apart, 10 µs .. 5 min."""
    bounds, b = [], 10.0
    while b < 300e6:
        bounds.append(b)
        b *= 1.08
    return tuple(bounds)


_LAT_BOUNDS = _latency_bounds()


class _Second:
    __slots__ = ("sec", "total", "approved", "rc", "lat")

    def __init__(self, sec: int) -> None:
        self.sec = sec
        self.total = 0
        self.approved = 0
        self.rc: dict[str, int] = {}
        self.lat: dict[int, int] = {}       # latency cell -> count


class Rolling:
    """Per-second counts over the last ``window`` seconds.

    ``add`` costs a clock read, a bisect and three dict updates; ``snapshot``
    sums at most ``window`` small buckets. Latency percentiles come from
    cells 8 % wide, so they are within 8 % of the exact value (reported as
    the cell's upper bound: never optimistic).
    """

    def __init__(self, window: int = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._start = int(clock())
        self._seconds: deque[_Second] = deque(maxlen=window + 1)
        self._cur = _Second(self._start)
        self._seconds.append(self._cur)

    def add(self, rc: str, latency_us: int) -> None:
        sec = int(self._clock())
        cur = self._cur
        if sec != cur.sec:
            cur = self._cur = _Second(sec)
            self._seconds.append(cur)
        cur.total += 1
        if rc == RC.APPROVED:
            cur.approved += 1
        d = cur.rc
        d[rc] = d.get(rc, 0) + 1
        i = bisect.bisect_left(_LAT_BOUNDS, latency_us)
        d2 = cur.lat
        d2[i] = d2.get(i, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        now = int(self._clock())
        first = now - self.window
        series = [0] * self.window               # the complete seconds now-window .. now-1
        total = approved = 0
        mix: dict[str, int] = {}
        lat: dict[int, int] = {}
        for s in self._seconds:
            if s.sec < first or s.sec > now:
                continue
            if s.sec < now:
                series[s.sec - first] = s.total
            total += s.total
            approved += s.approved
            for k, v in s.rc.items():
                mix[k] = mix.get(k, 0) + v
            for k, v in s.lat.items():
                lat[k] = lat.get(k, 0) + v
        elapsed = max(1, now - self._start)    # do not under-report just after start
        rate10 = sum(series[-10:]) / min(10, elapsed)
        rate60 = sum(series) / min(self.window, elapsed)
        return {
            "window_s": self.window,
            "rate_10s": round(rate10, 3),
            "rate_60s": round(rate60, 3),
            "series": series,
            "count": total,
            "approved": approved,
            "approval_ratio": round(approved / total, 4) if total else None,
            "mix": [{"rc": rc, "name": rc_name(rc), "count": n, "share": round(n / total, 4)}
                    for rc, n in sorted(mix.items(), key=lambda kv: (-kv[1], kv[0]))],
            "latency_ms": _percentiles(lat, total),
        }


def _percentiles(cells: dict[int, int], total: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {"p50": None, "p90": None, "p99": None, "max": None}
    if not total:
        return out
    wanted = [("p50", math.ceil(0.50 * total)), ("p90", math.ceil(0.90 * total)),
              ("p99", math.ceil(0.99 * total))]
    seen = 0
    j = 0
    ordered = sorted(cells.items())
    for cell, n in ordered:
        seen += n
        while j < len(wanted) and seen >= wanted[j][1]:
            out[wanted[j][0]] = _cell_ms(cell)
            j += 1
    out["max"] = _cell_ms(ordered[-1][0])
    return out


def _cell_ms(cell: int) -> float:
    bound = _LAT_BOUNDS[cell] if cell < len(_LAT_BOUNDS) else _LAT_BOUNDS[-1]
    return round(bound / 1000.0, 3)


# -- the metrics object --------------------------------------------------------------


class SwitchMetrics:
    """One switch's metrics; see the module docstring.

    ``saf_depth``: a callable returning ``{bank_id: depth}`` (the store-and-
    forward queue), settable later with ``set_saf_source``.
    """

    def __init__(self, *, recent: int = RECENT_SIZE, window_s: int = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic,
                 saf_depth: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.transactions = Counter(
            f"{_PREFIX}_transactions", "Terminal transactions answered, by request MTI, transaction "
            "type (field 3 positions 1-2), issuer bank and response code",
            ("mti", "txn_type", "issuer", "rc"), registry=reg)
        self.latency = Histogram(
            f"{_PREFIX}_transaction_latency_seconds",
            "End-to-end time in the switch, request read to response ready", buckets=LATENCY_BUCKETS,
            registry=reg)
        self.issuer_latency = Histogram(
            f"{_PREFIX}_issuer_latency_seconds", "Issuer round trip: request sent to response matched",
            ("issuer",), buckets=LATENCY_BUCKETS, registry=reg)
        self.journal_latency = Histogram(
            f"{_PREFIX}_journal_write_latency_seconds",
            "Journal group commits: oldest write queued to committed", buckets=JOURNAL_BUCKETS,
            registry=reg)
        self.recent_size = recent
        self._recent: deque[tuple] = deque(maxlen=recent)
        self._rolling = Rolling(window_s, clock)
        self._children: dict[tuple[str, str, str, str], Any] = {}
        self._issuer_children: dict[str, Any] = {}
        self._latency_observe = self.latency.observe
        self._clock = clock
        self._started = clock()
        self._total = 0
        self._approved = 0
        self._saf = saf_depth
        self._app: Any = None
        self._hooked_writer: Any = None
        reg.register(_StateCollector(self))

    # -- hooks the switch calls ----------------------------------------------------

    def count(self, t: Any, rc: str) -> None:
        """The pipeline's stats hook: one finished transaction ``t`` (steps.Txn) answered ``rc``."""
        rec = t.record
        if rec is not None:
            proc, issuer, latency_us = rec.proc, rec.issuer_id, rec.latency_us
        else:
            req = t.req
            proc, issuer, latency_us = req.get("3", ""), "", 0
        if not issuer and t.route is not None:
            issuer = t.route.bank_id
        key = (t.mti, proc[:2], issuer, rc)
        child = self._children.get(key)
        if child is None:
            child = self.transactions.labels(_mti_label(t.mti), _txn_type_label(proc),
                                             _issuer_label(issuer), _rc_label(rc))
            if len(self._children) < _MAX_CHILDREN:
                self._children[key] = child
        child.inc()
        self._latency_observe(latency_us / 1e6)
        self._rolling.add(rc, latency_us)
        self._total += 1
        if rc == RC.APPROVED:
            self._approved += 1
        if rec is not None:
            pan = rec.pan_masked
            if pan and "*" not in pan:          # never keep a clear PAN, even by a caller's mistake
                pan = mask_pan(pan)
            self._recent.append((rec.completed_at or rec.received_at, rec.id, rec.mti, rec.proc,
                                 rec.kind, pan, rec.amount, rec.currency, rc, latency_us,
                                 rec.terminal_id, rec.merchant_id, issuer, rec.stand_in, rec.rrn))
        else:
            self._recent.append(("", None, t.mti, proc, t.kind, "", 0, "", rc, latency_us,
                                 t.req.get("41", ""), t.req.get("42", ""), issuer, False, ""))

    def observe_issuer(self, bank_id: str, seconds: float) -> None:
        """One issuer round trip (request sent to answer matched) at ``bank_id``."""
        child = self._issuer_children.get(bank_id)
        if child is None:
            child = self.issuer_latency.labels(_issuer_label(bank_id))
            if len(self._issuer_children) < _MAX_CHILDREN:
                self._issuer_children[bank_id] = child
        child.observe(seconds)

    def journal_commit(self, writes: int, seconds: float) -> None:
        """``SqliteWriter.on_commit``: runs on the writer thread; quick, never raises."""
        self.journal_latency.observe(seconds)

    def attach(self, app: Any) -> None:
        """Read the switch's state from ``app`` when scraped; hook its journal writer.

        ``app`` is a ``SwitchApp`` or anything with the same attributes
        (``acceptor``, ``links``, ``journal``, ``hsm``); any may be None or
        missing (not started yet). Call it once the journal is open, or
        again later: the writer hook is installed once, chained after any
        ``on_commit`` hook already there.
        """
        self._app = app
        self._hook_journal()

    def set_saf_source(self, fn: Callable[[], Mapping[str, int]] | None) -> None:
        """Where the SAF depth comes from: ``fn() -> {bank_id: depth}``."""
        self._saf = fn

    @property
    def app(self) -> Any:
        return self._app

    # -- what the admin server reads ------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        self._hook_journal()
        return generate_latest(self.registry)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The last ``limit`` transactions, newest first (masked PANs only)."""
        limit = max(0, min(limit, len(self._recent)))
        out = []
        for i in range(1, limit + 1):
            (at, rid, mti, proc, kind, pan, amount, currency, rc, lat_us, tid, mid, issuer,
             stand_in, rrn) = self._recent[-i]
            out.append({
                "at": at, "id": rid, "mti": mti, "proc": proc, "kind": kind, "pan": pan,
                "amount": amount, "currency": currency, "rc": rc, "rc_name": rc_name(rc),
                "latency_ms": round(lat_us / 1000.0, 3), "terminal_id": tid, "merchant_id": mid,
                "issuer": issuer, "stand_in": stand_in, "rrn": rrn,
            })
        return out

    def stats(self) -> dict[str, Any]:
        """Rates, mix and latency over the rolling window, and totals since start."""
        snap = self._rolling.snapshot()
        snap["total"] = self._total
        snap["total_approved"] = self._approved
        snap["uptime_s"] = round(self._clock() - self._started, 1)
        return snap

    def saf(self) -> dict[str, int] | None:
        """SAF depth per bank, or None when there is no SAF queue to ask.

        From the callable given (``saf_depth`` / ``set_saf_source``), else
        from the attached switch's store-and-forward queue (``app.saf.depth()``).
        """
        fn = self._saf
        if fn is None:
            fn = getattr(getattr(self._app, "saf", None), "depth", None)
            if not callable(fn):
                return None
        return {str(k): int(v) for k, v in dict(fn()).items()}

    # -- internals ------------------------------------------------------------------

    def _hook_journal(self) -> None:
        journal = getattr(self._app, "journal", None)
        writer = getattr(journal, "writer", None) if journal is not None else None
        if writer is None or writer is self._hooked_writer:
            return
        previous = writer.on_commit
        if previous is None:
            writer.on_commit = self.journal_commit
        else:
            mine = self.journal_commit

            def both(writes: int, seconds: float) -> None:
                try:
                    previous(writes, seconds)
                finally:
                    mine(writes, seconds)

            writer.on_commit = both
        self._hooked_writer = writer


# -- state read at scrape time ----------------------------------------------------------


def _stats_dict(stats: Any) -> dict[str, Any]:
    if stats is None:
        return {}
    if is_dataclass(stats):
        return asdict(stats)
    return dict(vars(stats))


# LinkStats fields exported as counters (the rest is on /api/links).
_LINK_COUNTERS = (
    ("requests", "Requests sent to the issuer"),
    ("responses", "Issuer answers matched to a request"),
    ("timeouts", "Issuer requests unanswered within the timeout"),
    ("late", "Issuer answers that came after their request had timed out"),
    ("link_down", "Requests refused because the link was not online"),
    ("connects", "TCP connections made to the issuer"),
    ("connect_failures", "Failed connection attempts to the issuer"),
    ("disconnects", "Issuer connections lost or closed"),
    ("bad_macs", "Issuer answers with a missing or wrong MAC"),
)
_ACCEPTOR_COUNTERS = (
    ("connections_opened", "Terminal connections accepted"),
    ("frames_in", "Terminal frames read (keep-alives not counted)"),
    ("frames_out", "Responses written to terminals"),
    ("decode_errors", "Terminal frames that did not decode"),
    ("handler_errors", "Requests whose handling failed (answered 96)"),
    ("too_large", "Terminal connections closed for an oversized frame"),
    ("stalled", "Terminal connections closed for an incomplete frame"),
    ("responses_dropped", "Answers whose terminal connection had gone"),
)


class _StateCollector:
    """Gauges and counters read from the attached switch at each scrape."""

    def __init__(self, metrics: SwitchMetrics) -> None:
        self.m = metrics

    def describe(self) -> list:
        return []               # read lazily: the switch may not be attached yet

    def collect(self) -> Iterator:
        app = self.m._app
        for part in (self._acceptor, self._links, self._saf, self._hsm, self._journal):
            try:
                yield from part(app)
            except Exception:   # a scrape never fails because one part could not be read
                log.debug("metrics: %s could not be read", part.__name__, exc_info=True)

    def _acceptor(self, app: Any) -> Iterator:
        acc = getattr(app, "acceptor", None)
        in_flight = GaugeMetricFamily(f"{_PREFIX}_requests_in_flight",
                                      "Terminal requests being handled or queued")
        conns = GaugeMetricFamily(f"{_PREFIX}_terminal_connections", "Open terminal connections")
        in_flight.add_metric([], acc.in_flight if acc is not None else 0)
        conns.add_metric([], acc.connections if acc is not None else 0)
        yield in_flight
        yield conns
        stats = _stats_dict(getattr(acc, "stats", None))
        for name, doc in _ACCEPTOR_COUNTERS:
            if name in stats:
                c = CounterMetricFamily(f"{_PREFIX}_acceptor_{name}", doc)
                c.add_metric([], stats[name])
                yield c

    def _links(self, app: Any) -> Iterator:
        links: Mapping[str, Any] = getattr(app, "links", None) or {}
        up = GaugeMetricFamily(f"{_PREFIX}_issuer_link_up", "1 when the bank link is signed on",
                               labels=["issuer"])
        state = GaugeMetricFamily(f"{_PREFIX}_issuer_link_state",
                                  "Bank link state: 1 for the current state", labels=["issuer", "state"])
        in_flight = GaugeMetricFamily(f"{_PREFIX}_issuer_requests_in_flight",
                                      "Requests sent to the issuer awaiting an answer", labels=["issuer"])
        counters = {name: CounterMetricFamily(f"{_PREFIX}_issuer_{name}", doc, labels=["issuer"])
                    for name, doc in _LINK_COUNTERS}
        for bank_id, link in sorted(links.items()):
            current = str(getattr(link, "state", ""))
            up.add_metric([bank_id], 1 if current == banklink.ONLINE else 0)
            for s in LINK_STATES:
                state.add_metric([bank_id, s], 1 if s == current else 0)
            in_flight.add_metric([bank_id], getattr(link, "in_flight", 0))
            stats = _stats_dict(getattr(link, "stats", None))
            for name, fam in counters.items():
                if name in stats:
                    fam.add_metric([bank_id], stats[name])
        yield up
        yield state
        yield in_flight
        yield from counters.values()

    def _saf(self, app: Any) -> Iterator:
        depth = GaugeMetricFamily(f"{_PREFIX}_saf_queue_depth",
                                  "Store-and-forward advices waiting for delivery, per issuer",
                                  labels=["issuer"])
        values = dict.fromkeys(getattr(app, "links", None) or {}, 0)
        values.update(self.m.saf() or {})
        for bank_id, n in sorted(values.items()):
            depth.add_metric([bank_id], n)
        yield depth

    def _hsm(self, app: Any) -> Iterator:
        hsm = getattr(app, "hsm", None)
        avail = GaugeMetricFamily(f"{_PREFIX}_hsm_available", "1 when at least one HSM connection is up")
        avail.add_metric([], 1 if hsm is not None and hsm.available else 0)
        yield avail
        if hsm is not None:
            in_flight = GaugeMetricFamily(f"{_PREFIX}_hsm_requests_in_flight", "HSM commands awaiting an answer")
            in_flight.add_metric([], hsm.in_flight)
            yield in_flight
            conns = GaugeMetricFamily(f"{_PREFIX}_hsm_connections_up", "Open HSM connections")
            conns.add_metric([], getattr(hsm, "connections_up", 0))
            yield conns
            timeouts = CounterMetricFamily(f"{_PREFIX}_hsm_timeouts", "HSM commands unanswered in time")
            timeouts.add_metric([], getattr(hsm, "timeouts", 0))
            yield timeouts

    def _journal(self, app: Any) -> Iterator:
        journal = getattr(app, "journal", None)
        healthy = GaugeMetricFamily(f"{_PREFIX}_journal_healthy",
                                    "1 when the journal writer runs and its last commit succeeded")
        healthy.add_metric([], 1 if journal is not None and journal.healthy else 0)
        yield healthy
        writer = getattr(journal, "writer", None) if journal is not None else None
        if writer is not None:
            last = GaugeMetricFamily(f"{_PREFIX}_journal_last_write_latency_seconds",
                                     "Oldest write of the last group commit: queued to committed")
            last.add_metric([], writer.last_latency_seconds)
            yield last
            failed = CounterMetricFamily(f"{_PREFIX}_journal_write_failures",
                                         "Journal writes that failed")
            failed.add_metric([], writer.failed)
            yield failed
            commits = CounterMetricFamily(f"{_PREFIX}_journal_commits", "Journal group commits")
            commits.add_metric([], writer.commits)
            yield commits
            rows = CounterMetricFamily(f"{_PREFIX}_journal_writes", "Journal writes committed")
            rows.add_metric([], writer.rows)
            yield rows
