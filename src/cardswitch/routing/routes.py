"""Route selection: which issuer gets a request, and which of its hosts.

Pure functions and small state machines; the pipeline and the issuer links
call them and do the I/O. Times are ``now`` arguments in seconds from a
monotonic clock, so everything here is testable without waiting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cardswitch.iso8583.constants import RC
from cardswitch.routing.bintable import BinTable, Route

# -- issuer routes ------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RouteDecision:
    """Where a request goes: the card's issuer and, for a transfer, the
    receiving card's issuer. ``response_code`` is ``""`` when routable, else
    the code to answer with (15: no issuer for field 2; 52: transfer target
    has no issuer)."""

    issuer: Route | None
    target: Route | None = None
    response_code: str = ""

    @property
    def ok(self) -> bool:
        return not self.response_code

    @property
    def cross_issuer(self) -> bool:
        """A transfer whose receiving card is at another bank (debit leg, then credit leg)."""
        return (
            self.issuer is not None
            and self.target is not None
            and self.issuer.bank_id != self.target.bank_id
        )


def issuer_route(table: BinTable, pan: str) -> Route | None:
    """The card's issuer, or None (the pipeline answers 15)."""
    return table.lookup(pan)


def select_routes(table: BinTable, pan: str, to_pan: str | None = None) -> RouteDecision:
    """Route a request by its PAN (field 2) and, for a transfer, field 103.

    ``to_pan`` is None for anything but a transfer. A transfer target that is
    empty, not digits or matches no BIN is "no such account" (52). The card's
    own issuer is checked first: an unroutable card answers 15 whatever the
    target.
    """
    issuer = table.lookup(pan)
    if issuer is None:
        return RouteDecision(None, None, RC.NO_SUCH_ISSUER)
    if to_pan is None:
        return RouteDecision(issuer)
    target = table.lookup(to_pan) if to_pan else None
    if target is None:
        return RouteDecision(issuer, None, RC.NO_SUCH_ACCOUNT)
    return RouteDecision(issuer, target)


def is_on_us(issuer: Route | None, acquirer_id: str) -> bool:
    """The card was issued by the merchant's own acquirer (no interchange)."""
    return issuer is not None and issuer.bank_id == acquirer_id


# -- host health and failover -------------------------------------------------

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


class EndpointHealth:
    """Health of one bank host, driven by the link's outcomes.

    ``failure_threshold`` consecutive failures (request timeouts) make the host
    unhealthy, as does one conclusive failure (``mark_down``: connection or
    sign-on refused); a single success makes it healthy again. An unhealthy host is not used, except that
    once every ``probe_interval`` seconds it becomes usable for one attempt (a
    probe); the caller reports the probe with ``mark_attempt`` so concurrent
    requests do not all pile onto a dead host, and its outcome with
    ``mark_success``/``mark_failure``.
    """

    __slots__ = ("failure_threshold", "probe_interval", "failures", "state", "retry_at", "changed_at")

    def __init__(self, failure_threshold: int = 3, probe_interval: float = 5.0) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if probe_interval < 0:
            raise ValueError("probe_interval must not be negative")
        self.failure_threshold = failure_threshold
        self.probe_interval = probe_interval
        self.failures = 0             # consecutive failures
        self.state = HEALTHY
        self.retry_at = 0.0           # unhealthy: when the next probe may go
        self.changed_at = 0.0         # when the state last changed

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY

    def usable(self, now: float) -> bool:
        return self.state == HEALTHY or now >= self.retry_at

    def mark_success(self, now: float = 0.0) -> bool:
        """A request or connect succeeded. True when this made the host healthy again."""
        self.failures = 0
        if self.state == HEALTHY:
            return False
        self.state = HEALTHY
        self.changed_at = now
        return True

    def mark_failure(self, now: float) -> bool:
        """A request timed out or a connect failed. True when this made the host unhealthy."""
        self.failures += 1
        if self.state == UNHEALTHY:
            # a failed probe: wait a full interval before the next one
            self.retry_at = now + self.probe_interval
            return False
        if self.failures >= self.failure_threshold:
            self.state = UNHEALTHY
            self.changed_at = now
            self.retry_at = now + self.probe_interval
            return True
        return False

    def mark_down(self, now: float) -> bool:
        """A failure conclusive on its own (connection refused, sign-on refused or
        unanswered): unhealthy at once, next probe one interval from ``now``.
        True when this made the host unhealthy."""
        self.failures += 1
        self.retry_at = now + self.probe_interval
        if self.state == UNHEALTHY:
            return False
        self.state = UNHEALTHY
        self.changed_at = now
        return True

    def mark_attempt(self, now: float) -> None:
        """A request is going to this host. When it is an unhealthy host's probe,
        hold further probes back for one interval."""
        if self.state == UNHEALTHY and now >= self.retry_at:
            self.retry_at = now + self.probe_interval

    def __repr__(self) -> str:
        return f"EndpointHealth({self.state}, failures={self.failures}, retry_at={self.retry_at})"


H = TypeVar("H")


def pick_host(hosts: Sequence[H], health: Mapping[H, EndpointHealth], now: float) -> H | None:
    """The primary (first) host if usable, else the next usable one, else None.

    A host missing from ``health`` has never failed and counts as usable.
    """
    for host in hosts:
        h = health.get(host)
        if h is None or h.usable(now):
            return host
    return None
