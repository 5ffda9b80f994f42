"""Format checks of a decoded message (wire.md 4): content, not presence rules.

The codec only enforces lengths; here each field's content is checked against
its format (digits, possible dates, hex, track 2 separator). A request with
any error is answered 39 = 30 with the fields it could read echoed.

Called on every request, so the checks are table-driven and inline: one dict
lookup per field present and, for dates, set lookups instead of parsing.
"""

from __future__ import annotations

from binascii import a2b_hex
from collections.abc import Iterable

from cardswitch.iso8583.constants import F
from cardswitch.iso8583.dialect import Message

__all__ = ["NUMERIC_FIELDS", "format_errors", "invalid_fields", "missing_fields"]

# Fields whose content must be all digits (n in ISO 8583:1987).
NUMERIC_FIELDS = (
    F.PAN, F.PROC, F.AMOUNT, F.TRANSMISSION_DT, F.STAN, F.LOCAL_TIME, F.LOCAL_DATE,
    F.EXPIRY, F.SETTLEMENT_DATE, F.MCC, F.ENTRY_MODE, F.CONDITION_CODE, F.ACQUIRER_ID,
    F.FORWARDER_ID, F.CURRENCY, F.BATCH_NUMBER, F.NETWORK_MGMT_CODE, F.CREDITS_NUMBER,
    F.DEBITS_NUMBER, F.CREDITS_AMOUNT, F.DEBITS_AMOUNT, F.ORIGINAL_DATA, F.RECEIVING_ID,
)

_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)   # February 29 is possible
_MMDD = frozenset(f"{m:02d}{d:02d}" for m in range(1, 13) for d in range(1, _DAYS[m - 1] + 1))
_HHMM = frozenset(f"{h:02d}{m:02d}" for h in range(24) for m in range(60))
_SS = frozenset(f"{s:02d}" for s in range(60))
_MONTHS = frozenset(f"{m:02d}" for m in range(1, 13))
_YY = frozenset(f"{y:02d}" for y in range(100))

# Rule kinds, dispatched inline (a function call per field costs more than the check).
_DIGITS, _DATETIME, _TIME, _DATE, _EXPIRY, _HEX16, _HEX, _TRACK2, _MTI = range(9)

_RULES: dict[str, tuple[int, str]] = {k: (_DIGITS, "must be digits") for k in NUMERIC_FIELDS}
_RULES.update({
    F.MTI: (_MTI, "must be 4 digits"),
    F.TRANSMISSION_DT: (_DATETIME, "must be a date-time MMDDhhmmss"),
    F.LOCAL_TIME: (_TIME, "must be a time hhmmss"),
    F.LOCAL_DATE: (_DATE, "must be a date MMDD"),
    F.SETTLEMENT_DATE: (_DATE, "must be a date MMDD"),
    F.EXPIRY: (_EXPIRY, "must be an expiry YYMM"),
    F.PIN_BLOCK: (_HEX16, "must be 16 hex digits"),
    F.MAC: (_HEX16, "must be 16 hex digits"),
    F.MAC_SECONDARY: (_HEX16, "must be 16 hex digits"),
    F.ICC_DATA: (_HEX, "must be hex, an even number of digits"),
    F.TRACK2: (_TRACK2, "must contain a separator '=' or 'D'"),
})
_KIND = {k: kind for k, (kind, _) in _RULES.items()}


def _is_hex(v: str) -> bool:
    try:
        a2b_hex(v)   # an even number of hex digits, nothing else
    except ValueError:
        return False
    return True


def invalid_fields(msg: Message) -> list[str]:
    """The keys of the fields whose content breaks their format ("t" for the MTI), in message order."""
    bad: list[str] = []
    kinds = _KIND
    for k, v in msg.items():
        kind = kinds.get(k)
        if kind is None:
            continue
        if type(v) is not str:
            bad.append(k)
        elif kind == _DIGITS:
            if not (v.isdigit() and v.isascii()):
                bad.append(k)
        elif kind == _DATETIME:
            if not (len(v) == 10 and v[:4] in _MMDD and v[4:8] in _HHMM and v[8:] in _SS):
                bad.append(k)
        elif kind == _TIME:
            if not (len(v) == 6 and v[:4] in _HHMM and v[4:] in _SS):
                bad.append(k)
        elif kind == _DATE:
            if v not in _MMDD:
                bad.append(k)
        elif kind == _EXPIRY:
            if not (len(v) == 4 and v[:2] in _YY and v[2:] in _MONTHS):
                bad.append(k)
        elif kind == _HEX16:
            if not (len(v) == 16 and v.isascii() and _is_hex(v)):
                bad.append(k)
        elif kind == _HEX:
            if not (v.isascii() and _is_hex(v)):
                bad.append(k)
        elif kind == _TRACK2:
            if "=" not in v and "D" not in v:
                bad.append(k)
        elif not (len(v) == 4 and v.isdigit() and v.isascii()):   # _MTI
            bad.append(k)
    return bad


def format_errors(msg: Message) -> list[str]:
    """One line per field whose content breaks its format, e.g. ``"field 4: must be digits"``.

    Empty when the message is well formed. Fields without a format rule
    (alphanumeric ones such as 37, 41, 42) are not judged.
    """
    return [f"MTI: {_RULES[k][1]}" if k == F.MTI else f"field {k}: {_RULES[k][1]}"
            for k in invalid_fields(msg)]


def missing_fields(msg: Message, required: Iterable[str]) -> list[str]:
    """The keys of ``required`` that ``msg`` lacks, in the order given."""
    return [k for k in required if k not in msg]
