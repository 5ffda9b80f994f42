"""Named ISO 8583 facts: field keys, MTIs, processing codes, response codes.

Field keys are the strings pyiso8583 uses as dict keys ("t" for the MTI,
"2" for the PAN, ...), so a decoded message is indexed as ``msg[F.PAN]``.
"""

from __future__ import annotations

from enum import Enum


class F:
    """Field keys of a decoded message (pyiso8583 naming)."""

    MTI = "t"
    PRIMARY_BITMAP = "p"
    SECONDARY_BITMAP = "1"
    PAN = "2"
    PROC = "3"
    AMOUNT = "4"
    TRANSMISSION_DT = "7"
    STAN = "11"
    LOCAL_TIME = "12"
    LOCAL_DATE = "13"
    EXPIRY = "14"
    SETTLEMENT_DATE = "15"
    MCC = "18"
    ENTRY_MODE = "22"
    CONDITION_CODE = "25"
    ACQUIRER_ID = "32"
    FORWARDER_ID = "33"
    TRACK2 = "35"
    RRN = "37"
    AUTH_CODE = "38"
    RESPONSE_CODE = "39"
    TERMINAL_ID = "41"
    MERCHANT_ID = "42"
    CARD_ACCEPTOR_NAME = "43"
    ADDITIONAL_DATA = "48"
    CURRENCY = "49"
    PIN_BLOCK = "52"
    ADDITIONAL_AMOUNTS = "54"
    ICC_DATA = "55"
    BATCH_NUMBER = "60"
    BILL_DATA = "62"
    MAC = "64"
    NETWORK_MGMT_CODE = "70"
    CREDITS_NUMBER = "74"
    DEBITS_NUMBER = "76"
    CREDITS_AMOUNT = "86"
    DEBITS_AMOUNT = "88"
    ORIGINAL_DATA = "90"
    RECEIVING_ID = "100"
    ACCOUNT_2 = "103"
    MAC_SECONDARY = "128"


# Fields whose values are binary on the wire in the binary dialect and hex
# text in the ASCII dialect. Inside cardswitch they are always upper-case hex.
BINARY_FIELDS = (F.PIN_BLOCK, F.ICC_DATA, F.MAC, F.MAC_SECONDARY)

# Echoed unchanged from a terminal request into its response (wire.md 4).
ECHOED_FIELDS = (
    F.PAN, F.PROC, F.AMOUNT, F.TRANSMISSION_DT, F.STAN, F.LOCAL_TIME,
    F.LOCAL_DATE, F.TERMINAL_ID, F.MERCHANT_ID, F.CURRENCY, F.BATCH_NUMBER,
    F.ORIGINAL_DATA,
)


class MTI:
    AUTH_REQUEST = "0100"
    AUTH_RESPONSE = "0110"
    FIN_REQUEST = "0200"
    FIN_REQUEST_REPEAT = "0201"
    FIN_RESPONSE = "0210"
    FIN_ADVICE = "0220"
    FIN_ADVICE_REPEAT = "0221"
    FIN_ADVICE_RESPONSE = "0230"
    BATCH_UPLOAD = "0320"
    BATCH_UPLOAD_RESPONSE = "0330"
    REVERSAL_REQUEST = "0400"
    REVERSAL_REQUEST_REPEAT = "0401"
    REVERSAL_RESPONSE = "0410"
    REVERSAL_ADVICE = "0420"
    REVERSAL_ADVICE_REPEAT = "0421"
    REVERSAL_ADVICE_RESPONSE = "0430"
    RECONCILE_REQUEST = "0500"
    RECONCILE_RESPONSE = "0510"
    NETWORK_REQUEST = "0800"
    NETWORK_RESPONSE = "0810"


def response_mti(mti: str) -> str:
    """0200 -> 0210, 0201 -> 0210, 0420 -> 0430: the response to a request or advice."""
    return mti[:2] + str(int(mti[2]) + 1) + "0"


def mti_class(mti: str) -> str:
    """The message class (first three digits, with repeats folded onto originals)."""
    return mti[:3]


def is_repeat(mti: str) -> bool:
    return mti[3:4] == "1"


