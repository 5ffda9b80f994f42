"""The transaction's decision steps, pure: no sockets, no awaiting.

Each step looks at the transaction in hand (``Txn``) and the switch's view of
the world (``Context``) and either returns ``None`` (go on) or the response
code to stop with. ``cardswitch.switch.pipeline`` strings them together; the
unit tests call them one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from cardswitch.config import Network
from cardswitch.iso8583.constants import (
    CONDITION_COMPLETION,
    RC,
    F,
    TxnType,
    is_repeat,
)
from cardswitch.iso8583.dialect import Message
from cardswitch.iso8583.fields import OriginalData, parse_field90
from cardswitch.iso8583.validate import format_errors, missing_fields
from cardswitch.merchants.registry import Registry, TerminalInfo, check_transaction
from cardswitch.pan import luhn_ok, mask_pan, pan_from_track2, pan_token
from cardswitch.routing.bintable import BinTable, Route
from cardswitch.switch.clock import iso_utc
from cardswitch.switch.index import BatchTotals, TxnIndex
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord

# Fields every request of a flow must carry (wire.md 3); 30 when one is missing.
FINANCIAL_REQUIRED = (F.PROC, F.AMOUNT, F.TRANSMISSION_DT, F.STAN, F.LOCAL_TIME, F.LOCAL_DATE,
                      F.ENTRY_MODE, F.CONDITION_CODE, F.TERMINAL_ID, F.MERCHANT_ID, F.CURRENCY,
                      F.BATCH_NUMBER)
BALANCE_REQUIRED = tuple(f for f in FINANCIAL_REQUIRED if f != F.AMOUNT)
REVERSAL_REQUIRED = (F.TRANSMISSION_DT, F.STAN, F.TERMINAL_ID, F.MERCHANT_ID, F.ORIGINAL_DATA)
BATCH_CLOSE_REQUIRED = (F.PROC, F.TRANSMISSION_DT, F.STAN, F.TERMINAL_ID, F.MERCHANT_ID,
                        F.BATCH_NUMBER, F.CREDITS_NUMBER, F.CREDITS_AMOUNT, F.DEBITS_NUMBER,
                        F.DEBITS_AMOUNT)
UPLOAD_REQUIRED = (F.PROC, F.AMOUNT, F.STAN, F.TERMINAL_ID, F.MERCHANT_ID, F.BATCH_NUMBER)
NETWORK_REQUIRED = (F.TRANSMISSION_DT, F.STAN, F.NETWORK_MGMT_CODE)

# Processing code positions 1-2 of a 0200 -> what it is.
_FIN_KINDS = {
    TxnType.PURCHASE: Kind.PURCHASE,
    TxnType.WITHDRAWAL: Kind.WITHDRAWAL,
    TxnType.VOID: Kind.VOID,
    TxnType.REFUND: Kind.REFUND,
    TxnType.DEPOSIT: Kind.DEPOSIT,
    TxnType.BALANCE: Kind.BALANCE,
    TxnType.BALANCE_ALT: Kind.BALANCE,
    TxnType.TRANSFER: Kind.TRANSFER,
    TxnType.BILL_PAYMENT: Kind.BILL_PAYMENT,
}
NEEDS_ORIGINAL = frozenset({Kind.VOID, Kind.COMPLETION})


@dataclass(slots=True)
class Context:
    """What the steps consult: built once, shared by every transaction."""

    network: Network
    registry: Registry
    bins: BinTable
    index: TxnIndex
    token_secret: bytes
    business_date: str                # YYYY-MM-DD


@dataclass(slots=True)
class Txn:
    """One request on its way through the steps. Holds the clear PAN only in memory."""

    req: Message
    mti: str
    received: datetime
    t0: float
    kind: str = ""
    info: TerminalInfo | None = None
    pan: str = ""
    expiry: str = ""
    amount: int = 0
    route: Route | None = None
    to_pan: str = ""
    to_route: Route | None = None
    original: TxnRecord | None = None
    orig_data: OriginalData | None = None
    record: TxnRecord | None = None
    replay_of: TxnRecord | None = None   # a repeat of something already received
    extra: Message = field(default_factory=dict)   # response fields from the issuer (38, 54)
    written_ahead: bool = False          # its row is in the journal (pending) before any outcome

    @property
    def terminal_id(self) -> str:
        return self.req.get(F.TERMINAL_ID, "")


# -- classification ------------------------------------------------------------


def classify(t: Txn) -> str | None:
    """Name the transaction from MTI class, processing code, 25 and 90; 12 if none."""
    cls = t.mti[:3]
    if cls == "040":
        t.kind = Kind.REVERSAL               # named by its MTI; field 90 finds the original
        return None
    proc = t.req.get(F.PROC, "")
    if len(proc) != 6 or not proc.isdigit():
        return RC.FORMAT_ERROR               # no processing code to name it by
    tt = proc[:2]
    kind = ""
    if cls == "010":
        kind = Kind.PREAUTH if tt == TxnType.PURCHASE else ""
    elif cls == "020":
        kind = _FIN_KINDS.get(tt, "")
        if kind == Kind.PURCHASE and t.req.get(F.CONDITION_CODE) == CONDITION_COMPLETION \
                and F.ORIGINAL_DATA in t.req:
            kind = Kind.COMPLETION
    t.kind = kind
    return None if kind else RC.INVALID_TRANSACTION


def required_fields(kind: str) -> tuple[str, ...]:
    if kind == Kind.BALANCE:
        return BALANCE_REQUIRED
    if kind == Kind.REVERSAL:
        return REVERSAL_REQUIRED
    return FINANCIAL_REQUIRED


# -- steps ---------------------------------------------------------------------


def validate(t: Txn, ctx: Context) -> str | None:
    """30 for a missing mandatory field or a field that breaks its format."""
    req = t.req
    if format_errors(req):
        return RC.FORMAT_ERROR
    if missing_fields(req, required_fields(t.kind)):
        return RC.FORMAT_ERROR
    if t.kind not in (Kind.REVERSAL,) and F.PAN not in req and F.TRACK2 not in req:
        return RC.FORMAT_ERROR
    if t.kind in NEEDS_ORIGINAL and F.ORIGINAL_DATA not in req:
        return RC.FORMAT_ERROR
    if t.kind == Kind.TRANSFER and not req.get(F.ACCOUNT_2):
        return RC.FORMAT_ERROR
    if F.ORIGINAL_DATA in req:
        try:
            t.orig_data = parse_field90(req[F.ORIGINAL_DATA])
        except ValueError:
            return RC.FORMAT_ERROR
    return None


def identify_terminal(t: Txn, ctx: Context) -> str | None:
    """03: unknown or disabled merchant, unknown terminal, terminal not of that merchant."""
    info, rc = ctx.registry.check_terminal(t.req.get(F.TERMINAL_ID, ""), t.req.get(F.MERCHANT_ID, ""))
    if info is None or rc != RC.APPROVED:
        return rc or RC.INVALID_MERCHANT
    t.info = info
    if t.record is not None:
        t.record.acquirer_id = info.acquirer.id
    return None


def check_allowed(t: Txn, ctx: Context) -> str | None:
    """58: not for this kind of terminal; 12: not at this merchant's MCC."""
    assert t.info is not None
    # The registry's MCC, never the request's field 18: a terminal must not be
    # able to make itself an ATM merchant.
    rc = check_transaction(t.info, t.kind)
    return None if rc == RC.APPROVED else rc


