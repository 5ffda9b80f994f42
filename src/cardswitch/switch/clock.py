"""Business date and retrieval reference numbers.

The business date is the switch's, not the calendar's: it starts as today in
the configured timezone and moves only at cutover (settlement issue). RRNs
(field 37) are ``YDDD`` (last digit of the UTC year, day of year) + an
8-digit sequence: unique per switch for a year, up to 100 million a day.
The sequence's high-water mark is reserved in blocks in the journal's state,
so a restart never reuses one.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

RRN_BLOCK = 10_000


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(dt: datetime) -> str:
    """'2026-11-28T09:30:15.123456Z' (isoformat is C code; strftime is slow per request)."""
    return dt.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def field7(dt: datetime) -> str:
    """MMDDhhmmss."""
    return f"{dt.month:02d}{dt.day:02d}{dt.hour:02d}{dt.minute:02d}{dt.second:02d}"


def local_today(tz: str) -> date:
    return datetime.now(ZoneInfo(tz)).date()


def mmdd(business_date: str) -> str:
    """'2026-11-28' -> '1128' (field 15)."""
    return business_date[5:7] + business_date[8:10]


class RrnAllocator:
    """Pure allocator; ``reserve`` is called when a block runs out."""

    __slots__ = ("_prefix", "_next", "_limit", "_reserve", "_day")

    def __init__(self, reserve) -> None:
        # reserve(prefix, wanted_limit) -> the limit actually stored (durable)
        self._reserve = reserve
        self._day = -1
        self._prefix = ""
        self._next = 0
        self._limit = 0

    def next(self, now: datetime) -> str:
        day = now.toordinal()
        if day != self._day:
            self._day = day
            prefix = f"{now.year % 10}{now.timetuple().tm_yday:03d}"
        else:
            prefix = self._prefix
        if prefix != self._prefix:
            self._prefix = prefix
            self._next = self._reserve(prefix, 0)
            self._limit = self._next
        if self._next >= self._limit:
            self._limit = self._reserve(prefix, self._next + RRN_BLOCK)
        n = self._next
        self._next += 1
        if n > 99_999_999:
            raise OverflowError("RRN sequence exhausted for today")
        return f"{prefix}{n:08d}"
