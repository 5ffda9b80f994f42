"""Route selection (15 / 52), host health and failover."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.config import BinRange, Endpoint
from cardswitch.iso8583.constants import RC
from cardswitch.routing.bintable import BinTable
from cardswitch.routing.routes import (
    HEALTHY,
    UNHEALTHY,
    EndpointHealth,
    is_on_us,
    issuer_route,
    pick_host,
    select_routes,
)

TABLE = BinTable.from_entries([
    ("BANKA", BinRange("622126", "622126", "debit")),
    ("BANKB", BinRange("62284800", "62284899", "credit")),
])
CARD_A = "6221260000000017"
CARD_A2 = "6221260000000025"
CARD_B = "6228480000000012"
UNKNOWN = "4111111111111111"


def test_issuer_route():
    assert issuer_route(TABLE, CARD_A).bank_id == "BANKA"
    assert issuer_route(TABLE, UNKNOWN) is None


def test_plain_request_routes_to_issuer():
    d = select_routes(TABLE, CARD_B)
    assert d.ok and d.response_code == ""
    assert d.issuer.bank_id == "BANKB" and d.issuer.card_type == "credit"
    assert d.target is None and not d.cross_issuer


def test_unroutable_card_is_15():
    d = select_routes(TABLE, UNKNOWN)
    assert not d.ok and d.response_code == RC.NO_SUCH_ISSUER == "15"
    assert d.issuer is None


def test_unroutable_card_is_15_even_for_a_transfer():
    assert select_routes(TABLE, UNKNOWN, CARD_A).response_code == RC.NO_SUCH_ISSUER


@pytest.mark.parametrize("to_pan", [UNKNOWN, "", "62212600000000x7"])
def test_unroutable_transfer_target_is_52(to_pan):
    d = select_routes(TABLE, CARD_A, to_pan)
    assert d.response_code == RC.NO_SUCH_ACCOUNT == "52"
    assert d.issuer.bank_id == "BANKA" and d.target is None


def test_transfer_same_issuer():
    d = select_routes(TABLE, CARD_A, CARD_A2)
    assert d.ok and d.target.bank_id == "BANKA" and not d.cross_issuer


def test_transfer_other_issuer():
    d = select_routes(TABLE, CARD_A, CARD_B)
    assert d.ok and d.target.bank_id == "BANKB" and d.cross_issuer


def test_on_us():
    r = TABLE.lookup(CARD_A)
    assert is_on_us(r, "BANKA")
    assert not is_on_us(r, "BANKB")
    assert not is_on_us(None, "BANKA")


# -- EndpointHealth -------------------------------------------------------------


def test_stays_healthy_below_threshold_and_success_resets_count():
    h = EndpointHealth(failure_threshold=3, probe_interval=10)
    assert not h.mark_failure(1.0)
    assert not h.mark_failure(2.0)
    assert h.healthy and h.usable(2.0) and h.failures == 2
    assert not h.mark_success(3.0)  # already healthy: no state change
    assert h.failures == 0
    assert not h.mark_failure(4.0)
    assert not h.mark_failure(5.0)
    assert h.healthy


def test_consecutive_failures_make_unhealthy_until_probe_interval():
    h = EndpointHealth(failure_threshold=2, probe_interval=10)
    h.mark_failure(100.0)
    assert h.mark_failure(101.0)           # threshold reached: the transition is reported
    assert h.state == UNHEALTHY and h.changed_at == 101.0
    assert not h.usable(101.0)
    assert not h.usable(110.9)
    assert h.usable(111.0)                 # probe due


def test_failed_probe_pushes_the_next_probe_out():
    h = EndpointHealth(failure_threshold=1, probe_interval=10)
    assert h.mark_failure(0.0)
    assert h.usable(10.0)
    assert not h.mark_failure(12.0)        # the probe failed: still unhealthy, no new transition
    assert h.failures == 2
    assert not h.usable(21.9)
    assert h.usable(22.0)


def test_successful_probe_makes_healthy_again():
    h = EndpointHealth(failure_threshold=1, probe_interval=10)
    h.mark_failure(0.0)
    assert h.mark_success(10.5)
    assert h.state == HEALTHY and h.failures == 0 and h.changed_at == 10.5
    assert h.usable(10.5)


def test_mark_attempt_holds_back_concurrent_probes():
    h = EndpointHealth(failure_threshold=1, probe_interval=10)
    h.mark_failure(0.0)
    assert h.usable(15.0)
    h.mark_attempt(15.0)                   # this request is the probe
    assert not h.usable(15.0)              # the next request does not pile on
    assert h.usable(25.0)


def test_mark_attempt_does_nothing_when_healthy_or_probe_not_due():
    h = EndpointHealth(failure_threshold=1, probe_interval=10)
    h.mark_attempt(5.0)
    assert h.usable(5.0)
    h.mark_failure(0.0)
    h.mark_attempt(3.0)
    assert h.retry_at == 10.0


def test_mark_down_is_unhealthy_at_once_and_pushes_the_probe_out():
    h = EndpointHealth(failure_threshold=3, probe_interval=10)
    assert h.mark_down(5.0)                # one conclusive failure: no threshold to reach
    assert h.state == UNHEALTHY and h.changed_at == 5.0 and h.failures == 1
    assert not h.usable(14.9) and h.usable(15.0)
    assert not h.mark_down(15.0)           # a failed probe: still down, next probe later
    assert h.retry_at == 25.0 and h.changed_at == 5.0
    assert h.mark_success(25.0) and h.healthy and h.failures == 0


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(["fail", "down", "ok", "attempt"]),
                                 st.floats(0, 5, allow_nan=False)), max_size=40),
       threshold=st.integers(1, 5), interval=st.floats(0, 20, allow_nan=False))
def test_health_model(events, threshold, interval):
    """Against a plain model: unhealthy exactly when the last success was followed by
    a down or by ``threshold`` failures; usable when healthy or a probe is due."""
    h = EndpointHealth(threshold, interval)
    now, failures, down, retry_at = 0.0, 0, False, 0.0
    for kind, dt in events:
        now += dt
        if kind == "ok":
            h.mark_success(now)
            failures, down = 0, False
        elif kind == "fail":
            h.mark_failure(now)
            failures += 1
            if down or failures >= threshold:
                down, retry_at = True, now + interval
        elif kind == "down":
            h.mark_down(now)
            failures += 1
            down, retry_at = True, now + interval
        else:
            h.mark_attempt(now)
            if down and now >= retry_at:
                retry_at = now + interval
        assert h.healthy == (not down) and h.failures == failures
        assert h.usable(now) == (not down or now >= retry_at)


def test_bad_parameters_refused():
    with pytest.raises(ValueError):
        EndpointHealth(failure_threshold=0)
    with pytest.raises(ValueError):
        EndpointHealth(probe_interval=-1)


# -- pick_host --------------------------------------------------------------------

P = Endpoint("127.0.0.1", 9101)
S1 = Endpoint("127.0.0.1", 9102)
S2 = Endpoint("127.0.0.1", 9103)


def down(at: float = 0.0, interval: float = 10.0) -> EndpointHealth:
    h = EndpointHealth(failure_threshold=1, probe_interval=interval)
    h.mark_failure(at)
    return h


def test_primary_when_usable():
    assert pick_host((P, S1, S2), {}, 0.0) == P
    assert pick_host((P, S1), {P: EndpointHealth(), S1: down()}, 1.0) == P


def test_next_usable_when_primary_down():
    assert pick_host((P, S1, S2), {P: down()}, 1.0) == S1
    assert pick_host((P, S1, S2), {P: down(), S1: down()}, 1.0) == S2


def test_none_when_all_down():
    assert pick_host((P, S1), {P: down(), S1: down()}, 1.0) is None
    assert pick_host((), {}, 1.0) is None


def test_primary_back_after_probe_interval_then_fails_back():
    health = {P: down(at=0.0, interval=10.0), S1: EndpointHealth()}
    assert pick_host((P, S1), health, 5.0) == S1
    assert pick_host((P, S1), health, 10.0) == P        # probe the primary
    health[P].mark_attempt(10.0)
    assert pick_host((P, S1), health, 10.1) == S1       # while the probe is out
    health[P].mark_success(10.2)
    assert pick_host((P, S1), health, 10.3) == P


def test_pick_host_is_pure():
    health = {P: down(at=0.0, interval=10.0)}
    before = (health[P].state, health[P].failures, health[P].retry_at)
    pick_host((P, S1), health, 50.0)
    assert (health[P].state, health[P].failures, health[P].retry_at) == before
