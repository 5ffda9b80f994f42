"""SwitchMetrics: counters, histograms, the rolling window and state read at scrape time.

Transactions are synthetic ``steps.Txn`` objects with a ``TxnRecord`` (what
the pipeline hands its stats hook), and once a real ``Pipeline`` over fake
bank links; time is a fake clock, so nothing here depends on how fast the
machine is.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from cardswitch.iso8583.constants import RC, F, response_mti
from cardswitch.merchants.registry import Registry
from cardswitch.netfile import load_network
from cardswitch.routing.bintable import BinTable, Route
from cardswitch.switch.banklink import LinkStats
from cardswitch.switch.clock import RrnAllocator
from cardswitch.switch.index import TxnIndex
from cardswitch.switch.journal import Journal
from cardswitch.switch.metrics import LATENCY_BUCKETS, Rolling, SwitchMetrics, rc_name
from cardswitch.switch.pipeline import Pipeline
from cardswitch.switch.records import TxnRecord
from cardswitch.switch.steps import Context, Txn

PAN = "6221260000000018"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


_ids = itertools.count(1)


def txn(rc: str = "00", *, mti: str = "0200", proc: str = "000000", issuer: str = "BANKA",
        latency_us: int = 1500, pan: str = PAN, amount: int = 1000, with_record: bool = True,
        route: str | None = None) -> Txn:
    t = Txn(req={F.MTI: mti, F.PROC: proc, F.TERMINAL_ID: "POS00001", F.MERCHANT_ID: "898440158120001"},
            mti=mti, received=datetime.now(timezone.utc), t0=0.0)
    if route:
        t.route = Route(route, "debit", "622126", "622126")
    if with_record:
        t.record = TxnRecord(
            id=next(_ids), business_date="2026-03-14", received_at="2026-03-14T10:00:00.000000Z",
            mti=mti, proc=proc, kind="purchase", amount=amount, currency="156", terminal_id="POS00001",
            merchant_id="898440158120001", stan="000001", transmitted="0314100000", batch="000001",
            pan_masked=pan[:6] + "******" + pan[-4:] if len(pan) >= 11 and pan.isdigit() else pan,
            issuer_id=issuer, rrn="000000000001", response_code=rc, latency_us=latency_us,
            completed_at="2026-03-14T10:00:00.001500Z")
    return t


def samples(m: SwitchMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, keyed by (name, sorted labels), parsed by prometheus-client."""
    out = {}
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: SwitchMetrics, name: str, **labels: str) -> float:
    return samples(m).get((name, tuple(sorted(labels.items()))), 0.0)


# -- events ---------------------------------------------------------------------------


def test_transactions_counted_by_mti_type_issuer_and_code():
    m = SwitchMetrics(clock=FakeClock())
    for _ in range(3):
        m.count(txn("00"), "00")
    m.count(txn("51", proc="010000"), "51")
    m.count(txn("91", mti="0100", issuer="BANKB"), "91")
    name = "cardswitch_transactions_total"
    assert value(m, name, mti="0200", txn_type="00", issuer="BANKA", rc="00") == 3
    assert value(m, name, mti="0200", txn_type="01", issuer="BANKA", rc="51") == 1
    assert value(m, name, mti="0100", txn_type="00", issuer="BANKB", rc="91") == 1
    assert value(m, "cardswitch_transaction_latency_seconds_count") == 5


def test_latency_histogram_buckets_cover_half_a_millisecond_to_five_seconds():
    assert LATENCY_BUCKETS[0] == 0.0005 and LATENCY_BUCKETS[-1] == 5.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    m = SwitchMetrics(clock=FakeClock())
    m.count(txn(latency_us=400), "00")          # 0.4 ms
    m.count(txn(latency_us=3_000), "00")        # 3 ms
    m.count(txn(latency_us=4_000_000), "91")    # 4 s
    b = "cardswitch_transaction_latency_seconds_bucket"
    assert value(m, b, le="0.0005") == 1
    assert value(m, b, le="0.005") == 2
    assert value(m, b, le="2.5") == 2
    assert value(m, b, le="5.0") == 3
    assert value(m, "cardswitch_transaction_latency_seconds_sum") == pytest.approx(4.0034)


