"""The simulated issuing bank's decisions and ledger, without I/O.

``IssuerLogic.handle(msg, now)`` takes one decoded request from the switch
and returns an ``Outcome``: the response message and what changed (the new
request record, records it updated, accounts it touched). The caller
persists the changes before it sends the response; nothing here touches a
socket, a file or the clock.

Each processed request is a ``Txn`` holding its *effects* (debit, credit,
hold, ...), so that a reversal undoes exactly what its original did, once.
Accounts and records are keyed by the PAN's keyed token: the full PAN lives
only in the request being handled.

Choices where the contract is silent:

- Completion or void naming no usable original (unknown, declined, reversed,
  already completed or voided, another card): 12.
- A card outside the bank's BIN ranges is answered like an unknown card: 14
  (52 for a transfer credit leg, 28).
- PIN tries: each wrong PIN (or a block the HSM finds invalid, errors 20 and
  24) answers 55 and counts; once 3 in a row are counted, every PIN
  transaction gets 75 without verifying, until the day changes. A withdrawal
  without field 52 is 55 and not a try.
- "Day" (PIN tries, daily withdrawal total) is the switch's business date of
  field 15 (year inferred, closest to now), else the UTC date.
- On-us transfer whose target card (103, inside our BINs) is unknown or not
  active: 52, nothing moves.
- 0220/0221 stand-in advices: posted as the switch approved them (no status,
  PIN, funds or limit checks; may overdraw), answered 0230 with 00; what
  cannot be posted (unknown card or original) moves nothing but is still
  acknowledged.
- A reversal of a voided purchase moves nothing (its void gave the money
  back); reversing the void takes the money again and the purchase stands.
  A reversal of a completed pre-authorization moves nothing either.
- A reversal that arrives before its original is kept; when the original
  comes, it is answered as usual and its effects are undone at once.
- ``delay_ms`` delays the card's 0100/0200 answers (and their repeats), not
  advice acknowledgements, so a reversal after a switch timeout gets through.

Security checks (the bank never holds a clear PIN or a clear key): the pure
step :meth:`IssuerLogic.security_checks` says what a 0100/0200 needs
verified, an injected :class:`~cardswitch.issuer_sim.checks.Verifier` (the
HSM) verifies it, and :meth:`IssuerLogic.handle` decides with the results;
:meth:`IssuerLogic.process` is that sequence as one coroutine. The checks,
after the card's status and expiry, in order:

- Track 2 (field 35) when the bank has a CVK: the CVV of the track (see
  cards.py for where it sits) is verified (CY). Wrong, or a track with no
  CVV: 05, as Visa declines a bad CVV on track data.
- Chip (field 55 with tag 9F26) when the bank has an MK-AC: the ARQC is
  verified (KQ). Wrong: 05. Either way the answer carries field 55 with tag
  91: the ARPC for ARC = the two characters of field 39, plus that ARC (KQ
  mode 1 gives it for 00; another answer code costs a KQ mode 2 after the
  decision, and goes without field 55 if that fails).
- PIN (field 52): verified with the PVV (EC) or IBM offset (EA) kept for
  the card. Wrong: 55 as above.
- A check that cannot be made (the HSM is down, slow or failing; a PIN
  block for a bank without a ZPK and PVK, or for a card without a PVV or
  offset): 96, "system malfunction": the issuer is up but cannot verify, and
  96 tells the switch not to count the attempt against the card. Banks
  without a CVK or MK-AC do not verify CVVs or ARQCs.
- Malformed field 55 (not BER-TLV; an ARQC without a 2-byte ATC 9F36 or a
  4-byte unpredictable number 9F37; tag 5A not the request's PAN): 30.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from functools import lru_cache
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

import orjson

from cardswitch.config import BinRange, Card
from cardswitch.iso8583.constants import (
    CONDITION_COMPLETION,
    RC,
    F,
    NetMgmt,
    TxnType,
    is_response,
    mti_class,
    response_mti,
)
from cardswitch.iso8583.dialect import Message
from cardswitch.iso8583.fields import AdditionalAmount, format_field54
from cardswitch.issuer_sim.cards import (
    PinRef,
    arc_for,
    arqc_check_from,
    issuer_auth_data,
    parse_track2,
)
from cardswitch.issuer_sim.checks import (
    CAN_CVV,
    CAN_PIN,
    CAN_ARQC,
    ArqcCheck,
    Checks,
    CvvCheck,
    PinCheck,
    Results,
    Verdict,
    Verifier,
    verify_all,
)
from cardswitch.pan import mask_pan, pan_from_track2, pan_token
from cardswitch.switch.records import Kind

log = logging.getLogger("cardswitch.issuer_sim")

MAX_PIN_TRIES = 3

# Kinds of the issuer's own ledger; the transfer legs are named as in the
# clearing files (settlement.md 4).
TRANSFER_OUT = "transfer_out"
TRANSFER_IN = "transfer_in"
ADVICE_ONLY = "advice"          # an advice whose type moves nothing here

# What the issuer's export counts (settlement.md 5).
EXPORT_KINDS = (Kind.PURCHASE, Kind.COMPLETION, Kind.WITHDRAWAL, Kind.BILL_PAYMENT,
                Kind.REFUND, Kind.DEPOSIT, TRANSFER_OUT, TRANSFER_IN)

# MTI classes handled (repeats fold onto their class).
CLS_AUTH = "010"
CLS_FIN = "020"
CLS_ADVICE = "022"
CLS_REVERSAL = "042"
CLS_NETWORK = "080"

# Echoed from the request into the response when present.
ECHOED = (F.PAN, F.PROC, F.AMOUNT, F.TRANSMISSION_DT, F.STAN, F.LOCAL_TIME, F.LOCAL_DATE,
          F.SETTLEMENT_DATE, F.ACQUIRER_ID, F.FORWARDER_ID, F.RRN, F.TERMINAL_ID,
          F.MERCHANT_ID, F.CURRENCY, F.ORIGINAL_DATA, F.RECEIVING_ID)
NETWORK_ECHOED = (F.TRANSMISSION_DT, F.STAN, F.NETWORK_MGMT_CODE, F.FORWARDER_ID)

_DEBIT_KINDS = frozenset({Kind.PURCHASE, Kind.BILL_PAYMENT, Kind.WITHDRAWAL})
_CREDIT_KINDS = frozenset({Kind.REFUND, Kind.DEPOSIT, TRANSFER_IN})

_KIND_BY_TYPE = {
    TxnType.WITHDRAWAL.value: Kind.WITHDRAWAL,
    TxnType.VOID.value: Kind.VOID,
    TxnType.REFUND.value: Kind.REFUND,
    TxnType.DEPOSIT.value: Kind.DEPOSIT,
    TxnType.TRANSFER_CREDIT.value: TRANSFER_IN,
    TxnType.BALANCE.value: Kind.BALANCE,
    TxnType.BALANCE_ALT.value: Kind.BALANCE,
    TxnType.TRANSFER.value: TRANSFER_OUT,
    TxnType.BILL_PAYMENT.value: Kind.BILL_PAYMENT,
}


class Op:
    """Effect operations recorded on a request, undone by its reversal."""

    DEBIT = "debit"          # (op, token, amount, "")
    CREDIT = "credit"        # (op, token, amount, "")
    HOLD = "hold"            # (op, token, amount, "")          the record itself is the hold
    RELEASE = "release"      # (op, token, amount, hold txn id) completion; not undone
    WITHDRAWN = "withdrawn"  # (op, token, amount, day)         daily withdrawal total
    VOID = "void"            # (op, "", 0, voided txn id)


Effect = tuple[str, str, int, str | int]


class Hold:
    NONE = ""
    ACTIVE = "active"
    COMPLETED = "completed"
    RELEASED = "released"


@dataclass(slots=True)
class Account:
    """One card's account. The bank keeps the card's PVV or IBM offset, never its PIN."""

    token: str
    pan_masked: str
    expiry: str                     # YYMM
    currency: str
    status: str
    daily_withdrawal_limit: int     # 0 = no limit
    delay_ms: int
    balance: int                    # ledger balance, minor units
    held: int = 0                   # sum of active holds
    pin_fails: int = 0              # consecutive wrong PINs on pin_day
    pin_day: str = ""               # YYYY-MM-DD
    withdrawn: int = 0              # approved withdrawals on withdrawn_day
    withdrawn_day: str = ""
    pin_method: str = "pvv"         # "pvv" | "ibm"
    pvv: str = ""                   # Visa PVV (PVKI 1), method pvv
    pin_offset: str = ""            # IBM 3624 offset, method ibm

    @property
    def available(self) -> int:
        return self.balance - self.held

    @property
    def pin_ref(self) -> PinRef:
        return PinRef(self.pin_method, self.pvv, self.pin_offset)

    @classmethod
    def from_card(cls, card: Card, secret: bytes, ref: PinRef | None = None) -> Account:
        """A new account for a card of the network file (its opening balance);
        ``ref`` is its PIN verification data (``cards.pin_ref_for``)."""
        a = cls(token=pan_token(card.pan, secret), pan_masked=mask_pan(card.pan),
                expiry=card.expiry, currency=card.currency, status=card.status,
                daily_withdrawal_limit=card.daily_withdrawal_limit, delay_ms=card.delay_ms,
                balance=card.balance)
        a.set_pin_ref(ref or PinRef(card.pin_method))
        return a

    def follow(self, card: Card, ref: PinRef | None = None) -> None:
        """Take the card's static data from the network file; keep the balances
        (and the PIN verification data when the file gives none)."""
        self.expiry, self.currency, self.status = card.expiry, card.currency, card.status
        self.daily_withdrawal_limit, self.delay_ms = card.daily_withdrawal_limit, card.delay_ms
        if ref is not None and ref.usable:
            self.set_pin_ref(ref)

    def set_pin_ref(self, ref: PinRef) -> None:
        self.pin_method, self.pvv, self.pin_offset = ref.method, ref.pvv, ref.pin_offset


@dataclass(slots=True)
class Txn:
    """A processed request: what came, what was answered, what it did."""

    id: int
    key: str                        # idempotency key: MTI class | RRN | STAN
    ref: str                        # how later messages name it: MTI class | STAN | field 7
    mti: str
    proc: str
    kind: str
    token: str
    pan_masked: str
    amount: int
    currency: str
    rc: str
    auth_code: str
    rrn: str
    stan: str
    transmitted: str                # field 7
    business_date: str              # YYYY-MM-DD
    received_at: str                # UTC ISO-8601
    orig_ref: str = ""              # field 90 as a ref (void, completion, reversal)
    orig_id: int | None = None
    to_token: str = ""
    to_pan_masked: str = ""
    effects: tuple[Effect, ...] = ()
    reversed: bool = False
    voided: bool = False
    hold: str = Hold.NONE
    response: bytes = b""           # JSON of the response without field 2
    had_pan: bool = False           # the response echoed field 2

    @property
    def approved(self) -> bool:
        return self.rc == RC.APPROVED


@dataclass(slots=True)
class Outcome:
    response: Message | None        # None: nothing to answer (drop)
    new: Txn | None = None          # record to insert
    txns: list[Txn] = field(default_factory=list)          # existing records changed
    accounts: list[Account] = field(default_factory=list)  # accounts changed
    delay_ms: int = 0
    replay: bool = False
    # A verified ARQC whose answer is not 00: the ARPC for that answer code is
    # still to get (KQ mode 2) and to attach as field 55 (IssuerLogic.process).
    arpc_for: ArqcCheck | None = None


class _Changes:
    __slots__ = ("accounts", "txns")

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.txns: dict[int, Txn] = {}

    def account(self, acct: Account) -> Account:
        self.accounts[acct.token] = acct
        return acct

    def txn(self, txn: Txn) -> Txn:
        self.txns[txn.id] = txn
        return txn


# A lookup into storage for records no longer cached: (what, value) with
# what in "key", "ref", "id"; returns the record or None.
Lookup = Callable[[str, str | int], Txn | None]


def ref_of(mti: str, stan: str, transmitted: str) -> str:
    return f"{mti_class(mti)}|{stan}|{transmitted}"


def ref_from_field90(f90: str) -> str | None:
    """Original MTI (4) + STAN (6) + field 7 (10) as a ref; None when malformed."""
    if len(f90) < 20 or not f90[:20].isdigit():
        return None
    return ref_of(f90[:4], f90[4:10], f90[10:20])


@lru_cache(maxsize=64)
def business_date(mmdd: str, today: date) -> date | None:
    """Field 15 (MMDD) as a date: the year that puts it closest to ``today``."""
    if len(mmdd) != 4 or not mmdd.isdigit():
        return None
    month, day = int(mmdd[:2]), int(mmdd[2:])
    candidates = []
    for year in (today.year - 1, today.year, today.year + 1):
        try:
            candidates.append(date(year, month, day))
        except ValueError:
            pass
    if not candidates:
        return None
    return min(candidates, key=lambda d: abs((d - today).days))


def in_bins(pan: str, bins: Sequence[BinRange]) -> bool:
    """PAN inside one of the ranges (prefix semantics on len(low) leading digits)."""
    for b in bins:
        head = pan[:len(b.low)]
        if len(head) == len(b.low) and b.low <= head <= b.high:
            return True
    return False


def format_balances(account_type: str, currency: str, ledger: int, available: int) -> str:
    """Field 54: the ledger (01) and available (02) balance entries."""
    return format_field54((AdditionalAmount(account_type, "01", currency, ledger),
                           AdditionalAmount(account_type, "02", currency, available)))


def _valid_mmdd(mmdd: str) -> bool:
    try:
        date(2000, int(mmdd[:2]), int(mmdd[2:]))  # a leap year: 0229 is a date
    except ValueError:
        return False
    return True


def _digits(v: str | None, n: int) -> bool:
    return v is not None and len(v) == n and v.isascii() and v.isdigit()


def classify(cls: str, proc: str, msg: Message) -> str | None:
    """The ledger kind of a request, or None when the type is not supported."""
    tt = proc[:2]
    if cls == CLS_AUTH:
        return Kind.PREAUTH if tt == TxnType.PURCHASE.value else None
    if tt == TxnType.PURCHASE.value:
        if msg.get(F.CONDITION_CODE) == CONDITION_COMPLETION and F.ORIGINAL_DATA in msg:
            return Kind.COMPLETION
        return Kind.PURCHASE
    return _KIND_BY_TYPE.get(tt)


def _pan_of(msg: Message) -> tuple[str, str]:
    """(PAN, expiry from track 2 or "") from field 2, else field 35."""
    pan = msg.get(F.PAN)
    if pan:
        return pan, ""
    t2 = msg.get(F.TRACK2)
    if t2:
        got = pan_from_track2(t2)
        if got:
            return got
    return "", ""


def format_problem(msg: Message) -> str | None:
    """What breaks the field formats of a request, or None."""
    mti = msg.get(F.MTI, "")
    if not _digits(msg.get(F.STAN), 6):
        return "field 11 missing or not 6 digits"
    for k, n in ((F.TRANSMISSION_DT, 10), (F.EXPIRY, 4), (F.SETTLEMENT_DATE, 4)):
        if k in msg and not _digits(msg[k], n):
            return f"field {k} not {n} digits"
    if F.AMOUNT in msg and not _digits(msg[F.AMOUNT], 12):
        return "field 4 not 12 digits"
    cls = mti_class(mti)
    if cls == CLS_NETWORK:
        if not _digits(msg.get(F.NETWORK_MGMT_CODE), 3):
            return "field 70 missing or not 3 digits"
        return None
    if cls == CLS_REVERSAL:
        if ref_from_field90(msg.get(F.ORIGINAL_DATA, "")) is None:
            return "field 90 missing or malformed"
        return None
    if not _digits(msg.get(F.PROC), 6):
        return "field 3 missing or not 6 digits"
    pan, _ = _pan_of(msg)
    if not (pan.isascii() and pan.isdigit() and 12 <= len(pan) <= 19):
        return "no readable PAN in field 2 or 35"
    kind = classify(cls, msg[F.PROC], msg)
    if kind is not None and kind != Kind.BALANCE and F.AMOUNT not in msg:
        return "field 4 missing"
    if kind in (Kind.VOID, Kind.COMPLETION) and ref_from_field90(msg.get(F.ORIGINAL_DATA, "")) is None:
        return "field 90 missing or malformed"
    if kind == TRANSFER_OUT:
        to = msg.get(F.ACCOUNT_2, "")
        if not (to.isascii() and to.isdigit() and 12 <= len(to) <= 19):
            return "field 103 missing or not a card number"
    if F.SETTLEMENT_DATE in msg and not _valid_mmdd(msg[F.SETTLEMENT_DATE]):
        return "field 15 is not a date"
    f55 = msg.get(F.ICC_DATA)
    if f55 and cls in (CLS_AUTH, CLS_FIN):
        try:
            arqc_check_from(f55, pan)
        except ValueError as e:
            return str(e)
    return None


def respond(msg: Message, rc: str, auth_code: str = "", balances: str = "",
            echoed: Iterable[str] = ECHOED) -> Message:
    out: Message = {F.MTI: response_mti(msg[F.MTI])}
    for k in echoed:
        v = msg.get(k)
        if v is not None:
            out[k] = v
    out[F.RESPONSE_CODE] = rc
    if auth_code:
        out[F.AUTH_CODE] = auth_code
    if balances:
        out[F.ADDITIONAL_AMOUNTS] = balances
    return out


class IssuerLogic:
    """One bank's ledger and decisions. Not thread-safe: one event loop drives it."""

    def __init__(self, bank_id: str, bins: Sequence[BinRange], secret: bytes,
                 accounts: Iterable[Account] = (),
                 txns: Iterable[Txn] = (), next_id: int = 1,
                 lookup: Lookup | None = None, max_cached: int = 100_000,
                 complete: bool = True, verifier: Verifier | None = None) -> None:
        self.bank_id = bank_id
        self.bins = tuple(bins)
        self._secret = secret
        # Who verifies PINs, CVVs and ARQCs (the HSM); None: nothing can be
        # verified, so PIN transactions get 96 and CVVs/ARQCs are not checked.
        self.verifier = verifier
        self.capabilities: frozenset[str] = verifier.capabilities if verifier is not None else frozenset()
        # Idempotency keys of requests waiting for their checks: a repeat waits too.
        self._verifying: dict[str, asyncio.Future] = {}
        self.accounts: dict[str, Account] = {a.token: a for a in accounts}
        self.next_id = next_id
        self._lookup = lookup
        self.max_cached = max_cached
        # True while every record ever processed is cached: then a miss is a
        # miss, and storage is not asked (the common case, no I/O on the loop).
        self.complete = complete
        # Recently used records, oldest first; active holds and unmatched
        # reversals are pinned in their own maps and never evicted.
        self._cache: OrderedDict[int, Txn] = OrderedDict()
        self._by_key: dict[str, Txn] = {}
        self._by_ref: dict[str, Txn] = {}
        self._pinned: dict[int, Txn] = {}
        self.orphans: dict[str, Txn] = {}   # reversals whose original was not (yet) seen
        for t in txns:
            self._remember(t)
            if t.kind == Kind.REVERSAL and t.orig_id is None and t.orig_ref:
                self.orphans.setdefault(t.orig_ref, t)
            self.next_id = max(self.next_id, t.id + 1)
        self._recompute_holds()

    # -- lookups ------------------------------------------------------------

    def token(self, pan: str) -> str:
        return pan_token(pan, self._secret)

    def account_for(self, pan: str) -> Account | None:
        return self.accounts.get(self.token(pan))

    def txn_by_key(self, key: str) -> Txn | None:
        t = self._by_key.get(key)
        if t is None and not self.complete and self._lookup is not None:
            t = self._lookup("key", key)
            if t is not None:
                self._remember(t)
        return t

    def txn_by_ref(self, ref: str) -> Txn | None:
        t = self._by_ref.get(ref)
        if t is None and not self.complete and self._lookup is not None:
            t = self._lookup("ref", ref)
            if t is not None:
                self._remember(t)
        return t

    def txn_by_id(self, txn_id: int) -> Txn | None:
        t = self._cache.get(txn_id) or self._pinned.get(txn_id)
        if t is None and not self.complete and self._lookup is not None:
            t = self._lookup("id", txn_id)
            if t is not None:
                self._remember(t)
        return t

    def _remember(self, t: Txn) -> None:
        cache = self._cache
        cache[t.id] = t
        cache.move_to_end(t.id)
        self._by_key[t.key] = t
        if t.ref and t.kind != Kind.REVERSAL:
            self._by_ref[t.ref] = t
        if t.hold == Hold.ACTIVE:
            self._pinned[t.id] = t
        else:
            self._pinned.pop(t.id, None)
        while len(cache) > self.max_cached:
            self.complete = False
            _, old = cache.popitem(last=False)
            if old.id in self._pinned:
                continue
            if self._by_key.get(old.key) is old:
                del self._by_key[old.key]
            if self._by_ref.get(old.ref) is old:
                del self._by_ref[old.ref]

    def _recompute_holds(self) -> None:
        for a in self.accounts.values():
            a.held = 0
        for t in list(self._pinned.values()):
            if t.hold == Hold.ACTIVE and t.approved and not t.reversed:
                a = self.accounts.get(t.token)
                if a is not None:
                    a.held += t.amount

    # -- entry points -------------------------------------------------------

    @staticmethod
    def idem_key(msg: Message) -> str | None:
        """The idempotency key of a request (MTI class | RRN | STAN); None when it has none."""
        mti, stan = msg.get(F.MTI, ""), msg.get(F.STAN)
        if not _digits(mti, 4) or stan is None:
            return None
        return f"{mti_class(mti)}|{msg.get(F.RRN, '')}|{stan}"

    def security_checks(self, msg: Message, now: datetime) -> Checks | None:
        """What a request needs verified before :meth:`handle` can decide it;
        None when nothing (no field 52, 35 or 55; not a 0100/0200; a repeat;
        or declined before any check: unknown card, status, expiry)."""
        if F.PIN_BLOCK not in msg and F.TRACK2 not in msg and F.ICC_DATA not in msg:
            return None
        mti = msg.get(F.MTI, "")
        if not _digits(mti, 4) or is_response(mti):
            return None
        cls = mti_class(mti)
        if cls not in (CLS_AUTH, CLS_FIN) or format_problem(msg) is not None:
            return None
        if self.txn_by_key(f"{cls}|{msg.get(F.RRN, '')}|{msg[F.STAN]}") is not None:
            return None
        pan, track_expiry = _pan_of(msg)
        kind = classify(cls, msg[F.PROC], msg)
        acct = self.accounts.get(self.token(pan))
        if (self._check_kind(kind) or self._check_card(acct, kind) or self._check_status(acct)
                or self._check_expiry(acct, msg, track_expiry, now)):
            return None
        checks = self._checks_for(msg, acct, pan, self._business_date(msg, now))
        return checks if checks else None

    def must_wait(self, msg: Message, now: datetime) -> bool:
        """True when the request must go through :meth:`process` (checks to
        verify, or a request with its key is being verified), False when
        :meth:`handle` decides it at once."""
        if self._verifying:
            key = self.idem_key(msg)
            if key is not None and key in self._verifying:
                return True
        return self.security_checks(msg, now) is not None

    async def process(self, msg: Message, now: datetime) -> Outcome:
        """Verify what the request needs (through the verifier), then decide it.

        A request whose idempotency key is already being verified waits for
        that one and is then answered as its repeat.
        """
        key = self.idem_key(msg)
        if key is not None:
            while (busy := self._verifying.get(key)) is not None:
                await busy
        checks = self.security_checks(msg, now)
        if checks is None:
            return self.handle(msg, now)
        done = asyncio.get_running_loop().create_future()
        self._verifying[key] = done
        try:
            results = await verify_all(self.verifier, checks) if self.verifier is not None else Results()
            outcome = self.handle(msg, now, results)
            pending = outcome.arpc_for
            if pending is not None and outcome.response is not None and self.verifier is not None:
                arc = arc_for(outcome.response[F.RESPONSE_CODE])
                arpc = await self.verifier.arpc(pending, arc)
                if arpc is not None:
                    self.attach_icc(outcome, issuer_auth_data(arpc, arc))
                outcome.arpc_for = None
            return outcome
        finally:
            del self._verifying[key]
            done.set_result(None)

    @staticmethod
    def attach_icc(outcome: Outcome, field55: str) -> None:
        """Add field 55 to an outcome's response, and to the record its repeats are answered from."""
        resp = outcome.response
        if resp is None:
            return
        resp[F.ICC_DATA] = field55
        if outcome.new is not None:
            outcome.new.response = orjson.dumps({k: v for k, v in resp.items() if k != F.PAN})

    def handle(self, msg: Message, now: datetime, results: Results | None = None) -> Outcome:
        """Decide one request. ``now`` is an aware UTC datetime; ``results``
        are the verdicts of its :meth:`security_checks` (a check without one
        counts as not verifiable: 96)."""
        mti = msg.get(F.MTI, "")
        if not _digits(mti, 4) or is_response(mti):
            return Outcome(None)
        cls = mti_class(mti)
        problem = format_problem(msg)
        if problem is not None:
            log.warning("%s %s: format error: %s", self.bank_id, mti, problem)
            return Outcome(respond(msg, RC.FORMAT_ERROR))
        if cls == CLS_NETWORK:
            return Outcome(self._network(msg))
        if cls not in (CLS_AUTH, CLS_FIN, CLS_ADVICE, CLS_REVERSAL):
            return Outcome(respond(msg, RC.INVALID_TRANSACTION))
        key = f"{cls}|{msg.get(F.RRN, '')}|{msg[F.STAN]}"
        prior = self.txn_by_key(key)
        if prior is not None:
            return self._replay(prior, msg)
        if cls == CLS_REVERSAL:
            return self._reversal(msg, key, now)
        return self._financial(msg, cls, key, now, results or Results())

    # -- network management -------------------------------------------------

    def _network(self, msg: Message) -> Message:
        code = msg[F.NETWORK_MGMT_CODE]
        ok = code in (NetMgmt.SIGN_ON, NetMgmt.SIGN_OFF, NetMgmt.ECHO)
        return respond(msg, RC.APPROVED if ok else RC.INVALID_TRANSACTION, echoed=NETWORK_ECHOED)

    # -- idempotency ----------------------------------------------------------

    def _replay(self, prior: Txn, msg: Message) -> Outcome:
        resp: Message = orjson.loads(prior.response)
        if prior.had_pan and F.PAN in msg:
            resp[F.PAN] = msg[F.PAN]
        # Advices are acknowledged at once (see _delay_for); repeats of requests wait like them.
        acct = self.accounts.get(prior.token) if mti_class(prior.mti) in (CLS_AUTH, CLS_FIN) else None
        log.info("%s %s %s: repeat of an answered request, same answer %s",
                 self.bank_id, msg[F.MTI], prior.pan_masked, prior.rc)
        return Outcome(resp, delay_ms=acct.delay_ms if acct else 0, replay=True)

    # -- records ---------------------------------------------------------------

    def _new_txn(self, msg: Message, key: str, kind: str, pan: str, amount: int,
                 bdate: str, now: datetime) -> Txn:
        txn = Txn(
            id=self.next_id, key=key,
            ref=ref_of(msg[F.MTI], msg[F.STAN], msg.get(F.TRANSMISSION_DT, "")),
            mti=msg[F.MTI], proc=msg.get(F.PROC, ""), kind=kind,
            token=self.token(pan) if pan else "", pan_masked=mask_pan(pan) if pan else "",
            amount=amount, currency=msg.get(F.CURRENCY, ""), rc="", auth_code="",
            rrn=msg.get(F.RRN, ""), stan=msg[F.STAN], transmitted=msg.get(F.TRANSMISSION_DT, ""),
            business_date=bdate, received_at=now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        self.next_id += 1
        return txn

    def _finish(self, txn: Txn, msg: Message, response: Message, changes: _Changes,
                delay_ms: int) -> Outcome:
        txn.rc = response[F.RESPONSE_CODE]
        txn.had_pan = F.PAN in response
        txn.response = orjson.dumps({k: v for k, v in response.items() if k != F.PAN})
        self._remember(txn)
        for t in changes.txns.values():
            if t is not txn:
                self._remember(t)
        return Outcome(response, new=txn, txns=[t for t in changes.txns.values() if t is not txn],
                       accounts=list(changes.accounts.values()), delay_ms=delay_ms)

    def _business_date(self, msg: Message, now: datetime) -> str:
        f15 = msg.get(F.SETTLEMENT_DATE)
        today = now.date()
        d = business_date(f15, today) if f15 else None
        return (d or today).isoformat()

    # -- financial requests and advices ----------------------------------------

    def _financial(self, msg: Message, cls: str, key: str, now: datetime, results: Results) -> Outcome:
        pan, track_expiry = _pan_of(msg)
        amount = int(msg.get(F.AMOUNT) or 0)
        day = self._business_date(msg, now)
        kind = classify(cls, msg[F.PROC], msg)
        txn = self._new_txn(msg, key, kind or "", pan, amount, day, now)
        acct = self.accounts.get(txn.token)
        changes = _Changes()
        advice = cls == CLS_ADVICE
        arpc_for: ArqcCheck | None = None
        if advice:
            rc = self._post(kind, txn, acct, msg, amount, day, changes, force=True) \
                if kind is not None and acct is not None else None
            if rc != RC.APPROVED:
                # An advice is acknowledged, never declined; what cannot be
                # posted here (unknown card or original) moves nothing.
                txn.effects = ()
                if kind is None:
                    txn.kind = ADVICE_ONLY
                log.warning("%s %s %s: advice for %s not postable here (%s)", self.bank_id,
                            msg[F.MTI], txn.pan_masked, kind or msg[F.PROC], rc or "unknown card")
            txn.auth_code = msg.get(F.AUTH_CODE, "")
            rc = RC.APPROVED
            response = respond(msg, rc)
        else:
            checks = Checks()
            rc = (self._check_kind(kind)
                  or self._check_card(acct, kind)
                  or self._check_status(acct)
                  or self._check_expiry(acct, msg, track_expiry, now))
            if rc is None:
                checks = self._checks_for(msg, acct, pan, day)
                rc = (self._check_cvv(acct, msg, checks, results)
                      or self._check_arqc(acct, checks, results)
                      or self._check_pin(acct, msg, checks, results, kind, day, changes)
                      or self._post(kind, txn, acct, msg, amount, day, changes, force=False))
            balances = ""
            if rc == RC.APPROVED:
                txn.auth_code = f"{txn.id % 1_000_000:06d}"
                if kind in (Kind.BALANCE, Kind.WITHDRAWAL):
                    acct_type = msg[F.PROC][2:4]
                    balances = format_balances(acct_type, acct.currency, acct.balance, acct.available)
            response = respond(msg, rc, txn.auth_code, balances)
            arpc_for = self._issuer_auth(checks, results, rc, response)
        # A reversal that came before its original: the original still gets
        # its answer, but whatever it did is undone at once.
        rev = self.orphans.pop(txn.ref, None) if self.orphans else None
        if rev is not None:
            txn.rc = rc
            self._undo(txn, changes)
            rev.orig_id = txn.id
            changes.txn(rev)
            log.warning("%s %s %s: original arrived after its reversal; nothing stays done",
                        self.bank_id, msg[F.MTI], txn.pan_masked)
        delay = acct.delay_ms if acct is not None and not advice else 0
        log.debug("%s %s %s %s %s -> %s", self.bank_id, msg[F.MTI], msg[F.PROC],
                  txn.pan_masked, amount, rc)
        outcome = self._finish(txn, msg, response, changes, delay)
        outcome.arpc_for = arpc_for
        return outcome

    # The checks, in order. Each answers a response code or None (go on).

    @staticmethod
    def _check_kind(kind: str | None) -> str | None:
        return RC.INVALID_TRANSACTION if kind is None else None

    @staticmethod
    def _check_card(acct: Account | None, kind: str | None) -> str | None:
        if acct is None:
            return RC.NO_SUCH_ACCOUNT if kind == TRANSFER_IN else RC.INVALID_CARD
        return None

    @staticmethod
    def _check_status(acct: Account) -> str | None:
        if acct.status == "active":
            return None
        return {"lost": RC.LOST_CARD, "stolen": RC.STOLEN_CARD}.get(acct.status, RC.DO_NOT_HONOUR)

    @staticmethod
    def _check_expiry(acct: Account, msg: Message, track_expiry: str, now: datetime) -> str | None:
        if acct.expiry < f"{now.year % 100:02d}{now.month:02d}":
            return RC.EXPIRED_CARD
        given = msg.get(F.EXPIRY) or track_expiry
        if given and given != acct.expiry:
            return RC.EXPIRED_CARD
        return None

    def _checks_for(self, msg: Message, acct: Account, pan: str, day: str) -> Checks:
        """The checks this bank can and must verify for a request on ``acct``."""
        caps = self.capabilities
        checks = Checks()
        t2 = msg.get(F.TRACK2)
        if t2 is not None and CAN_CVV in caps:
            track = parse_track2(t2)
            if track is not None and track.cvv:
                checks.cvv = CvvCheck(track.pan, track.expiry, track.service_code, track.cvv)
        f55 = msg.get(F.ICC_DATA)
        if f55 and CAN_ARQC in caps:
            checks.arqc = arqc_check_from(f55, pan)     # well-formed: format_problem passed
        block = msg.get(F.PIN_BLOCK)
        if (block is not None and CAN_PIN in caps and acct.pin_ref.usable
                and self._pin_fails(acct, day) < MAX_PIN_TRIES):
            checks.pin = PinCheck(pan, block, acct.pin_method, acct.pvv, acct.pin_offset)
        return checks

    @staticmethod
    def _pin_fails(acct: Account, day: str) -> int:
        return acct.pin_fails if acct.pin_day >= day else 0

    def _check_cvv(self, acct: Account, msg: Message, checks: Checks, results: Results) -> str | None:
        if F.TRACK2 not in msg or CAN_CVV not in self.capabilities:
            return None
        if checks.cvv is None:
            log.info("%s %s: track 2 holds no CVV: answered 05", self.bank_id, acct.pan_masked)
            return RC.DO_NOT_HONOUR
        verdict = results.cvv
        if verdict == Verdict.OK:
            return None
        if verdict in (Verdict.WRONG, Verdict.BAD_INPUT):
            log.info("%s %s: CVV does not verify: answered 05", self.bank_id, acct.pan_masked)
            return RC.DO_NOT_HONOUR
        return RC.SYSTEM_MALFUNCTION

    def _check_arqc(self, acct: Account, checks: Checks, results: Results) -> str | None:
        if checks.arqc is None:
            return None
        verdict = results.arqc.verdict if results.arqc is not None else None
        if verdict == Verdict.OK:
            return None
        if verdict in (Verdict.WRONG, Verdict.BAD_INPUT):
            log.info("%s %s: ARQC does not verify: answered 05", self.bank_id, acct.pan_masked)
            return RC.DO_NOT_HONOUR
        return RC.SYSTEM_MALFUNCTION

    def _check_pin(self, acct: Account, msg: Message, checks: Checks, results: Results, kind: str,
                   day: str, changes: _Changes) -> str | None:
        if F.PIN_BLOCK not in msg:
            return RC.INCORRECT_PIN if kind == Kind.WITHDRAWAL else None
        fails = self._pin_fails(acct, day)
        if fails >= MAX_PIN_TRIES:
            return RC.PIN_TRIES_EXCEEDED
        if checks.pin is None:
            why = "no ZPK and PVK" if CAN_PIN not in self.capabilities else "no PVV or offset for the card"
            log.warning("%s %s: cannot verify the PIN (%s): answered 96", self.bank_id, acct.pan_masked, why)
            return RC.SYSTEM_MALFUNCTION
        verdict = results.pin
        if verdict == Verdict.OK:
            if acct.pin_fails:
                acct.pin_fails = 0
                changes.account(acct)
            return None
        if verdict in (Verdict.WRONG, Verdict.BAD_INPUT):
            acct.pin_fails = fails + 1
            acct.pin_day = max(day, acct.pin_day)
            changes.account(acct)
            return RC.INCORRECT_PIN
        return RC.SYSTEM_MALFUNCTION

    @staticmethod
    def _issuer_auth(checks: Checks, results: Results, rc: str, response: Message) -> ArqcCheck | None:
        """Field 55 (tag 91) for a request whose ARQC was verified. Answers the
        ARQC check when the ARPC for ``rc`` is still to get (KQ mode 2)."""
        got = results.arqc
        if checks.arqc is None or got is None or got.verdict not in (Verdict.OK, Verdict.WRONG):
            return None
        if rc == RC.APPROVED and got.arpc is not None:
            response[F.ICC_DATA] = issuer_auth_data(got.arpc, arc_for(rc))
            return None
        return checks.arqc

    # -- posting -----------------------------------------------------------------

    def _post(self, kind: str, txn: Txn, acct: Account, msg: Message, amount: int, day: str,
              changes: _Changes, force: bool) -> str:
        """Check funds and limits, then apply the effects. Answers the response code."""
        tok = acct.token
        if kind == Kind.PREAUTH:
            if acct.available < amount:
                return RC.INSUFFICIENT_FUNDS
            acct.held += amount
            txn.hold = Hold.ACTIVE
            txn.effects = ((Op.HOLD, tok, amount, ""),)
        elif kind == Kind.COMPLETION:
            orig = self.txn_by_ref(ref_from_field90(msg[F.ORIGINAL_DATA]) or "")
            if (orig is None or orig.kind != Kind.PREAUTH or not orig.approved or orig.reversed
                    or orig.hold != Hold.ACTIVE or orig.token != tok):
                return RC.INVALID_TRANSACTION
            if not force and acct.available + orig.amount < amount:
                return RC.INSUFFICIENT_FUNDS
            acct.held -= orig.amount
            acct.balance -= amount
            orig.hold = Hold.COMPLETED
            changes.txn(orig)
            txn.orig_ref, txn.orig_id = orig.ref, orig.id
            txn.effects = ((Op.RELEASE, tok, orig.amount, orig.id), (Op.DEBIT, tok, amount, ""))
        elif kind == Kind.VOID:
            orig = self.txn_by_ref(ref_from_field90(msg[F.ORIGINAL_DATA]) or "")
            if (orig is None or orig.kind not in (Kind.PURCHASE, Kind.COMPLETION) or not orig.approved
                    or orig.reversed or orig.voided or orig.token != tok):
                return RC.INVALID_TRANSACTION
            acct.balance += orig.amount
            orig.voided = True
            changes.txn(orig)
            txn.orig_ref, txn.orig_id = orig.ref, orig.id
            txn.effects = ((Op.CREDIT, tok, orig.amount, ""), (Op.VOID, "", 0, orig.id))
        elif kind in _DEBIT_KINDS:
            if not force and acct.available < amount:
                return RC.INSUFFICIENT_FUNDS
            effects: list[Effect] = [(Op.DEBIT, tok, amount, "")]
            if kind == Kind.WITHDRAWAL:
                today = acct.withdrawn if acct.withdrawn_day >= day else 0
                limit = acct.daily_withdrawal_limit
                if not force and limit and today + amount > limit:
                    return RC.EXCEEDS_WITHDRAWAL_LIMIT
                if acct.withdrawn_day < day:
                    acct.withdrawn, acct.withdrawn_day = 0, day
                acct.withdrawn += amount
                effects.append((Op.WITHDRAWN, tok, amount, acct.withdrawn_day))
            acct.balance -= amount
            txn.effects = tuple(effects)
        elif kind in _CREDIT_KINDS:
            acct.balance += amount
            txn.effects = ((Op.CREDIT, tok, amount, ""),)
        elif kind == TRANSFER_OUT:
            to_pan = msg[F.ACCOUNT_2]
            target = None
            if in_bins(to_pan, self.bins):
                target = self.account_for(to_pan)
                if target is None or target.status != "active":
                    return RC.NO_SUCH_ACCOUNT
            if not force and acct.available < amount:
                return RC.INSUFFICIENT_FUNDS
            acct.balance -= amount
            txn.to_pan_masked = mask_pan(to_pan)
            txn.to_token = self.token(to_pan)
            effects = [(Op.DEBIT, tok, amount, "")]
            if target is not None:
                target.balance += amount
                changes.account(target)
                effects.append((Op.CREDIT, target.token, amount, ""))
            txn.effects = tuple(effects)
        elif kind == Kind.BALANCE:
            return RC.APPROVED
        else:
            return RC.INVALID_TRANSACTION
        changes.account(acct)
        return RC.APPROVED

    # -- reversals ----------------------------------------------------------------

    def _reversal(self, msg: Message, key: str, now: datetime) -> Outcome:
        pan, _ = _pan_of(msg)
        amount = int(msg.get(F.AMOUNT) or 0)
        txn = self._new_txn(msg, key, Kind.REVERSAL, pan, amount, self._business_date(msg, now), now)
        txn.ref = ""
        txn.orig_ref = ref_from_field90(msg[F.ORIGINAL_DATA]) or ""
        changes = _Changes()
        orig = self.txn_by_ref(txn.orig_ref)
        if orig is None:
            self.orphans.setdefault(txn.orig_ref, txn)
            log.warning("%s %s: reversal of an unknown original %s", self.bank_id, msg[F.MTI], txn.orig_ref)
        else:
            txn.orig_id = orig.id
            undone = self._undo(orig, changes)
            log.info("%s %s %s: reversal of %s %s", self.bank_id, msg[F.MTI], orig.pan_masked,
                     orig.id, "applied" if undone else "changes nothing")
        # Not delayed: ``delay_ms`` makes a card's authorizations slow, so that
        # the switch times out; the reversal that follows must get through.
        return self._finish(txn, msg, respond(msg, RC.APPROVED), changes, 0)

    def _undo(self, orig: Txn, changes: _Changes) -> bool:
        """Undo what ``orig`` did, once. False when there is nothing to undo."""
        if not orig.approved or orig.reversed or orig.voided:
            return False  # declined, done already, or its void gave the money back
        for op, tok, amount, extra in orig.effects:
            if op == Op.VOID:
                voided = self.txn_by_id(int(extra))
                if voided is not None:
                    voided.voided = False
                    changes.txn(voided)
                continue
            acct = self.accounts.get(tok)
            if acct is None:
                continue
            if op == Op.DEBIT:
                acct.balance += amount
            elif op == Op.CREDIT:
                acct.balance -= amount
            elif op == Op.HOLD:
                if orig.hold != Hold.ACTIVE:
                    continue
                acct.held -= amount
                orig.hold = Hold.RELEASED
            elif op == Op.WITHDRAWN:
                if acct.withdrawn_day == extra:
                    acct.withdrawn = max(0, acct.withdrawn - amount)
            # Op.RELEASE: a reversed completion leaves its hold released.
            changes.account(acct)
        orig.reversed = True
        changes.txn(orig)
        return True