def read_card(t: Txn, ctx: Context) -> str | None:
    """PAN from field 2 or track 2; 14 when it fails Luhn."""
    req = t.req
    pan = req.get(F.PAN, "")
    expiry = req.get(F.EXPIRY, "")
    if not pan and F.TRACK2 in req:
        parsed = pan_from_track2(req[F.TRACK2])
        if parsed is None:
            return RC.FORMAT_ERROR
        pan, track_expiry = parsed
        expiry = expiry or track_expiry
    if not luhn_ok(pan):
        return RC.INVALID_CARD
    t.pan, t.expiry = pan, expiry
    if t.kind == Kind.TRANSFER:
        t.to_pan = req[F.ACCOUNT_2]
    return None


def check_amount(t: Txn, ctx: Context) -> str | None:
    """13: a zero amount where money must move."""
    t.amount = int(t.req.get(F.AMOUNT) or 0)
    if t.kind != Kind.BALANCE and t.amount <= 0:
        return RC.INVALID_AMOUNT
    return None


def start_record(t: Txn, ctx: Context, record_id: int) -> TxnRecord:
    """The journal row of this request, as far as it is known now."""
    req = t.req
    acquirer = t.info.acquirer.id if t.info else ""
    rec = TxnRecord(
        id=record_id,
        business_date=ctx.business_date,
        received_at=iso_utc(t.received),
        mti=t.mti,
        proc=req.get(F.PROC, ""),
        kind=t.kind,
        amount=t.amount,
        currency=req.get(F.CURRENCY, ""),
        terminal_id=req.get(F.TERMINAL_ID, ""),
        merchant_id=req.get(F.MERCHANT_ID, ""),
        stan=req.get(F.STAN, ""),
        transmitted=req.get(F.TRANSMISSION_DT, ""),
        batch=req.get(F.BATCH_NUMBER, ""),
        acquirer_id=acquirer,
    )
    # As much as the request tells, even when it is about to be declined.
    pan = t.pan or req.get(F.PAN, "")
    if not pan and F.TRACK2 in req:
        parsed = pan_from_track2(req[F.TRACK2])
        pan = parsed[0] if parsed else ""
    if pan.isdigit():
        rec.pan_masked = mask_pan(pan)
        rec.pan_token = pan_token(pan, ctx.token_secret)
    to_pan = t.to_pan or (req.get(F.ACCOUNT_2, "") if t.kind == Kind.TRANSFER else "")
    if to_pan.isdigit():
        rec.to_pan_masked = mask_pan(to_pan)
        rec.to_pan_token = pan_token(to_pan, ctx.token_secret)
    if not rec.amount and req.get(F.AMOUNT, "").isdigit():
        rec.amount = int(req[F.AMOUNT])
    t.record = rec
    return rec