def test_unrouted_and_recordless_transactions_use_bounded_labels():
    m = SwitchMetrics(clock=FakeClock())
    m.count(txn("30", proc="", issuer=""), "30")            # unreadable: no processing code, no issuer
    m.count(txn("30", proc="ab0000", issuer=""), "30")      # garbage processing code
    m.count(txn("12", issuer="", route="BANKC"), "12")      # routed, record not yet stamped
    m.count(txn("96", with_record=False), "96")             # no record at all
    m.count(txn("\x00Z", issuer="x" * 100), "\x00Z")        # nonsense from a misbehaving issuer
    name = "cardswitch_transactions_total"
    assert value(m, name, mti="0200", txn_type="none", issuer="none", rc="30") == 1
    assert value(m, name, mti="0200", txn_type="other", issuer="none", rc="30") == 1
    assert value(m, name, mti="0200", txn_type="00", issuer="BANKC", rc="12") == 1
    assert value(m, name, mti="0200", txn_type="00", issuer="none", rc="96") == 1
    assert value(m, name, mti="0200", txn_type="00", issuer="other", rc="other") == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=6), st.text(max_size=8), st.text(max_size=40), st.text(max_size=3)),
                max_size=20))
def test_any_labels_give_a_valid_exposition(rows):
    m = SwitchMetrics(clock=FakeClock())
    for mti, proc, issuer, rc in rows:
        t = txn(rc, proc=proc, issuer=issuer)
        t.mti = mti
        m.count(t, rc)
    total = sum(v for (n, _), v in samples(m).items() if n == "cardswitch_transactions_total")
    assert total == len(rows)


def test_issuer_latency_per_bank():
    m = SwitchMetrics(clock=FakeClock())
    m.observe_issuer("BANKA", 0.004)
    m.observe_issuer("BANKA", 0.02)
    m.observe_issuer("BANKB", 3.0)
    assert value(m, "cardswitch_issuer_latency_seconds_count", issuer="BANKA") == 2
    assert value(m, "cardswitch_issuer_latency_seconds_bucket", issuer="BANKA", le="0.005") == 1
    assert value(m, "cardswitch_issuer_latency_seconds_bucket", issuer="BANKB", le="2.5") == 0
    assert value(m, "cardswitch_issuer_latency_seconds_bucket", issuer="BANKB", le="5.0") == 1


# -- the dashboard's figures -----------------------------------------------------------


def test_recent_transactions_newest_first_bounded_and_masked():
    m = SwitchMetrics(recent=5, clock=FakeClock())
    for i in range(8):
        m.count(txn("00", amount=100 + i), "00")
    recent = m.recent(50)
    assert [r["amount"] for r in recent] == [107, 106, 105, 104, 103]
    assert recent[0]["pan"] == "622126******0018"
    assert recent[0]["rc_name"] == "approved"
    assert m.recent(2) == recent[:2]


def test_a_clear_pan_handed_by_mistake_is_masked_before_it_is_kept():
    m = SwitchMetrics(clock=FakeClock())
    m.count(txn("00", pan=PAN), "00")           # a normal masked one
    t = txn("05")
    t.record.pan_masked = PAN                   # a caller's mistake
    m.count(t, "05")
    shown = m.recent(1)[0]["pan"]
    assert shown == "622126******0018"
    assert PAN not in repr(m.recent(10)) and PAN not in repr(m.stats())
    assert PAN.encode() not in m.exposition()


def test_rolling_rates_mix_and_percentiles():
    clock = FakeClock(5000.0)
    m = SwitchMetrics(clock=clock)
    clock.t += 100                              # long after start: full windows
    for sec in range(60):                       # 60 s: 10/s, one decline in ten
        for i in range(10):
            m.count(txn("51" if i == 0 else "00", latency_us=1000 if i < 9 else 200_000),
                    "51" if i == 0 else "00")
        clock.t += 1
    s = m.stats()
    assert s["rate_60s"] == pytest.approx(10.0)
    assert s["rate_10s"] == pytest.approx(10.0)
    assert s["series"] == [10] * 60
    assert s["count"] == 600
    assert s["approval_ratio"] == pytest.approx(0.9)
    mix = {x["rc"]: x for x in s["mix"]}
    assert mix["00"]["count"] == 540 and mix["51"]["count"] == 60
    assert mix["51"]["name"] == rc_name("51") == "not sufficient funds"
    lat = s["latency_ms"]
    assert 1.0 <= lat["p50"] <= 1.08              # cells are 8 % wide, upper bound reported
    assert 1.0 <= lat["p90"] <= 1.08              # 90 % of samples are 1 ms
    assert 200.0 <= lat["p99"] <= 216.0
    assert 200.0 <= lat["max"] <= 216.0
    assert s["total"] == 600 and s["total_approved"] == 540


def test_rolling_window_forgets_old_seconds():
    clock = FakeClock(0.0)
    r = Rolling(window=60, clock=clock)
    clock.t = 500.0
    for _ in range(30):
        r.add("00", 1000)
    clock.t = 501.0
    snap = r.snapshot()
    assert snap["rate_10s"] == pytest.approx(3.0) and snap["series"][-1] == 30
    clock.t = 530.0
    assert r.snapshot()["rate_10s"] == 0.0
    assert r.snapshot()["count"] == 30
    clock.t = 562.0
    snap = r.snapshot()
    assert snap["count"] == 0 and snap["mix"] == [] and snap["latency_ms"]["p50"] is None
    assert snap["approval_ratio"] is None