def is_response(mti: str) -> bool:
    return len(mti) == 4 and mti[2] in "13"


class TxnType(str, Enum):
    """Positions 1-2 of the processing code (field 3)."""

    PURCHASE = "00"
    WITHDRAWAL = "01"
    VOID = "02"
    REFUND = "20"
    DEPOSIT = "21"
    TRANSFER_CREDIT = "28"   # the credit leg of a transfer, switch to receiving issuer
    BALANCE = "30"
    BALANCE_ALT = "31"
    TRANSFER = "40"
    BILL_PAYMENT = "50"
    BATCH_CLOSE = "92"
    BATCH_UPLOAD_TRAILER = "96"


PROC_BATCH_CLOSE = "920000"
PROC_BATCH_UPLOAD_TRAILER = "960000"

# Field 25 value marking a pre-authorization completion.
CONDITION_COMPLETION = "06"


class NetMgmt:
    """Field 70 codes of 0800 messages."""

    SIGN_ON = "001"
    SIGN_OFF = "002"
    KEY_CHANGE = "101"
    ECHO = "301"


class RC:
    """Response codes (field 39), wire.md 5."""

    APPROVED = "00"
    INVALID_MERCHANT = "03"
    DO_NOT_HONOUR = "05"
    INVALID_TRANSACTION = "12"
    INVALID_AMOUNT = "13"
    INVALID_CARD = "14"
    NO_SUCH_ISSUER = "15"
    ORIGINAL_NOT_FOUND = "25"
    FORMAT_ERROR = "30"
    LOST_CARD = "41"
    STOLEN_CARD = "43"
    INSUFFICIENT_FUNDS = "51"
    NO_SUCH_ACCOUNT = "52"
    EXPIRED_CARD = "54"
    INCORRECT_PIN = "55"
    NOT_PERMITTED_CARDHOLDER = "57"
    NOT_PERMITTED_TERMINAL = "58"
    EXCEEDS_WITHDRAWAL_LIMIT = "61"
    SECURITY_VIOLATION = "63"
    EXCEEDS_WITHDRAWAL_FREQUENCY = "65"
    RESPONSE_TOO_LATE = "68"
    PIN_TRIES_EXCEEDED = "75"
    ISSUER_INOPERATIVE = "91"
    DUPLICATE = "94"
    RECONCILE_ERROR = "95"
    SYSTEM_MALFUNCTION = "96"


RC_TEXT = {
    RC.APPROVED: "approved",
    RC.INVALID_MERCHANT: "invalid merchant",
    RC.DO_NOT_HONOUR: "do not honour",
    RC.INVALID_TRANSACTION: "invalid transaction",
    RC.INVALID_AMOUNT: "invalid amount",
    RC.INVALID_CARD: "invalid card number",
    RC.NO_SUCH_ISSUER: "no such issuer",
    RC.ORIGINAL_NOT_FOUND: "original not found",
    RC.FORMAT_ERROR: "format error",
    RC.LOST_CARD: "lost card",
    RC.STOLEN_CARD: "stolen card",
    RC.INSUFFICIENT_FUNDS: "not sufficient funds",
    RC.NO_SUCH_ACCOUNT: "no such account",
    RC.EXPIRED_CARD: "expired card",
    RC.INCORRECT_PIN: "incorrect PIN",
    RC.NOT_PERMITTED_CARDHOLDER: "not permitted to cardholder",
    RC.NOT_PERMITTED_TERMINAL: "not permitted to terminal",
    RC.EXCEEDS_WITHDRAWAL_LIMIT: "exceeds withdrawal limit",
    RC.SECURITY_VIOLATION: "security violation",
    RC.EXCEEDS_WITHDRAWAL_FREQUENCY: "exceeds withdrawal frequency",
    RC.RESPONSE_TOO_LATE: "response received too late",
    RC.PIN_TRIES_EXCEEDED: "PIN tries exceeded",
    RC.ISSUER_INOPERATIVE: "issuer inoperative",
    RC.DUPLICATE: "duplicate transmission",
    RC.RECONCILE_ERROR: "reconcile error",
    RC.SYSTEM_MALFUNCTION: "system malfunction",
}