def detect_duplicate(t: Txn, ctx: Context) -> str | None:
    """94 for the same 41 + 11 + 7 + MTI class again; a repeat (xx1) of a
    request already received is answered as it was (``replay_of``)."""
    req = t.req
    seen = ctx.index.find(req[F.TERMINAL_ID], req[F.STAN], req[F.TRANSMISSION_DT], t.mti)
    if seen is None:
        return None
    if is_repeat(t.mti):
        t.replay_of = seen
        return None
    return RC.DUPLICATE


def check_batch(t: Txn, ctx: Context) -> str | None:
    """12: the request names a batch the terminal already closed."""
    if ctx.index.is_closed(t.req[F.TERMINAL_ID], t.req[F.BATCH_NUMBER]):
        return RC.INVALID_TRANSACTION
    return None


def find_original(t: Txn, ctx: Context) -> str | None:
    """25: a void, completion or reversal whose original this terminal never sent
    (found by field 90 and 41, never by the request's own STAN)."""
    if t.kind not in NEEDS_ORIGINAL and t.kind != Kind.REVERSAL:
        return None
    od = t.orig_data
    assert od is not None
    orig = ctx.index.find(t.req[F.TERMINAL_ID], od.stan, od.transmitted, od.mti)
    if orig is None:
        return RC.ORIGINAL_NOT_FOUND
    t.original = orig
    if t.record is not None:
        t.record.orig_id = orig.id
    if t.kind == Kind.REVERSAL:
        return None
    if t.record is not None and orig.pan_token != t.record.pan_token:
        return RC.ORIGINAL_NOT_FOUND
    if t.kind == Kind.VOID:
        if orig.kind != Kind.PURCHASE or orig.status != Status.APPROVED \
                or orig.cancelled != Cancel.NONE or orig.batch != t.req[F.BATCH_NUMBER]:
            return RC.ORIGINAL_NOT_FOUND
        if t.amount != orig.amount:
            return RC.INVALID_AMOUNT
    elif t.kind == Kind.COMPLETION:
        if orig.kind != Kind.PREAUTH or orig.status != Status.APPROVED or orig.cancelled != Cancel.NONE:
            return RC.ORIGINAL_NOT_FOUND
        if t.amount > orig.amount:
            return RC.INVALID_AMOUNT
    return None


def route(t: Txn, ctx: Context) -> str | None:
    """15: no issuer for the card's BIN; 52: no issuer for a transfer's target card."""
    r = ctx.bins.lookup(t.pan)
    if r is None:
        return RC.NO_SUCH_ISSUER
    t.route = r
    if t.record is not None:
        t.record.issuer_id = r.bank_id
    if t.kind == Kind.TRANSFER:
        if not luhn_ok(t.to_pan):
            return RC.NO_SUCH_ACCOUNT
        tr = ctx.bins.lookup(t.to_pan)
        if tr is None:
            return RC.NO_SUCH_ACCOUNT
        t.to_route = tr
        if t.record is not None:
            t.record.to_issuer_id = tr.bank_id
    return None


# -- batch close (wire.md 6) ---------------------------------------------------


def terminal_totals(req: Message) -> BatchTotals:
    return BatchTotals(
        credits_number=int(req[F.CREDITS_NUMBER]),
        credits_amount=int(req[F.CREDITS_AMOUNT]),
        debits_number=int(req[F.DEBITS_NUMBER]),
        debits_amount=int(req[F.DEBITS_AMOUNT]),
    )


def totals_fields(tot: BatchTotals) -> Message:
    return {
        F.CREDITS_NUMBER: f"{tot.credits_number:010d}",
        F.CREDITS_AMOUNT: f"{tot.credits_amount:016d}",
        F.DEBITS_NUMBER: f"{tot.debits_number:010d}",
        F.DEBITS_AMOUNT: f"{tot.debits_amount:016d}",
    }
