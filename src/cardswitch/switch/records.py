"""What the journal keeps of each transaction: one row per terminal request.

The PAN is kept only masked and as a keyed token; never a PIN block, track
data, CVV or key. Money is int minor units; times are UTC ISO-8601 strings.
"""

from __future__ import annotations

from dataclasses import dataclass


class Status:
    PENDING = "pending"      # written ahead, no outcome yet (sent to an issuer, or being processed)
    APPROVED = "approved"
    DECLINED = "declined"
    TIMEOUT = "timeout"      # issuer did not answer in time; terminal got 91
    ERROR = "error"          # the switch failed (96)


class Cancel:
    """Set on an approved original when something later undoes it."""

    NONE = ""
    REVERSED = "reversed"
    VOIDED = "voided"
    COMPLETED = "completed"  # a pre-authorization whose completion arrived


class Kind:
    PREAUTH = "preauth"
    PURCHASE = "purchase"
    COMPLETION = "completion"
    WITHDRAWAL = "withdrawal"
    VOID = "void"
    REFUND = "refund"
    DEPOSIT = "deposit"
    BALANCE = "balance"
    TRANSFER = "transfer"
    BILL_PAYMENT = "bill_payment"
    REVERSAL = "reversal"
    BATCH_CLOSE = "batch_close"
    BATCH_UPLOAD = "batch_upload"
    NETWORK = "network"


# Batch totals (wire.md 6): what each kind adds to the terminal's batch.
DEBIT_KINDS = frozenset({Kind.PURCHASE, Kind.COMPLETION, Kind.WITHDRAWAL, Kind.BILL_PAYMENT, Kind.TRANSFER})
CREDIT_KINDS = frozenset({Kind.REFUND, Kind.DEPOSIT})


@dataclass(slots=True)
class TxnRecord:
    id: int
    business_date: str            # YYYY-MM-DD
    received_at: str              # UTC, ISO-8601 with microseconds and Z
    mti: str                      # as the terminal sent it
    proc: str                     # field 3
    kind: str                     # Kind.*
    amount: int                   # minor units (0 when absent)
    currency: str
    terminal_id: str
    merchant_id: str
    stan: str                     # terminal's field 11
    transmitted: str              # terminal's field 7 (MMDDhhmmss UTC)
    batch: str                    # field 60
    pan_masked: str = ""
    pan_token: str = ""
    acquirer_id: str = ""         # bank id acquiring the merchant
    issuer_id: str = ""           # bank id of the card's issuer ("" when unrouted)
    to_issuer_id: str = ""        # transfer: receiving card's issuer
    to_pan_masked: str = ""
    to_pan_token: str = ""
    rrn: str = ""
    orig_id: int | None = None    # reversal, void, completion: the original's id
    status: str = Status.PENDING
    response_code: str = ""
    auth_code: str = ""
    issuer_stan: str = ""         # field 11 the switch used towards the issuer
    issuer_transmitted: str = ""  # field 7 the switch used towards the issuer
    to_issuer_stan: str = ""      # transfer credit leg (0200 28xxxx) at the receiving issuer
    to_issuer_transmitted: str = ""
    to_auth_code: str = ""
    completed_at: str = ""
    latency_us: int = 0
    cancelled: str = Cancel.NONE
    cancelled_by: int | None = None
    stand_in: bool = False        # approved by the switch on the issuer's behalf (0220 advice queued)
    balances: str = ""            # field 54 as answered (no secret: lets a repeat get the same answer)
    late_response_code: str = ""  # the issuer's answer that came after the timeout (the txn stays 91, reversed)

    @property
    def approved(self) -> bool:
        return self.status == Status.APPROVED
