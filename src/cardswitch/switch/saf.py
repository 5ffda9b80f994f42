"""Store-and-forward: the advices the switch owes the issuers, across restarts.

Two kinds of advice go through one persistent queue (wire.md 8):

- **0420 reversal advices**, repeated as 0421 until a 0430 comes back: for a
  request whose issuer did not answer in time (or answered with a bad MAC),
  a terminal's 0400, a transfer whose credit leg failed, and, at start, every
  request written ahead that has no outcome (the switch died while it was at
  the issuer).
- **0220 stand-in advices**, repeated as 0221 until a 0230: transactions the
  switch approved on the issuer's behalf while it was unreachable.

Each advice is a row of the journal's ``saf`` table (``SafEntry``), written
in the same group-commit stream as the transaction rows and *before* the
transaction's own outcome, so a committed outcome always has its advice
committed too. The row holds what rebuilds the message: bank, the original's
switch-to-issuer MTI, STAN and field 7 (field 90), amount, currency,
processing code, RRN, terminal and merchant, acquirer; and the advice's own
field 11 and field 7, reserved once and kept for every repeat, so the issuer
recognises a repeat (its idempotency key is MTI class + 37 + 11) and never
applies an advice twice. Never a clear PAN: a reversal advice carries none
(field 90 identifies the original); a stand-in advice must (the issuer posts
it to the card), so its PAN is kept sealed (AES-256-GCM under a key derived
from the switch's token secret, the RRN as associated data) and opened only
to build the message.

Delivery (``SafForwarder``): one worker task per bank. It waits for the link
to be signed on, sends the bank's oldest advices in order, at most
``window`` in flight (a bank that just came back is not flooded), and waits
for all of them before sending more. An answer 00 (25 to a reversal:
nothing to undo; 94: the issuer has it) delivers the advice. No answer, or
another code, and the worker backs off for the whole bank (1 s doubling to
60 s) and retries from the oldest, so the bank sees its advices in the order
they were queued. An advice the issuer refuses for good (30, 12: the same
message will never pass) is parked at once; one older than ``max_age_s``
(``[switch] saf_max_age_s``, default 24 h) is parked too. Parking raises an
alert: an error log line, a counter, and the ``on_alert("saf", detail)``
hook. Parked rows stay in the journal for the operators.

The queue logic (``SafQueue``: order, window, backoff, age) is pure and has a
clock passed in; ``SafForwarder`` is the asyncio shell around it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cardswitch.iso8583.constants import MTI, RC, F, TxnType
from cardswitch.iso8583.dialect import EncodeError, Message
from cardswitch.switch import messages
from cardswitch.switch.records import TxnRecord

log = logging.getLogger("cardswitch.saf")

# Entry kinds.
REVERSAL = "reversal"          # 0420 / 0421
STAND_IN = "stand_in"          # 0220 / 0221

# Entry states.
QUEUED = "queued"
DELIVERED = "delivered"
PARKED = "parked"
STATES = (QUEUED, DELIVERED, PARKED)

# Which issuer of a transaction an advice is for.
DEBIT_LEG = "debit"            # the card's issuer
CREDIT_LEG = "credit"          # a transfer's receiving issuer (the 0200 28xxxx)

# What an attempt came to (``outcome_of``; NOT_SENT when the link refused it).
RETRY = "retry"
NOT_SENT = "not_sent"

ALERT_KIND = "saf"             # on_alert(kind, detail): cardswitch/alert/saf

# Answers after which the issuer has the advice; answers it will never change.
_DELIVERED_RCS = frozenset({RC.APPROVED, RC.DUPLICATE})
_REFUSED_RCS = frozenset({RC.FORMAT_ERROR, RC.INVALID_TRANSACTION})


@dataclass(slots=True)
class SafEntry:
    """One advice owed to one bank (a row of the journal's ``saf`` table)."""

    id: int
    bank_id: str
    kind: str                     # REVERSAL | STAND_IN
    txn_id: int                   # the journal row it is about
    leg: str                      # DEBIT_LEG | CREDIT_LEG
    mti: str                      # first send: 0420 | 0220 (repeats: 0421 | 0221)
    proc: str
    amount: int                   # minor units
    currency: str
    orig_mti: str                 # reversal: the switch-to-issuer original (field 90); "" for stand-in
    orig_stan: str
    orig_transmitted: str
    stan: str                     # the advice's own field 11, the same on every repeat
    transmitted: str              # the advice's own field 7, the same on every repeat
    rrn: str
    terminal_id: str
    merchant_id: str
    acquirer_inst: str            # field 32
    business_date: str            # YYYY-MM-DD: field 15
    auth_code: str = ""           # stand-in: the switch's field 38
    pan_sealed: str = ""          # stand-in: the PAN, sealed (never clear)
    created_at: str = ""          # UTC ISO-8601
    state: str = QUEUED
    attempts: int = 0             # times sent so far (0: the next send is the first)
    last_error: str = ""
    updated_at: str = ""

    @property
    def created_ts(self) -> float:
        """``created_at`` as POSIX seconds."""
        try:
            return datetime.fromisoformat(self.created_at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0

    def describe(self) -> str:
        """For logs: no PAN, no secrets."""
        return (f"{self.kind} advice #{self.id} to {self.bank_id} (txn {self.txn_id}, {self.leg} leg, "
                f"stan {self.stan}, rrn {self.rrn}, amount {self.amount})")


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- policy and the answer's meaning (pure) ------------------------------------------------


@dataclass(slots=True, frozen=True)
class SafPolicy:
    """Backoff (per bank), maximum age and window of the delivery workers."""

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    max_age_s: float = 86400.0
    window: int = 8               # advices in flight per bank

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.factor < 1 or self.window < 1 \
                or self.max_age_s <= 0:
            raise ValueError("bad store-and-forward policy")

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed rounds in a row (>= 1)."""
        d = self.initial_s
        for _ in range(max(0, failures - 1)):
            d *= self.factor
            if d >= self.max_s:
                return self.max_s
        return min(d, self.max_s)


def outcome_of(entry: SafEntry, rc: str) -> str:
    """DELIVERED, PARKED (refused for good) or RETRY for an answer with code ``rc``."""
    if rc in _DELIVERED_RCS or (entry.kind == REVERSAL and rc == RC.ORIGINAL_NOT_FOUND):
        return DELIVERED
    if rc in _REFUSED_RCS:
        return PARKED
    return RETRY


# -- the entries (pure) ---------------------------------------------------------------------


def issuer_original_mti(rec: TxnRecord) -> str:
    """The MTI the issuer knows ``rec`` by: its 0220 advice when the switch stood in."""
    return MTI.FIN_ADVICE if rec.stand_in else rec.mti[:3] + "0"


def reversal_entry(rec: TxnRecord, *, entry_id: int, leg: str, stan: str, transmitted: str,
                   acquirer_inst: str, business_date: str, created_at: str) -> SafEntry:
    """The 0420 undoing what ``rec`` did at its issuer (``leg`` debit) or, for an
    interbank transfer, at the receiving issuer (``leg`` credit, the 0200 28xxxx)."""
    if leg == CREDIT_LEG:
        bank_id, orig_mti, orig_stan, orig_tx = (rec.to_issuer_id, MTI.FIN_REQUEST, rec.to_issuer_stan,
                                                 rec.to_issuer_transmitted)
        proc = TxnType.TRANSFER_CREDIT.value + rec.proc[2:]
    else:
        bank_id, orig_mti, orig_stan, orig_tx = (rec.issuer_id, issuer_original_mti(rec), rec.issuer_stan,
                                                 rec.issuer_transmitted)
        proc = rec.proc
    return SafEntry(
        id=entry_id, bank_id=bank_id, kind=REVERSAL, txn_id=rec.id, leg=leg, mti=MTI.REVERSAL_ADVICE,
        proc=proc, amount=rec.amount, currency=rec.currency, orig_mti=orig_mti, orig_stan=orig_stan,
        orig_transmitted=orig_tx, stan=stan, transmitted=transmitted, rrn=rec.rrn,
        terminal_id=rec.terminal_id, merchant_id=rec.merchant_id, acquirer_inst=acquirer_inst,
        business_date=business_date, created_at=created_at, updated_at=created_at)


def stand_in_entry(rec: TxnRecord, *, entry_id: int, pan_sealed: str, acquirer_inst: str,
                   created_at: str) -> SafEntry:
    """The 0220 telling ``rec``'s issuer what the switch approved for it. The
    advice's 11 and 7 are the record's ``issuer_stan``/``issuer_transmitted``
    (the stand-in's issuer-side identity: a later 0420 names it in field 90)."""
    return SafEntry(
        id=entry_id, bank_id=rec.issuer_id, kind=STAND_IN, txn_id=rec.id, leg=DEBIT_LEG,
        mti=MTI.FIN_ADVICE, proc=rec.proc, amount=rec.amount, currency=rec.currency, orig_mti="",
        orig_stan="", orig_transmitted="", stan=rec.issuer_stan, transmitted=rec.issuer_transmitted,
        rrn=rec.rrn, terminal_id=rec.terminal_id, merchant_id=rec.merchant_id,
        acquirer_inst=acquirer_inst, business_date=rec.business_date, auth_code=rec.auth_code,
        pan_sealed=pan_sealed, created_at=created_at, updated_at=created_at)


def reversal_of_advice(advice: SafEntry, *, entry_id: int, stan: str, transmitted: str,
                       business_date: str, created_at: str) -> SafEntry:
    """The 0420 undoing a stand-in 0220 (field 90 names the advice)."""
    return SafEntry(
        id=entry_id, bank_id=advice.bank_id, kind=REVERSAL, txn_id=advice.txn_id, leg=advice.leg,
        mti=MTI.REVERSAL_ADVICE, proc=advice.proc, amount=advice.amount, currency=advice.currency,
        orig_mti=MTI.FIN_ADVICE, orig_stan=advice.stan, orig_transmitted=advice.transmitted,
        stan=stan, transmitted=transmitted, rrn=advice.rrn, terminal_id=advice.terminal_id,
        merchant_id=advice.merchant_id, acquirer_inst=advice.acquirer_inst, business_date=business_date,
        created_at=created_at, updated_at=created_at)


def advice_message(entry: SafEntry, *, switch_inst: str, issuer_inst: str, pan: str = "") -> Message:
    """The message for the next send of ``entry``: its repeat MTI once it was sent before."""
    if entry.kind == STAND_IN:
        msg = messages.stand_in_advice(
            pan=pan, proc=entry.proc, amount=entry.amount, currency=entry.currency,
            transmitted=entry.transmitted, rrn=entry.rrn, auth_code=entry.auth_code,
            terminal_id=entry.terminal_id, merchant_id=entry.merchant_id,
            business_date=entry.business_date, acquirer_inst=entry.acquirer_inst,
            switch_inst=switch_inst, issuer_inst=issuer_inst)
        repeat = MTI.FIN_ADVICE_REPEAT
    else:
        msg = messages.reversal_advice(
            proc=entry.proc, amount=entry.amount, currency=entry.currency, orig_mti=entry.orig_mti,
            orig_stan=entry.orig_stan, orig_transmitted=entry.orig_transmitted,
            transmitted=entry.transmitted, rrn=entry.rrn, terminal_id=entry.terminal_id,
            merchant_id=entry.merchant_id, business_date=entry.business_date,
            acquirer_inst=entry.acquirer_inst, switch_inst=switch_inst, issuer_inst=issuer_inst)
        repeat = MTI.REVERSAL_ADVICE_REPEAT
    if entry.attempts > 0:
        msg[F.MTI] = repeat
    msg[F.STAN] = entry.stan
    return msg


# -- the PAN of a stand-in advice, sealed ----------------------------------------------------


def pan_key(secret: bytes) -> bytes:
    """The sealing key: HKDF-SHA256 of the token secret, for this use only."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"cardswitch saf stand-in pan v1").derive(secret)


def seal_pan(pan: str, key: bytes, aad: str) -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return base64.urlsafe_b64encode(nonce + AESGCM(key).encrypt(nonce, pan.encode(), aad.encode())).decode()


def open_pan(sealed: str, key: bytes, aad: str) -> str:
    """The PAN back; ValueError when it does not open (another key, altered row)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        raw = base64.urlsafe_b64decode(sealed.encode())
        return AESGCM(key).decrypt(raw[:12], raw[12:], aad.encode()).decode()
    except (InvalidTag, ValueError) as e:
        raise ValueError("sealed PAN does not open with this switch's key") from e


# -- the queue (pure) --------------------------------------------------------------------------


class _Bank:
    __slots__ = ("entries", "in_flight", "failures", "retry_at")

    def __init__(self) -> None:
        self.entries: dict[int, SafEntry] = {}   # queued, oldest first (ids grow)
        self.in_flight: set[int] = set()
        self.failures = 0                       # failed rounds in a row
        self.retry_at = 0.0


class SafQueue:
    """The queued advices of every bank, their order, window, backoff and age.

    ``due`` gives what to send now; ``begin`` marks an advice sent (its MTI
    becomes the repeat from the second send on); ``done`` records what the
    attempt came to. Times are seconds of a clock the caller passes.
    """

    def __init__(self, policy: SafPolicy | None = None) -> None:
        self.policy = policy or SafPolicy()
        self._banks: dict[str, _Bank] = {}

    def _bank(self, bank_id: str) -> _Bank:
        b = self._banks.get(bank_id)
        if b is None:
            b = self._banks[bank_id] = _Bank()
        return b

    def add(self, entry: SafEntry) -> None:
        b = self._bank(entry.bank_id)
        in_order = not b.entries or next(reversed(b.entries)) < entry.id
        b.entries[entry.id] = entry
        if not in_order:
            b.entries = dict(sorted(b.entries.items()))   # keep id order (loaded out of order)

    def __len__(self) -> int:
        return sum(len(b.entries) for b in self._banks.values())

    def banks(self) -> list[str]:
        return [k for k, b in self._banks.items() if b.entries]

    def depth(self) -> dict[str, int]:
        """Queued advices per bank (in flight included)."""
        return {k: len(b.entries) for k, b in self._banks.items()}

    def pending(self, bank_id: str) -> int:
        b = self._banks.get(bank_id)
        return len(b.entries) if b else 0

    def in_flight(self, bank_id: str) -> int:
        b = self._banks.get(bank_id)
        return len(b.in_flight) if b else 0

    def entries(self, bank_id: str) -> list[SafEntry]:
        b = self._banks.get(bank_id)
        return list(b.entries.values()) if b else []

    def retry_at(self, bank_id: str) -> float:
        b = self._banks.get(bank_id)
        return b.retry_at if b else 0.0

    def failures(self, bank_id: str) -> int:
        b = self._banks.get(bank_id)
        return b.failures if b else 0

    def due(self, bank_id: str, now: float) -> list[SafEntry]:
        """The oldest advices of the bank to send now: none while it backs off,
        at most the window less what is in flight."""
        b = self._banks.get(bank_id)
        if b is None or now < b.retry_at:
            return []
        room = self.policy.window - len(b.in_flight)
        out: list[SafEntry] = []
        for e in b.entries.values():
            if room <= 0:
                break
            if e.id not in b.in_flight:
                out.append(e)
                room -= 1
        return out

    def begin(self, entry: SafEntry) -> None:
        """``entry`` is being sent now."""
        self._bank(entry.bank_id).in_flight.add(entry.id)
        entry.attempts += 1

    def done(self, entry: SafEntry, outcome: str, now: float, error: str = "") -> None:
        """What the attempt came to: DELIVERED, PARKED, RETRY or NOT_SENT."""
        b = self._bank(entry.bank_id)
        b.in_flight.discard(entry.id)
        entry.last_error = error
        if outcome == NOT_SENT:
            entry.attempts = max(0, entry.attempts - 1)
            b.retry_at = max(b.retry_at, now + self.policy.initial_s)
            return
        if outcome == RETRY:
            if now >= b.retry_at:               # one failed round, however many failed in it
                b.failures += 1
                b.retry_at = now + self.policy.delay(b.failures)
            return
        b.entries.pop(entry.id, None)
        entry.state = DELIVERED if outcome == DELIVERED else PARKED
        if outcome == DELIVERED:
            b.failures = 0
            b.retry_at = 0.0

    def expire(self, now: float) -> list[SafEntry]:
        """Advices older than the maximum age (not in flight): removed, marked parked."""
        limit = now - self.policy.max_age_s
        out = []
        for b in self._banks.values():
            for e in list(b.entries.values()):
                if e.id not in b.in_flight and e.created_ts < limit:
                    del b.entries[e.id]
                    e.state = PARKED
                    e.last_error = f"not delivered within {self.policy.max_age_s:.0f} s"
                    out.append(e)
        return out

    def find(self, bank_id: str, stan: str, rrn: str) -> SafEntry | None:
        b = self._banks.get(bank_id)
        if b is None:
            return None
        for e in b.entries.values():
            if e.stan == stan and e.rrn == rrn:
                return e
        return None

    def settle(self, entry: SafEntry) -> None:
        """``entry`` was delivered outside an attempt (a late answer)."""
        b = self._bank(entry.bank_id)
        if entry.id in b.entries and entry.id not in b.in_flight:
            del b.entries[entry.id]
            entry.state = DELIVERED
            b.failures = 0
            b.retry_at = 0.0


# -- the asyncio shell ----------------------------------------------------------------------


class SafForwarder:
    """Persists advices in the journal and delivers them, one worker per bank.

    ``links``: bank id -> link (``online``, ``wait_online(timeout)``,
    ``reserve_stan()``, ``request(msg, timeout_s, stan=)``, as ``BankLink``).
    ``issuer_insts``: bank id -> institution ID (field 100). ``secret``: the
    token secret (the sealing key of stand-in PANs is derived from it).
    """

    def __init__(self, journal, links: Mapping[str, Any], *, switch_inst: str,
                 issuer_insts: Mapping[str, str], secret: bytes, timeout_s: float = 3.0,
                 policy: SafPolicy | None = None,
                 on_alert: Callable[[str, dict], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.links = links
        self.switch_inst = switch_inst
        self.issuer_insts = dict(issuer_insts)
        self.timeout_s = timeout_s
        self.queue = SafQueue(policy)
        self.on_alert = on_alert
        self.clock = clock
        self._key = pan_key(secret)
        self._workers: dict[str, asyncio.Task] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._changed: asyncio.Event | None = None
        self._stopped = False
        # counters, for metrics
        self.delivered = 0
        self.parked = 0
        self.retries = 0
        self.alerts = 0
        self.alert_counts: dict[str, int] = {}

    @property
    def policy(self) -> SafPolicy:
        return self.queue.policy

    # -- what metrics read ------------------------------------------------------------

    def depth(self) -> dict[str, int]:
        """Advices waiting for delivery, per bank (every bank with a link is listed)."""
        out = dict.fromkeys(self.links, 0)
        out.update(self.queue.depth())
        return out

    @property
    def total_depth(self) -> int:
        return len(self.queue)

    # -- putting advices in ---------------------------------------------------------------

    def seal(self, pan: str, rrn: str) -> str:
        return seal_pan(pan, self._key, rrn)

    def reserve_stan(self, bank_id: str) -> str:
        """The advice's own field 11, from the bank link's STAN counter."""
        link = self.links.get(bank_id)
        if link is None:
            raise KeyError(f"no link to bank {bank_id}")
        return link.reserve_stan()

    def enqueue(self, entry: SafEntry, loop: asyncio.AbstractEventLoop | None = None
                ) -> asyncio.Future | None:
        """Journal ``entry`` (queued behind every write before it) and queue it.

        Returns the journal future when ``loop`` is given. Callers write the
        transaction's outcome after this, so the advice is never less durable
        than the outcome it belongs to.
        """
        fut = self.journal.saf_insert(entry, loop)
        self.queue.add(entry)
        log.info("queued %s", entry.describe())
        self._kick(entry.bank_id)
        return fut

    def next_id(self) -> int:
        return self.journal.next_saf_id()

    def load(self) -> int:
        """The advices the journal still has queued (after a restart): queued
        again, those past the maximum age parked now. Returns how many."""
        n = 0
        for e in self.journal.saf_queued():
            self.queue.add(e)
            n += 1
        self._expire()
        return n

    # -- workers ----------------------------------------------------------------------------

    def start(self) -> None:
        """Workers for the banks with queued advices; others start on first enqueue."""
        self._stopped = False
        for bank_id in self.queue.banks():
            self._kick(bank_id)

    def _kick(self, bank_id: str) -> None:
        ev = self._wake.get(bank_id)
        if ev is None:
            ev = self._wake[bank_id] = asyncio.Event()
        ev.set()
        if self._stopped or bank_id in self._workers:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                              # started later by start()
        self._workers[bank_id] = loop.create_task(self._work(bank_id), name=f"saf-{bank_id}")

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _work(self, bank_id: str) -> None:
        q = self.queue
        wake = self._wake[bank_id]
        while not self._stopped:
            try:
                self._expire()
                link = self.links.get(bank_id)
                if link is None or not q.pending(bank_id):
                    wake.clear()
                    await wake.wait()
                    continue
                if not link.online:
                    await link.wait_online(1.0)
                    if not link.online:
                        await asyncio.sleep(0.1)    # not started, stopped, or down again
                    continue
                now = self.clock()
                batch = q.due(bank_id, now)
                if not batch:
                    wake.clear()
                    wait = max(0.001, q.retry_at(bank_id) - now)
                    try:
                        await asyncio.wait_for(wake.wait(), min(wait, 1.0))
                    except asyncio.TimeoutError:
                        pass
                    continue
                await asyncio.gather(*(self._attempt(link, e) for e in batch))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                from cardswitch.switch.journal import JournalError

                if isinstance(e, JournalError):
                    log.warning("bank %s: store-and-forward stops: %s", bank_id, e)
                    return
                log.exception("bank %s: store-and-forward worker error", bank_id)
                await asyncio.sleep(self.policy.initial_s)

    async def _attempt(self, link, entry: SafEntry) -> None:
        from cardswitch.switch.banklink import LinkDown, LinkTimeout

        q = self.queue
        try:
            pan = open_pan(entry.pan_sealed, self._key, entry.rrn) if entry.kind == STAND_IN else ""
            msg = advice_message(entry, switch_inst=self.switch_inst,
                                 issuer_inst=self.issuer_insts.get(entry.bank_id, ""), pan=pan)
        except Exception as e:
            q.begin(entry)
            q.done(entry, PARKED, self.clock(), f"cannot build the advice: {e}")
            self._parked(entry, "unbuildable")
            return
        q.begin(entry)
        try:
            resp = await link.request(msg, self.timeout_s, stan=entry.stan)
        except LinkDown as e:
            q.done(entry, NOT_SENT, self.clock(), str(e))
            return
        except LinkTimeout as e:
            self.retries += 1
            q.done(entry, RETRY, self.clock(), str(e))
            self._persist(entry)
            return
        except asyncio.CancelledError:
            q.done(entry, NOT_SENT, self.clock(), "stopped")
            raise
        except EncodeError as e:                 # the codec refused it: it never passes
            q.done(entry, PARKED, self.clock(), f"cannot send: {e}")
            self._parked(entry, "unsendable")
            return
        except Exception as e:                   # e.g. no MAC while the HSM is away: later
            log.warning("bank %s: %s not sent: %s: %s", entry.bank_id, entry.describe(), type(e).__name__, e)
            q.done(entry, NOT_SENT, self.clock(), f"not sent: {type(e).__name__}: {e}")
            return
        rc = resp.get(F.RESPONSE_CODE, "")
        outcome = outcome_of(entry, rc)
        q.done(entry, outcome, self.clock(), "" if outcome == DELIVERED else f"answered {rc}")
        if outcome == DELIVERED:
            self.delivered += 1
            log.info("delivered %s (39=%s, attempt %d)", entry.describe(), rc, entry.attempts)
            self._persist(entry)
            self._notify()
        elif outcome == PARKED:
            self._parked(entry, "refused")
        else:
            self.retries += 1
            self._persist(entry)

    def _persist(self, entry: SafEntry) -> None:
        entry.updated_at = utc_iso(self.clock())
        self.journal.saf_update(entry)

    def _expire(self) -> None:
        for e in self.queue.expire(self.clock()):
            self._parked(e, "max_age")

    def _parked(self, entry: SafEntry, reason: str) -> None:
        self.parked += 1
        self._persist(entry)
        self._notify()
        self.alert(reason, {
            "bank": entry.bank_id, "advice": entry.id, "kind": entry.kind, "txn": entry.txn_id,
            "leg": entry.leg, "stan": entry.stan, "rrn": entry.rrn, "amount": entry.amount,
            "attempts": entry.attempts, "age_s": round(self.clock() - entry.created_ts, 1),
            "error": entry.last_error,
        })

    def alert(self, reason: str, detail: dict) -> None:
        """Error log line, counters, and the ``on_alert`` hook."""
        self.alerts += 1
        self.alert_counts[reason] = self.alert_counts.get(reason, 0) + 1
        detail = {"reason": reason, **detail}
        log.error("store-and-forward alert: %s advice #%s to %s parked (%s): %s", detail.get("kind"),
                  detail.get("advice"), detail.get("bank"), reason, detail.get("error"))
        cb = self.on_alert
        if cb is not None:
            try:
                cb(ALERT_KIND, detail)
            except Exception:
                log.exception("on_alert failed")

    # -- late answers -----------------------------------------------------------------------

    def on_late(self, bank_id: str, msg: Message) -> bool:
        """A 0430/0230 that came after its attempt timed out: delivered after all.
        True when it answers a queued advice."""
        entry = self.queue.find(bank_id, msg.get(F.STAN, ""), msg.get(F.RRN, ""))
        if entry is None:
            return False
        rc = msg.get(F.RESPONSE_CODE, "")
        if outcome_of(entry, rc) == DELIVERED and entry.state == QUEUED:
            self.queue.settle(entry)
            if entry.state == DELIVERED:
                self.delivered += 1
                entry.last_error = ""
                log.info("delivered %s (late answer, 39=%s)", entry.describe(), rc)
                self._persist(entry)
                self._notify()
        return True

    # -- stopping -----------------------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Wait (up to ``timeout``) while a bank whose link is up has advices
        that can go within that time (not backing off past it). True when no
        bank that is up has anything left; banks that are down are not waited for."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        if self._changed is None:
            self._changed = asyncio.Event()
        while True:
            left = end - loop.time()
            now = self.clock()
            q = self.queue
            # Banks that can still get something within the time left: link up,
            # a worker, and not backing off past the end (or an attempt under way).
            busy = [b for b in q.banks()
                    if (link := self.links.get(b)) is not None and link.online and b in self._workers
                    and (q.in_flight(b) or q.retry_at(b) <= now + max(left, 0.0))]
            if not busy:
                return not any(self.links.get(b) is not None and self.links[b].online for b in q.banks())
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.05))
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        """Stop the workers; what is still queued stays in the journal for the next start."""
        self._stopped = True
        tasks = list(self._workers.values())
        self._workers.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

