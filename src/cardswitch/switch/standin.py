"""Stand-in: approving on an issuer's behalf while it cannot be reached (wire.md 8).

When a bank's link is down, or the bank does not answer in time, the switch
may decide itself, within the bank's ``stand_in`` profile of the network
file (``config.StandIn``), and tells the bank afterwards with a 0220 advice
through the store-and-forward queue. The rules, in order (``decide``; the
first that applies answers):

1. No profile (``max_amount = 0``): no stand-in, ``91``.
2. Only a 0200 whose transaction type (field 3 positions 1-2) is in
   ``allowed`` (default ``"00"``, purchases) and that names no original
   (completions and voids need the issuer's view of the original): other
   requests get ``91``. Transfers, balance inquiries, pre-authorizations
   (no 0120 advice is defined) never stand in.
3. A PIN (field 52) cannot be verified without the issuer: ``91``. (Cash
   withdrawals carry a PIN, which is why ``"01"`` is not in the default.)
4. The card as the switch knows it (``CardFile``, built at start from the
   network file's cards of each bank; a bank that lists cards is taken to
   list all of them): a card the bank does not list ``14``; lost ``41``,
   stolen ``43``, any other status but active ``05``; past its expiry, or
   the request's expiry (field 14 or track 2) past or not the card's,
   ``54``. Those are the issuer's own answers, so the terminal gets the
   answer it would have got.
5. Amount above ``max_amount``: ``91``.
6. Per card and business date, at most ``daily_count`` stand-in approvals
   and ``daily_amount`` in total (0 = no limit); beyond: ``91``.

Otherwise the switch approves (``00``) with its own authorization code
(``S`` + 5 digits). The per-card counters (``LocalCounters``) live in
memory, rebuilt from the journal at start; approvals count when made, and a
later reversal does not give them back (the conservative choice). With
``[switch] redis`` set, every switch process shares them in Redis
(``RedisCounters``: checked and counted in one Lua step on the server).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cardswitch.config import Network, StandIn
from cardswitch.iso8583.constants import MTI, RC, TxnType
from cardswitch.pan import pan_token

log = logging.getLogger("cardswitch.standin")

# Transaction types that may ever stand in (a profile's ``allowed`` picks among them).
STANDABLE = frozenset({TxnType.PURCHASE.value, TxnType.WITHDRAWAL.value, TxnType.REFUND.value,
                       TxnType.DEPOSIT.value, TxnType.BILL_PAYMENT.value})

_STATUS_RC = {"lost": RC.LOST_CARD, "stolen": RC.STOLEN_CARD}


def allowed_types(profile: StandIn) -> frozenset[str]:
    """``allowed`` as a set; entries that are not standable types are ignored
    (``profile_problems`` names them)."""
    return frozenset(t.strip() for t in profile.allowed.split(",") if t.strip() in STANDABLE)


def profile_problems(bank_id: str, profile: StandIn) -> list[str]:
    """What is wrong with a profile, one line each (logged at start)."""
    out = []
    for t in (x.strip() for x in profile.allowed.split(",")):
        if t and t not in STANDABLE:
            out.append(f"bank {bank_id}: stand_in.allowed: {t!r} cannot stand in "
                       f"(standable: {', '.join(sorted(STANDABLE))}); ignored")
    return out


@dataclass(slots=True, frozen=True)
class CardFacts:
    status: str                   # active | lost | stolen | blocked
    expiry: str                   # YYMM


class CardFile:
    """What the switch knows of cards without their issuer: status and expiry,
    by PAN token. Built from the network file's cards (simulated banks list
    theirs); a bank that lists none is judged on the request alone."""

    def __init__(self, cards: dict[str, CardFacts] | None = None,
                 banks_listing: Iterable[str] = ()) -> None:
        self._cards = dict(cards or {})
        self._banks = frozenset(banks_listing)

    @classmethod
    def from_network(cls, network: Network, secret: bytes) -> CardFile:
        cards = {pan_token(c.pan, secret): CardFacts(c.status, c.expiry)
                 for b in network.banks for c in b.cards}
        return cls(cards, [b.id for b in network.banks if b.cards])

    def lookup(self, token: str) -> CardFacts | None:
        return self._cards.get(token)

    def lists_cards_of(self, bank_id: str) -> bool:
        return bank_id in self._banks


@dataclass(slots=True, frozen=True)
class Request:
    """The facts of a request stand-in decides on."""

    bank_id: str
    mti: str
    txn_type: str                 # field 3 positions 1-2
    amount: int
    has_pin: bool
    has_original: bool            # field 90 (completion, void)
    pan_token: str
    expiry: str                   # YYMM from field 14 or track 2, "" when not sent


@dataclass(slots=True, frozen=True)
class Decision:
    rc: str
    reason: str

    @property
    def approve(self) -> bool:
        return self.rc == RC.APPROVED


def yymm(now: datetime) -> str:
    return f"{now.year % 100:02d}{now.month:02d}"


def check(profile: StandIn, req: Request, cards: CardFile, now: datetime) -> Decision:
    """Rules 1-5 (everything but the daily limits)."""
    if profile.max_amount <= 0:
        return Decision(RC.ISSUER_INOPERATIVE, "no stand-in for this bank")
    if req.mti[:3] != MTI.FIN_REQUEST[:3] or req.has_original or req.txn_type not in allowed_types(profile):
        return Decision(RC.ISSUER_INOPERATIVE, "transaction type not allowed in stand-in")
    if req.has_pin:
        return Decision(RC.ISSUER_INOPERATIVE, "a PIN cannot be verified in stand-in")
    card = cards.lookup(req.pan_token)
    if card is None and cards.lists_cards_of(req.bank_id):
        return Decision(RC.INVALID_CARD, "card unknown to its issuer")
    if card is not None and card.status != "active":
        return Decision(_STATUS_RC.get(card.status, RC.DO_NOT_HONOUR), f"card {card.status}")
    today = yymm(now)
    if (card is not None and card.expiry < today) or (req.expiry and req.expiry < today) \
            or (card is not None and req.expiry and req.expiry != card.expiry):
        return Decision(RC.EXPIRED_CARD, "card expired")
    if req.amount > profile.max_amount:
        return Decision(RC.ISSUER_INOPERATIVE, "amount above the stand-in limit")
    return Decision(RC.APPROVED, "stand-in")


def auth_code(record_id: int) -> str:
    """Field 38 of a stand-in approval: ``S`` + 5 digits (an6), never an issuer's."""
    return f"S{record_id % 100_000:05d}"


