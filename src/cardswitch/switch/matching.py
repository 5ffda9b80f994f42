"""Matching responses to requests on one bank link (sans-I/O).

The switch stamps every request it sends to an issuer with the link's own
STAN (field 11). ``InFlight`` allocates those STANs and keeps the table of
requests waiting for an answer; the asyncio shell (``banklink``) stores a
future and a timer as the opaque ``item`` of each entry.

A response is matched by response MTI class + 11 + 37 (wire.md 8). The table
is keyed by STAN alone: STANs are unique among requests in flight, so one dict
lookup finds the only candidate, which must then also agree on class and RRN.
The class is the first three digits of the response MTI the request expects
(``response_mti``): a 0200 or 0201 expects 021x, a 0420 expects 043x, so the
answer to a reversal never matches its original.
"""

from __future__ import annotations

from typing import Any

from cardswitch.iso8583.constants import response_mti

STAN_MIN = 1
STAN_MAX = 999_999
_STANS = STAN_MAX - STAN_MIN + 1


class InFlightFull(RuntimeError):
    """Every STAN is in flight (or the configured limit is reached)."""


def format_stan(n: int) -> str:
    return "%06d" % n


def expected_class(request_mti: str) -> str:
    """The response MTI class a request expects: '0200' -> '021', '0420' -> '043'."""
    return response_mti(request_mti)[:3]


class InFlight:
    """STAN allocation and the pending table of one link.

    ``next_stan()`` returns the next STAN after the previous one (000001 to
    999999, wrapping), skipping STANs still in flight. ``add`` registers a
    request under that STAN; ``match`` pops the entry a response answers;
    ``pop`` removes an entry (timeout). Items are opaque to this class.
    """

    __slots__ = ("_next", "_pending", "limit")

    def __init__(self, first: int = STAN_MIN, limit: int = 0) -> None:
        if not STAN_MIN <= first <= STAN_MAX:
            raise ValueError(f"first STAN {first} outside {STAN_MIN}..{STAN_MAX}")
        self._next = first
        # stan -> (expected response class, rrn, item)
        self._pending: dict[str, tuple[str, str, Any]] = {}
        self.limit = limit            # 0 = only bounded by the STAN space

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, stan: str) -> bool:
        return stan in self._pending

    def next_stan(self) -> str:
        """Allocate the next STAN not in flight (the counter moves past it)."""
        pending = self._pending
        n = len(pending)
        if n >= _STANS or (self.limit and n >= self.limit):
            raise InFlightFull(f"{n} requests in flight")
        nxt = self._next
        while True:
            stan = "%06d" % nxt
            nxt = nxt + 1 if nxt < STAN_MAX else STAN_MIN
            if stan not in pending:
                self._next = nxt
                return stan

    def add(self, stan: str, request_mti: str, rrn: str, item: Any) -> None:
        """Register a request sent with ``stan``; ``rrn`` is its field 37 ('' when absent)."""
        if stan in self._pending:
            raise KeyError(f"STAN {stan} already in flight")
        self._pending[stan] = (response_mti(request_mti)[:3], rrn, item)

    def match(self, response: dict[str, str]) -> Any | None:
        """Pop and return the item a response answers, or None when it answers nothing pending."""
        stan = response.get("11")
        if stan is None:
            return None
        entry = self._pending.get(stan)
        if entry is None:
            return None
        mti = response.get("t", "")
        if mti[:3] != entry[0] or response.get("37", "") != entry[1]:
            return None
        del self._pending[stan]
        return entry[2]

    def pop(self, stan: str, item: Any = None) -> Any | None:
        """Remove the entry under ``stan`` (only if it holds ``item``, when given)."""
        entry = self._pending.get(stan)
        if entry is None or (item is not None and entry[2] is not item):
            return None
        del self._pending[stan]
        return entry[2]

    def clear(self) -> list[Any]:
        """Remove every entry; returns their items."""
        items = [e[2] for e in self._pending.values()]
        self._pending.clear()
        return items

    def stans(self) -> list[str]:
        return list(self._pending)