def test_rates_just_after_start_are_not_diluted():
    clock = FakeClock(100.0)
    m = SwitchMetrics(clock=clock)
    for _ in range(4):
        m.count(txn(), "00")
    clock.t = 101.0
    s = m.stats()
    assert s["rate_10s"] == pytest.approx(4.0)     # one second of history: 4/s, not 0.4/s
    assert s["rate_60s"] == pytest.approx(4.0)


# -- state read at scrape time ----------------------------------------------------------------


@dataclass
class StubLink:
    state: str = "online"
    in_flight: int = 0
    stats: LinkStats = field(default_factory=LinkStats)

    @property
    def online(self) -> bool:
        return self.state == "online"


@dataclass
class StubAcceptor:
    in_flight: int = 0
    connections: int = 0


@dataclass
class StubHsm:
    available: bool = True
    in_flight: int = 0
    connections_up: int = 2
    timeouts: int = 0


class StubApp:
    def __init__(self) -> None:
        self.links = {"BANKA": StubLink(), "BANKB": StubLink(state="offline")}
        self.acceptor = StubAcceptor(in_flight=3, connections=7)
        self.hsm = StubHsm()
        self.journal = None


def test_state_is_read_from_the_switch_when_scraped():
    app = StubApp()
    m = SwitchMetrics(clock=FakeClock())
    m.attach(app)
    assert value(m, "cardswitch_requests_in_flight") == 3
    assert value(m, "cardswitch_terminal_connections") == 7
    assert value(m, "cardswitch_issuer_link_up", issuer="BANKA") == 1
    assert value(m, "cardswitch_issuer_link_up", issuer="BANKB") == 0
    assert value(m, "cardswitch_issuer_link_state", issuer="BANKB", state="offline") == 1
    assert value(m, "cardswitch_issuer_link_state", issuer="BANKB", state="online") == 0
    assert value(m, "cardswitch_hsm_available") == 1
    assert value(m, "cardswitch_saf_queue_depth", issuer="BANKA") == 0
    # things change between scrapes, nothing has to push them
    app.links["BANKB"].state = "online"
    app.links["BANKA"].stats.timeouts = 4
    app.acceptor.connections = 2
    app.hsm.available = False
    assert value(m, "cardswitch_issuer_link_up", issuer="BANKB") == 1
    assert value(m, "cardswitch_issuer_timeouts_total", issuer="BANKA") == 4
    assert value(m, "cardswitch_terminal_connections") == 2
    assert value(m, "cardswitch_hsm_available") == 0


def test_saf_depth_from_a_callable():
    app = StubApp()
    depth = {"BANKB": 5}
    m = SwitchMetrics(clock=FakeClock(), saf_depth=lambda: depth)
    m.attach(app)
    assert value(m, "cardswitch_saf_queue_depth", issuer="BANKB") == 5
    assert value(m, "cardswitch_saf_queue_depth", issuer="BANKA") == 0
    depth["BANKB"] = 2
    assert value(m, "cardswitch_saf_queue_depth", issuer="BANKB") == 2
    assert m.saf() == {"BANKB": 2}
    m.set_saf_source(None)
    assert m.saf() is None


def test_saf_depth_from_the_switchs_own_queue():
    class Saf:
        def depth(self):
            return {"BANKA": 4}

    app = StubApp()
    app.saf = Saf()
    m = SwitchMetrics(clock=FakeClock())
    m.attach(app)
    assert m.saf() == {"BANKA": 4}
    assert value(m, "cardswitch_saf_queue_depth", issuer="BANKA") == 4
    m.set_saf_source(lambda: {"BANKA": 1})     # an explicit source wins
    assert value(m, "cardswitch_saf_queue_depth", issuer="BANKA") == 1


def test_a_part_that_cannot_be_read_does_not_break_the_scrape():
    class Broken:
        @property
        def in_flight(self):
            raise RuntimeError("boom")

    app = StubApp()
    app.acceptor = Broken()
    m = SwitchMetrics(clock=FakeClock())
    m.attach(app)
    s = samples(m)
    assert ("cardswitch_issuer_link_up", (("issuer", "BANKA"),)) in s
    assert ("cardswitch_requests_in_flight", ()) not in s


def test_nothing_attached_yet():
    m = SwitchMetrics(clock=FakeClock())
    assert value(m, "cardswitch_requests_in_flight") == 0
    assert value(m, "cardswitch_hsm_available") == 0
    assert value(m, "cardswitch_journal_healthy") == 0