# -- daily limits per card ---------------------------------------------------------------


class StandInCounters(Protocol):
    async def try_add(self, token: str, business_date: str, amount: int,
                      max_count: int, max_amount: int) -> bool: ...


class LocalCounters:
    """Stand-in approvals per card per business date, in this process's memory."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, str], tuple[int, int]] = {}

    def load(self, business_date: str, rows: Iterable[tuple[str, int, int]]) -> None:
        """``rows``: (pan_token, count, amount) from the journal."""
        for token, n, amount in rows:
            self._used[(token, business_date)] = (int(n), int(amount))

    def used(self, token: str, business_date: str) -> tuple[int, int]:
        return self._used.get((token, business_date), (0, 0))

    def fits(self, token: str, business_date: str, amount: int, max_count: int, max_amount: int) -> bool:
        n, total = self.used(token, business_date)
        if max_count and n + 1 > max_count:
            return False
        if max_amount and total + amount > max_amount:
            return False
        return True

    def add(self, token: str, business_date: str, amount: int) -> None:
        n, total = self.used(token, business_date)
        self._used[(token, business_date)] = (n + 1, total + amount)

    async def try_add(self, token: str, business_date: str, amount: int,
                      max_count: int, max_amount: int) -> bool:
        """Count one more approval if it stays within the limits (checked and
        counted in one step: nothing awaits in between)."""
        if not self.fits(token, business_date, amount, max_count, max_amount):
            return False
        self.add(token, business_date, amount)
        return True

    def forget_before(self, business_date: str) -> None:
        for key in [k for k in self._used if k[1] < business_date]:
            del self._used[key]


# Check both limits and count in one atomic step on the Redis server.
_TRY_ADD = """
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local total = tonumber(redis.call('HGET', KEYS[1], 'amount') or '0')
local amount, max_n, max_amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if max_n > 0 and n + 1 > max_n then return 0 end
if max_amount > 0 and total + amount > max_amount then return 0 end
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HINCRBY', KEYS[1], 'amount', amount)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


class RedisCounters:
    """Stand-in approvals per card per business date, shared by every switch
    process through Redis (``[switch] redis``), keyed by the PAN token.

    A Redis that cannot be reached approves nothing in stand-in (the
    terminal gets 91): stand-in limits are money limits, so we fail closed.
    """

    def __init__(self, url: str, *, prefix: str = "cardswitch:standin:", ttl_s: int = 3 * 86400,
                 timeout_s: float = 0.25, client=None) -> None:
        import redis.asyncio as aioredis

        self.client = client or aioredis.from_url(url, socket_timeout=timeout_s,
                                                  socket_connect_timeout=timeout_s)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.errors = 0
        self._script = self.client.register_script(_TRY_ADD)

    async def try_add(self, token: str, business_date: str, amount: int,
                      max_count: int, max_amount: int) -> bool:
        try:
            ok = await self._script(keys=[f"{self.prefix}{business_date}:{token}"],
                                    args=[amount, max_count, max_amount, self.ttl_s])
        except Exception as e:  # redis errors, timeouts, connection refused
            self.errors += 1
            if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                log.warning("stand-in counters in Redis unavailable (%s): no stand-in approvals",
                            type(e).__name__)
            return False
        return bool(ok)

    async def close(self) -> None:
        await self.client.aclose()


class StandInService:
    """The rules with the switch's card file and counters."""

    def __init__(self, network: Network, secret: bytes,
                 counters: StandInCounters | None = None) -> None:
        self.profiles = {b.id: b.stand_in for b in network.banks}
        self.cards = CardFile.from_network(network, secret)
        self.counters = counters if counters is not None else LocalCounters()
        self.approved = 0
        self.declined = 0

    def enabled(self, bank_id: str) -> bool:
        p = self.profiles.get(bank_id)
        return p is not None and p.max_amount > 0

    async def decide(self, req: Request, business_date: str, now: datetime) -> Decision:
        profile = self.profiles.get(req.bank_id) or StandIn()
        d = check(profile, req, self.cards, now)
        if d.approve and not await self.counters.try_add(req.pan_token, business_date, req.amount,
                                                         profile.daily_count, profile.daily_amount):
            d = Decision(RC.ISSUER_INOPERATIVE, "daily stand-in limit of the card reached")
        if d.approve:
            self.approved += 1
        else:
            self.declined += 1
        return d
