"""The business-date rule (settlement.md 1), without a clock or a switch."""

from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest

from cardswitch.switch.cutover import automatic_target, manual_target, seconds_until_next_check

SH = ZoneInfo("Asia/Shanghai")


def at(y, m, d, hh, mm):
    return datetime(y, m, d, hh, mm, tzinfo=SH)


def test_before_the_cutover_time_nothing_is_due():
    assert automatic_target(date(2026, 11, 28), at(2026, 11, 28, 22, 59), "23:00") is None


def test_at_the_cutover_time_the_date_moves_to_tomorrow():
    assert automatic_target(date(2026, 11, 28), at(2026, 11, 28, 23, 0), "23:00") == date(2026, 11, 29)


def test_already_moved_by_hand_stays():
    assert automatic_target(date(2026, 11, 29), at(2026, 11, 28, 23, 30), "23:00") is None


def test_a_switch_down_over_several_cutovers_catches_up_forward_only():
    assert automatic_target(date(2026, 11, 20), at(2026, 11, 28, 10, 0), "23:00") == date(2026, 11, 28)
    assert automatic_target(date(2026, 12, 5), at(2026, 11, 28, 23, 30), "23:00") is None


def test_manual_cutover_is_always_one_day():
    assert manual_target(date(2026, 12, 31)) == date(2027, 1, 1)


@pytest.mark.parametrize("now,expected", [(at(2026, 11, 28, 22, 59), 60.0), (at(2026, 11, 28, 23, 0), 60.0)])
def test_the_service_wakes_at_least_every_minute(now, expected):
    assert seconds_until_next_check(now, "23:00") <= expected
    assert seconds_until_next_check(at(2026, 11, 28, 22, 59, ).replace(second=30), "23:00") == 30.0
