"""The BIN table: which bank issued a card, from the leading digits of its PAN.

Each entry is a digit range of one length (a prefix ``622126`` is the range
``622126-622126``); it matches a PAN whose first ``len(low)`` digits lie in
``[low, high]``. The longest matching entry wins; among equally long matches the
higher priority wins. Two overlapping entries of the same length and the same
priority are ambiguous and refused when the table is built.

Layout: per distinct entry length, one sorted array of disjoint segments, each
owned by the entry that wins there (overlaps are resolved by priority once, at
build time). A lookup takes the PAN's leading digits once per length, longest
first, and does one ``bisect`` per length, so it costs a few microseconds
whatever the table size. Segment bounds are kept as integers in contiguous
``array('Q')`` (19 digits fit in 64 bits): with 100k entries a bisect over
scattered ``str`` objects is cache-bound and measured about 1.5x slower.
"""

from __future__ import annotations

import gc
import heapq
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from cardswitch.config import BinRange, Network

MAX_BIN_DIGITS = 19  # a PAN has at most 19 digits, so no longer entry can ever match


class BinTableError(ValueError):
    """A BIN entry is malformed, or two entries are ambiguous."""


@dataclass(slots=True, frozen=True)
class Route:
    """The issuer of a card: the winning BIN entry and the bank that owns it."""

    bank_id: str
    card_type: str
    low: str
    high: str
    priority: int = 0

    @property
    def length(self) -> int:
        return len(self.low)

    @property
    def text(self) -> str:
        """The entry as written in the network file: ``622126`` or ``62212600-62212699``."""
        return self.low if self.low == self.high else f"{self.low}-{self.high}"


# One entry while building: (low, seq, high, priority, route, line). Sorting
# these tuples orders by low, then input order; seq is unique, so the
# comparison never reaches the route.
_Item = tuple[str, int, str, int, Route, int]


def _describe(item: _Item) -> str:
    route, line = item[4], item[5]
    where = f", line {line}" if line else ""
    return f"{route.text} ({route.bank_id}{where}, priority {route.priority})"


@dataclass(slots=True)
class _Level:
    """Disjoint segments of one entry length, sorted by ``lows`` (inclusive bounds)."""

    length: int
    lows: array
    highs: array
    routes: list[Route]


class BinTable:
    """Immutable once built; safe to share between tasks and threads."""

    __slots__ = ("_levels", "_size", "_segments")

    def __init__(self, levels: list[_Level], size: int) -> None:
        # Longest first: the first level that matches is the answer.
        self._levels = tuple(sorted(levels, key=lambda lv: -lv.length))
        self._size = size
        self._segments = sum(len(lv.lows) for lv in levels)

    # -- building -----------------------------------------------------------

    @classmethod
    def from_network(cls, network: Network) -> BinTable:
        return cls.from_entries((bank.id, r) for bank in network.banks for r in bank.bins)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, BinRange]]) -> BinTable:
        """Build from ``(bank_id, BinRange)`` pairs; raises ``BinTableError``."""
        # A build allocates a few acyclic objects per entry; with 100k entries
        # the cyclic collector's passes over them cost about a third of the
        # build, for nothing to collect. Pause it for the build only.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return cls._build(entries)
        finally:
            if gc_was_enabled:
                gc.enable()

    @classmethod
    def _build(cls, entries: Iterable[tuple[str, BinRange]]) -> BinTable:
        by_length: dict[int, list[_Item]] = {}
        seq = 0
        for seq, (bank_id, rng) in enumerate(entries, 1):
            low, high = rng.low, rng.high
            n = len(low)
            if not (0 < n == len(high) <= MAX_BIN_DIGITS and low <= high
                    and low.isascii() and low.isdigit() and high.isascii() and high.isdigit()):
                _refuse_malformed(bank_id, rng)
            route = Route(bank_id, rng.card_type, low, high, rng.priority)
            item = (low, seq, high, rng.priority, route, rng.line)
            level = by_length.get(n)
            if level is None:
                by_length[n] = [item]
            else:
                level.append(item)
        return cls([_build_level(n, items) for n, items in by_length.items()], seq)

    # -- lookup ---------------------------------------------------------------

    def lookup(self, pan: str) -> Route | None:
        """The issuer route for ``pan``, or ``None`` when no entry matches."""
        if not (pan.isascii() and pan.isdigit()):
            return None
        n = len(pan)
        for level in self._levels:
            if level.length > n:
                continue
            key = int(pan[: level.length])
            i = bisect_right(level.lows, key) - 1
            if i >= 0 and key <= level.highs[i]:
                return level.routes[i]
        return None

    def __len__(self) -> int:
        """Number of entries the table was built from."""
        return self._size

    @property
    def segments(self) -> int:
        """Number of disjoint segments after resolving overlaps (for the bench)."""
        return self._segments

    def __repr__(self) -> str:
        lengths = ",".join(str(lv.length) for lv in self._levels)
        return f"BinTable({self._size} entries, {self._segments} segments, lengths {lengths})"