def test_own_registry_two_instances_do_not_collide():
    a, b = SwitchMetrics(clock=FakeClock()), SwitchMetrics(clock=FakeClock())
    a.count(txn(), "00")
    assert value(a, "cardswitch_transaction_latency_seconds_count") == 1
    assert value(b, "cardswitch_transaction_latency_seconds_count") == 0


# -- the journal -----------------------------------------------------------------------------------


def test_journal_commits_feed_the_write_latency_histogram(tmp_path):
    journal = Journal.open("sqlite:///" + str(tmp_path / "j.db"), str(tmp_path))
    try:
        calls = []
        journal.writer.on_commit = lambda n, s: calls.append(n)   # someone else's hook stays
        app = StubApp()
        app.journal = journal
        m = SwitchMetrics(clock=FakeClock())
        m.attach(app)
        m.attach(app)                                   # idempotent: hooked once
        journal.set_state("k", "v")
        journal.flush()
        journal.set_state("k", "w")
        journal.flush()
        assert value(m, "cardswitch_journal_write_latency_seconds_count") == 2
        assert calls == [1, 1]
        assert value(m, "cardswitch_journal_healthy") == 1
        assert value(m, "cardswitch_journal_writes_total") == journal.writer.rows
        assert value(m, "cardswitch_journal_commits_total") == journal.writer.commits
    finally:
        journal.close()
    assert value(m, "cardswitch_journal_healthy") == 0


# -- a real pipeline -----------------------------------------------------------------------------------


class ApprovingLink:
    """A bank link that is always online and approves everything."""

    online = True

    def __init__(self, bank_id: str) -> None:
        self.bank_id = bank_id
        self._stan = itertools.count(1)

    def reserve_stan(self) -> str:
        return f"{next(self._stan):06d}"

    async def wait_online(self, timeout: float | None = None) -> bool:
        return True

    async def request(self, msg: dict, timeout_s: float, stan: str | None = None) -> dict:
        msg[F.STAN] = stan or msg.get(F.STAN) or self.reserve_stan()
        return {F.MTI: response_mti(msg[F.MTI]), F.STAN: msg[F.STAN], F.RRN: msg.get(F.RRN, ""),
                F.RESPONSE_CODE: RC.APPROVED, F.AUTH_CODE: "A00001"}


def test_metrics_move_as_the_pipeline_answers(tmp_path):
    network = load_network(None)
    metrics = SwitchMetrics()

    def request(stan: str, pan: str, amount: int = 1000) -> dict:
        return {F.MTI: "0200", F.PROC: "000000", F.TRANSMISSION_DT: "0314101500", F.STAN: stan,
                F.LOCAL_TIME: "181500", F.LOCAL_DATE: "0314", F.ENTRY_MODE: "021", F.CONDITION_CODE: "00",
                F.TERMINAL_ID: "POS00001", F.MERCHANT_ID: "898440158120001", F.CURRENCY: "156",
                F.BATCH_NUMBER: "000001", F.PAN: pan, F.AMOUNT: f"{amount:012d}"}

    async def main() -> None:
        journal = Journal.open("sqlite:///" + str(tmp_path / "j.db"), str(tmp_path))
        ctx = Context(network=network, registry=Registry.from_network(network),
                      bins=BinTable.from_network(network), index=TxnIndex(), token_secret=b"k",
                      business_date="2026-03-14")
        rrn = RrnAllocator(lambda prefix, wanted: wanted)
        pipeline = Pipeline(ctx, journal, {b.id: ApprovingLink(b.id) for b in network.banks},
                            rrn=lambda: rrn.next(datetime(2026, 3, 14, tzinfo=timezone.utc)),
                            translate_pin=None, issuer_timeout_s=0.5, stats=metrics)
        try:
            assert (await pipeline.handle(request("000001", PAN)))[F.RESPONSE_CODE] == RC.APPROVED
            assert (await pipeline.handle(request("000002", "6221260000000017")))[F.RESPONSE_CODE] == "14"
            assert (await pipeline.handle(request("000003", PAN)))[F.RESPONSE_CODE] == RC.APPROVED
        finally:
            await pipeline.drain()
            stop = getattr(pipeline, "stop", None)
            if stop is not None:
                await stop()
            journal.close()

    asyncio.run(main())
    name = "cardswitch_transactions_total"
    assert value(metrics, name, mti="0200", txn_type="00", issuer="BANKA", rc="00") == 2
    assert sum(v for (n, labels), v in samples(metrics).items()
               if n == name and ("rc", "14") in labels) == 1
    recent = metrics.recent(10)
    assert [r["rc"] for r in recent] == ["00", "14", "00"]
    assert all(r["pan"] in ("622126******0018", "622126******0017") for r in recent)
    assert all(r["latency_ms"] >= 0 for r in recent)
    assert metrics.stats()["total"] == 3
