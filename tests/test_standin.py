"""Stand-in rules, pure: the profile, the card file, the daily counters."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.config import StandIn
from cardswitch.iso8583.constants import RC
from cardswitch.netfile import load_network
from cardswitch.pan import pan_token
from cardswitch.switch import standin
from cardswitch.switch.standin import CardFacts, CardFile, LocalCounters, Request, StandInService

NOW = datetime(2026, 3, 14, 10, 0, tzinfo=timezone.utc)
SECRET = b"standin-test-secret"
PROFILE = StandIn(max_amount=50_000, daily_count=3, daily_amount=80_000, allowed="00,50")

CARDS = CardFile({"good": CardFacts("active", "3012"), "lost": CardFacts("lost", "3012"),
                  "stolen": CardFacts("stolen", "3012"), "blocked": CardFacts("blocked", "3012"),
                  "old": CardFacts("active", "2601")},
                 banks_listing=["BANKB"])


def req(**kw) -> Request:
    base = dict(bank_id="BANKB", mti="0200", txn_type="00", amount=10_000, has_pin=False,
                has_original=False, pan_token="good", expiry="")
    base.update(kw)
    return Request(**base)


@pytest.mark.parametrize("change, rc, reason", [
    ({}, RC.APPROVED, "stand-in"),
    ({"mti": "0201"}, RC.APPROVED, "stand-in"),                      # a repeat processed as the original
    ({"txn_type": "50"}, RC.APPROVED, "stand-in"),
    ({"mti": "0100"}, RC.ISSUER_INOPERATIVE, "type"),                # no 0120 advice
    ({"txn_type": "01"}, RC.ISSUER_INOPERATIVE, "type"),             # not in allowed
    ({"txn_type": "40"}, RC.ISSUER_INOPERATIVE, "type"),
    ({"has_original": True}, RC.ISSUER_INOPERATIVE, "type"),         # completion / void
    ({"has_pin": True}, RC.ISSUER_INOPERATIVE, "PIN"),
    ({"pan_token": "unknown"}, RC.INVALID_CARD, "unknown"),
    ({"pan_token": "lost"}, RC.LOST_CARD, "lost"),
    ({"pan_token": "stolen"}, RC.STOLEN_CARD, "stolen"),
    ({"pan_token": "blocked"}, RC.DO_NOT_HONOUR, "blocked"),
    ({"pan_token": "old"}, RC.EXPIRED_CARD, "expired"),
    ({"expiry": "2602"}, RC.EXPIRED_CARD, "expired"),                # the request's own expiry is past
    ({"expiry": "2912"}, RC.EXPIRED_CARD, "expired"),                # not the card's expiry
    ({"expiry": "3012"}, RC.APPROVED, "stand-in"),
    ({"amount": 50_000}, RC.APPROVED, "stand-in"),
    ({"amount": 50_001}, RC.ISSUER_INOPERATIVE, "amount"),
])
def test_rules(change, rc, reason):
    d = standin.check(PROFILE, req(**change), CARDS, NOW)
    assert d.rc == rc and reason in d.reason
    assert d.approve == (rc == RC.APPROVED)


def test_no_profile_means_91_before_anything_else():
    d = standin.check(StandIn(), req(pan_token="lost", has_pin=True), CARDS, NOW)
    assert d.rc == RC.ISSUER_INOPERATIVE and "no stand-in" in d.reason


def test_bank_that_lists_no_cards_is_judged_on_the_request():
    cards = CardFile({}, banks_listing=[])
    assert standin.check(PROFILE, req(pan_token="anything", bank_id="BANKX"), cards, NOW).approve
    assert standin.check(PROFILE, req(pan_token="x", bank_id="BANKX", expiry="2512"), cards, NOW).rc == \
        RC.EXPIRED_CARD


def test_allowed_types_and_problems():
    p = StandIn(max_amount=1, allowed=" 00, 01,40,xx,,")
    assert standin.allowed_types(p) == {"00", "01"}
    problems = standin.profile_problems("BANKB", p)
    assert len(problems) == 2 and "'40'" in problems[0] and "'xx'" in problems[1]
    assert standin.profile_problems("BANKB", StandIn()) == []
    assert standin.allowed_types(StandIn()) == {"00"}        # the default: purchases


def test_auth_code_is_the_switch_s_own():
    assert standin.auth_code(7) == "S00007" and standin.auth_code(1_234_567) == "S34567"
    assert all(len(standin.auth_code(i)) == 6 for i in (0, 99_999, 100_000))


def test_counters_limit_count_and_amount_per_card_and_day():
    async def main():
        c = LocalCounters()
        assert await c.try_add("t", "2026-03-14", 30_000, 3, 80_000)
        assert await c.try_add("t", "2026-03-14", 30_000, 3, 80_000)
        assert not await c.try_add("t", "2026-03-14", 30_000, 3, 80_000)     # 90,000 > 80,000
        assert await c.try_add("t", "2026-03-14", 20_000, 3, 80_000)         # exactly 80,000
        assert await c.try_add("t", "2026-03-14", 1, 0, 0)                   # no limits: always
        assert not await c.try_add("t", "2026-03-14", 1, 4, 0)               # a 5th is one too many
        assert await c.try_add("u", "2026-03-14", 30_000, 3, 80_000)         # another card
        assert await c.try_add("t", "2026-03-15", 30_000, 3, 80_000)         # another day
        assert c.used("t", "2026-03-14") == (4, 80_001)
        c.forget_before("2026-03-15")
        assert c.used("t", "2026-03-14") == (0, 0) and c.used("t", "2026-03-15") == (1, 30_000)

    asyncio.run(main())


def test_counters_rebuilt_from_journal_rows():
    c = LocalCounters()
    c.load("2026-03-14", [("t", 2, 70_000)])
    assert c.used("t", "2026-03-14") == (2, 70_000)
    assert not c.fits("t", "2026-03-14", 20_000, 3, 80_000)
    assert c.fits("t", "2026-03-14", 10_000, 3, 80_000)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40_000), max_size=20),
       st.integers(min_value=0, max_value=5), st.integers(min_value=0, max_value=100_000))
def test_counters_never_exceed_their_limits(amounts, max_count, max_amount):
    async def main():
        c = LocalCounters()
        for a in amounts:
            await c.try_add("t", "d", a, max_count, max_amount)
        n, total = c.used("t", "d")
        assert not max_count or n <= max_count
        assert not max_amount or total <= max_amount

    asyncio.run(main())


def test_service_uses_the_network_cards_and_profiles():
    net = load_network(None)
    banks = tuple(replace(b, stand_in=PROFILE) if b.id == "BANKB" else b for b in net.banks)
    net = replace(net, banks=banks)
    svc = StandInService(net, SECRET)
    assert svc.enabled("BANKB") and not svc.enabled("BANKA") and not svc.enabled("NOPE")

    def facts(pan: str) -> Request:
        return req(pan_token=pan_token(pan, SECRET))

    async def main():
        date = "2026-03-14"
        assert (await svc.decide(facts("6228480000000015"), date, NOW)).approve
        assert (await svc.decide(facts("6228480000000023"), date, NOW)).rc == RC.STOLEN_CARD
        assert (await svc.decide(facts("6228480000000031"), date, NOW)).rc == RC.DO_NOT_HONOUR
        assert (await svc.decide(facts("6228480000000098"), date, NOW)).rc == RC.INVALID_CARD
        # Daily count: 3 approvals per card; the first already counted.
        assert (await svc.decide(facts("6228480000000015"), date, NOW)).approve
        assert (await svc.decide(facts("6228480000000015"), date, NOW)).approve
        d = await svc.decide(facts("6228480000000015"), date, NOW)
        assert d.rc == RC.ISSUER_INOPERATIVE and "daily" in d.reason
        assert svc.approved == 3 and svc.declined == 4

    asyncio.run(main())