def _refuse_malformed(bank_id: str, rng: BinRange) -> None:
    where = f" (bank {bank_id}" + (f", line {rng.line})" if rng.line else ")")
    low, high = rng.low, rng.high
    text = f"BIN range {low}-{high}{where}"
    if not low:
        raise BinTableError(f"{text}: empty")
    if not (low.isascii() and low.isdigit() and high.isascii() and high.isdigit()):
        raise BinTableError(f"{text}: digits only")
    if len(low) != len(high):
        raise BinTableError(f"{text}: low and high must have the same length")
    if len(low) > MAX_BIN_DIGITS:
        raise BinTableError(f"{text}: longer than {MAX_BIN_DIGITS} digits")
    raise BinTableError(f"{text}: low is above high")


def _build_level(length: int, items: list[_Item]) -> _Level:
    """Sorted disjoint segments for the entries of one length.

    Entries fall into clusters of overlapping ones (sorted by low, a cluster
    ends where no entry so far reaches the next low). A lone entry is its own
    segment, as written; only real overlaps pay for the priority sweep.
    """
    items.sort()
    lows: list[str] = []
    highs: list[str] = []
    routes: list[Route] = []
    cluster: list[_Item] = []
    reach = ""
    for item in items:
        if cluster and item[0] > reach:
            _flush(length, cluster, lows, highs, routes)
            cluster = []
        if not cluster or item[2] > reach:
            reach = item[2]
        cluster.append(item)
    if cluster:
        _flush(length, cluster, lows, highs, routes)
    return _Level(length, array("Q", map(int, lows)), array("Q", map(int, highs)), routes)


def _flush(length: int, cluster: list[_Item], lows: list[str], highs: list[str], routes: list[Route]) -> None:
    if len(cluster) == 1:
        low, _, high, _, route, _ = cluster[0]
        lows.append(low)
        highs.append(high)
        routes.append(route)
        return
    _refuse_ambiguous(cluster)
    if len(cluster) == 2:
        _pair(length, cluster[0], cluster[1], lows, highs, routes)
    else:
        _sweep(length, cluster, lows, highs, routes)


def _pair(length: int, a: _Item, b: _Item, lows: list[str], highs: list[str], routes: list[Route]) -> None:
    """Two overlapping entries of different priority, ``a.low <= b.low`` (the
    common case of one range nested in another): the same answer as the sweep
    without its heap."""
    a_low, _, a_high, a_prio, a_route, _ = a
    b_low, _, b_high, b_prio, b_route, _ = b
    if a_prio > b_prio:
        lows.append(a_low)
        highs.append(a_high)
        routes.append(a_route)
        if b_high > a_high:
            lows.append(str(int(a_high) + 1).zfill(length))
            highs.append(b_high)
            routes.append(b_route)
        return
    if a_low < b_low:
        lows.append(a_low)
        highs.append(str(int(b_low) - 1).zfill(length))
        routes.append(a_route)
    lows.append(b_low)
    highs.append(b_high)
    routes.append(b_route)
    if a_high > b_high:
        lows.append(str(int(b_high) + 1).zfill(length))
        highs.append(a_high)
        routes.append(a_route)


def _refuse_ambiguous(cluster: list[_Item]) -> None:
    """Refuse any overlapping pair with equal priority (``cluster`` is sorted by low)."""
    reach: dict[int, _Item] = {}  # per priority, the entry reaching furthest right so far
    for item in cluster:
        prev = reach.get(item[3])
        if prev is not None and item[0] <= prev[2]:
            first, second = sorted((prev, item), key=lambda x: x[1])
            raise BinTableError(
                "BIN ranges overlap with the same length and priority: "
                f"{_describe(first)} and {_describe(second)}"
            )
        if prev is None or item[2] > prev[2]:
            reach[item[3]] = item


def _sweep(length: int, cluster: list[_Item], lows: list[str], highs: list[str], routes: list[Route]) -> None:
    """Each stretch between boundaries goes to the highest-priority entry
    covering it; adjacent stretches of one entry merge back into one segment."""
    points = sorted({int(it[0]) for it in cluster} | {int(it[2]) + 1 for it in cluster})
    active: list[tuple[int, int, int, Route]] = []  # heap of (-priority, seq, end exclusive, route)
    k = 0
    last_high = -2
    for j in range(len(points) - 1):
        x = points[j]
        while k < len(cluster) and int(cluster[k][0]) == x:
            low, seq, high, prio, route, _ = cluster[k]
            heapq.heappush(active, (-prio, seq, int(high) + 1, route))
            k += 1
        while active and active[0][2] <= x:
            heapq.heappop(active)
        if not active:
            continue  # cannot happen inside a cluster, kept for safety
        route = active[0][3]
        seg_high = points[j + 1] - 1
        if routes and routes[-1] is route and last_high + 1 == x:
            highs[-1] = str(seg_high).zfill(length)
        else:
            lows.append(str(x).zfill(length))
            highs.append(str(seg_high).zfill(length))
            routes.append(route)
        last_high = seg_high
