"""Business-date helpers and the RRN allocator (cardswitch.switch.clock)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.switch.clock import RRN_BLOCK, RrnAllocator, field7, iso_utc, mmdd

DAY = datetime(2026, 3, 14, 10, 15, 0, tzinfo=timezone.utc)     # day 073 of 2026


class Store:
    """The durable high-water marks, as SwitchApp._reserve_rrn keeps them in the journal."""

    def __init__(self) -> None:
        self.marks: dict[str, int] = {}
        self.calls = 0

    def reserve(self, prefix: str, wanted: int) -> int:
        self.calls += 1
        current = self.marks.get(prefix, 0)
        if wanted <= current:
            return current
        self.marks[prefix] = wanted
        return wanted


def test_field7_is_mmddhhmmss():
    assert field7(datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)) == "0304050607"
    assert field7(datetime(2026, 12, 31, 23, 59, 59, tzinfo=timezone.utc)) == "1231235959"


@pytest.mark.parametrize("date, expected", [("2026-11-28", "1128"), ("2026-01-05", "0105"),
                                            ("2028-02-29", "0229")])
def test_mmdd(date, expected):
    assert mmdd(date) == expected


def test_iso_utc():
    assert iso_utc(datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=timezone.utc)) == "2026-03-04T05:06:07.000089Z"


def test_rrn_is_12_digits_ydddd_and_sequence():
    rrn = RrnAllocator(Store().reserve)
    first, second = rrn.next(DAY), rrn.next(DAY)
    assert len(first) == 12 and first.isdigit()
    assert first == "607300000000" and second == "607300000001"


def test_rrns_are_unique_across_blocks_and_reserve_once_per_block():
    store = Store()
    rrn = RrnAllocator(store.reserve)
    seen = [rrn.next(DAY) for _ in range(2 * RRN_BLOCK + 5)]
    assert len(set(seen)) == len(seen)
    assert seen == sorted(seen)
    assert store.calls == 1 + 3           # the day's first look-up, then one per block
    assert store.marks["6073"] == 3 * RRN_BLOCK


def test_restart_resumes_above_everything_given_out():
    store = Store()
    before = RrnAllocator(store.reserve)
    given_out = [before.next(DAY) for _ in range(7)]
    after = RrnAllocator(store.reserve)  # a restart: same durable store, nothing else
    new = [after.next(DAY) for _ in range(7)]
    assert not set(given_out) & set(new)
    assert min(new) > max(given_out)
    # ... and a third life still never reuses anything of the first two.
    third = RrnAllocator(store.reserve)
    assert third.next(DAY) > max(new)


def test_day_change_changes_the_prefix_and_starts_over():
    store = Store()
    rrn = RrnAllocator(store.reserve)
    a = rrn.next(DAY)
    b = rrn.next(DAY + timedelta(days=1))
    assert a[:4] == "6073" and b[:4] == "6074"
    assert b == "607400000000"
    c = rrn.next(datetime(2027, 1, 1, tzinfo=timezone.utc))
    assert c[:4] == "7001"
    assert rrn.next(datetime(2026, 12, 31, tzinfo=timezone.utc))[:4] == "6365"


def test_going_back_to_an_earlier_day_never_reuses():
    store = Store()
    rrn = RrnAllocator(store.reserve)
    first = [rrn.next(DAY) for _ in range(3)]
    rrn.next(DAY + timedelta(days=1))
    again = rrn.next(DAY)                  # e.g. the clock stepped back over midnight
    assert again not in first and again > max(first)


def test_sequence_exhausted_raises():
    store = Store()
    store.marks["6073"] = 100_000_000
    with pytest.raises(OverflowError):
        RrnAllocator(store.reserve).next(DAY)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.just("restart"), st.integers(1, 30),
                          st.tuples(st.just("day"), st.integers(0, 2))), max_size=25))
def test_never_reuses_an_rrn(script):
    store = Store()
    rrn = RrnAllocator(store.reserve)
    day = DAY
    given_out: list[str] = []
    for step in script:
        if step == "restart":
            rrn = RrnAllocator(store.reserve)
        elif isinstance(step, tuple):
            day = DAY + timedelta(days=step[1])
        else:
            given_out.extend(rrn.next(day) for _ in range(step))
    assert len(set(given_out)) == len(given_out)
    assert all(len(r) == 12 and r.isdigit() for r in given_out)
