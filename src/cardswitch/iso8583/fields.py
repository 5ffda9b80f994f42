"""Structured fields: 90 original data elements, 54 additional amounts, 55 ICC TLV.

Pure functions over the text values of a Message. Every bad value raises
``ValueError`` naming the field and the problem (never anything else, whatever
the input), so a caller can answer 30 with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "AdditionalAmount",
    "AMOUNT_AVAILABLE",
    "AMOUNT_LEDGER",
    "OriginalData",
    "build_tlv",
    "format_field54",
    "format_field90",
    "parse_field54",
    "parse_field90",
    "parse_tlv",
    "tlv_dict",
]


def _digits(v: object) -> bool:
    return isinstance(v, str) and v.isascii() and v.isdigit()


# ----------------------------------------------------------------- field 90

FIELD90_LEN = 42
_INSTITUTION_ID_LEN = 11


@dataclass(frozen=True, slots=True)
class OriginalData:
    """Field 90: what identifies the original of a reversal, void or completion.

    ``acquirer_id``/``forwarder_id`` are as on the wire: 11 digits, zero-filled
    left (``parse_field90`` keeps them so; ``format_field90`` fills shorter ones).
    """

    mti: str           # original MTI, 4 digits
    stan: str          # original field 11, 6 digits
    transmitted: str   # original field 7, MMDDhhmmss
    acquirer_id: str = ""
    forwarder_id: str = ""

    def format(self) -> str:
        return format_field90(self.mti, self.stan, self.transmitted, self.acquirer_id, self.forwarder_id)


def format_field90(
    mti: str | OriginalData,
    stan: str = "",
    transmitted: str = "",
    acquirer_id: str = "",
    forwarder_id: str = "",
) -> str:
    """42 digits: MTI 4 + STAN 6 + field 7 10 + acquirer 11 + forwarder 11 (zero-filled left).

    Accepts an :class:`OriginalData` as the only argument too.
    """
    if isinstance(mti, OriginalData):
        return mti.format()
    for name, value, size in (("MTI", mti, 4), ("STAN", stan, 6), ("transmission date-time", transmitted, 10)):
        if not (_digits(value) and len(value) == size):
            raise ValueError(f"field 90: original {name} must be {size} digits, got {value!r}")
    ids = []
    for name, value in (("acquirer", acquirer_id), ("forwarder", forwarder_id)):
        if value is None or value == "":
            value = ""
        elif not (_digits(value) and len(value) <= _INSTITUTION_ID_LEN):
            raise ValueError(f"field 90: {name} institution ID must be up to 11 digits, got {value!r}")
        ids.append(value.zfill(_INSTITUTION_ID_LEN))
    return mti + stan + transmitted + ids[0] + ids[1]


def parse_field90(s: str) -> OriginalData:
    if not isinstance(s, str):
        raise ValueError(f"field 90: expected 42 digits, got {type(s).__name__}")
    if len(s) != FIELD90_LEN:
        raise ValueError(f"field 90: expected 42 digits, got {len(s)} characters")
    if not _digits(s):
        raise ValueError("field 90: not all digits")
    return OriginalData(s[0:4], s[4:10], s[10:20], s[20:31], s[31:42])


# ----------------------------------------------------------------- field 54

AMOUNT_LEDGER = "01"
AMOUNT_AVAILABLE = "02"
_ENTRY_LEN = 20
_MAX_AMOUNT = 10**12 - 1


@dataclass(frozen=True, slots=True)
class AdditionalAmount:
    """One 20-character entry of field 54. ``amount`` in minor units, negative = debit balance."""

    account_type: str   # 2 digits, e.g. "00" default, "10" savings, "20" cheque, "30" credit
    amount_type: str    # 2 digits: "01" ledger, "02" available
    currency: str       # ISO 4217 numeric, 3 digits
    amount: int


def format_field54(entries: Iterable[AdditionalAmount]) -> str:
    """Entries as field 54: account type 2 + amount type 2 + currency 3 + C/D + amount 12 each."""
    out = []
    for e in entries:
        if not isinstance(e, AdditionalAmount):
            raise ValueError(f"field 54: expected AdditionalAmount, got {type(e).__name__}")
        for name, value, size in (("account type", e.account_type, 2), ("amount type", e.amount_type, 2),
                                  ("currency", e.currency, 3)):
            if not (_digits(value) and len(value) == size):
                raise ValueError(f"field 54: {name} must be {size} digits, got {value!r}")
        amount = e.amount
        if type(amount) is not int:   # bool or float would be a bug upstream
            raise ValueError(f"field 54: amount must be an int of minor units, got {type(amount).__name__}")
        if abs(amount) > _MAX_AMOUNT:
            raise ValueError(f"field 54: amount {amount} does not fit 12 digits")
        out.append(f"{e.account_type}{e.amount_type}{e.currency}{'D' if amount < 0 else 'C'}{abs(amount):012d}")
    return "".join(out)


def parse_field54(s: str) -> list[AdditionalAmount]:
    if not isinstance(s, str):
        raise ValueError(f"field 54: expected text, got {type(s).__name__}")
    if len(s) % _ENTRY_LEN:
        raise ValueError(f"field 54: length {len(s)} is not a multiple of {_ENTRY_LEN}")
    out = []
    for k in range(0, len(s), _ENTRY_LEN):
        e = s[k:k + _ENTRY_LEN]
        n = k // _ENTRY_LEN + 1
        if not _digits(e[:7]):
            raise ValueError(f"field 54: entry {n}: account type, amount type and currency must be digits")
        sign = e[7]
        if sign not in ("C", "D"):
            raise ValueError(f"field 54: entry {n}: sign must be C or D, got {sign!r}")
        if not _digits(e[8:]):
            raise ValueError(f"field 54: entry {n}: amount must be 12 digits")
        amount = int(e[8:])
        out.append(AdditionalAmount(e[0:2], e[2:4], e[4:7], -amount if sign == "D" else amount))
    return out


# ----------------------------------------------------------------- field 55

_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def _hex_bytes(h: object, what: str) -> bytes:
    if not isinstance(h, str):
        raise ValueError(f"{what}: expected hex text, got {type(h).__name__}")
    if len(h) % 2:
        raise ValueError(f"{what}: odd number of hex digits ({len(h)})")
    if not _HEXDIGITS.issuperset(h):
        raise ValueError(f"{what}: not hex")
    return bytes.fromhex(h)


def parse_tlv(h: str) -> list[tuple[str, str]]:
    """BER-TLV (EMV field 55) as ``[(tag_hex, value_hex), ...]`` in order, upper-case hex.

    Multi-byte tags and long-form lengths (up to 4 length bytes) are read;
    constructed tags keep their value raw (call ``parse_tlv`` on it to go
    down). ``00`` padding between objects is skipped (EMV Book 3 annex B).
    """
    data = _hex_bytes(h, "field 55")
    out: list[tuple[str, str]] = []
    i, n = 0, len(data)
    while i < n:
        if data[i] == 0x00:
            i += 1
            continue
        start = i
        if data[i] & 0x1F == 0x1F:   # more tag bytes follow, each with bit 8 set but the last
            i += 1
            while i < n and data[i] & 0x80:
                i += 1
            if i >= n:
                raise ValueError(f"field 55: tag at byte {start} is truncated")
        i += 1
        tag = data[start:i]
        if i >= n:
            raise ValueError(f"field 55: tag {tag.hex().upper()} has no length")
        first = data[i]
        i += 1
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise ValueError(f"field 55: tag {tag.hex().upper()}: indefinite length is not allowed")
        else:
            k = first & 0x7F
            if k > 4:
                raise ValueError(f"field 55: tag {tag.hex().upper()}: {k} length bytes")
            if i + k > n:
                raise ValueError(f"field 55: tag {tag.hex().upper()}: length is truncated")
            length = int.from_bytes(data[i:i + k], "big")
            i += k
        if i + length > n:
            raise ValueError(
                f"field 55: tag {tag.hex().upper()}: value of {length} bytes, only {n - i} left")
        out.append((tag.hex().upper(), data[i:i + length].hex().upper()))
        i += length
    return out


def tlv_dict(h: str) -> dict[str, str]:
    """``parse_tlv`` as a dict (the last wins if a tag repeats)."""
    return dict(parse_tlv(h))


def _check_tag(tag: bytes, text: str) -> None:
    if not tag:
        raise ValueError("field 55: empty tag")
    multi = tag[0] & 0x1F == 0x1F
    if not multi:
        if len(tag) != 1:
            raise ValueError(f"field 55: tag {text!r}: a one-byte tag cannot have more bytes")
        return
    if len(tag) < 2:
        raise ValueError(f"field 55: tag {text!r}: announces more tag bytes")
    if any(b & 0x80 == 0 for b in tag[1:-1]) or tag[-1] & 0x80:
        raise ValueError(f"field 55: tag {text!r}: malformed multi-byte tag")


def _length_bytes(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    size = (n.bit_length() + 7) // 8
    if size > 4:
        raise ValueError(f"field 55: value of {n} bytes is too long")
    return bytes([0x80 | size]) + n.to_bytes(size, "big")


def build_tlv(items: Iterable[tuple[str, str]] | Mapping[str, str]) -> str:
    """BER-TLV hex (upper case) from ``(tag_hex, value_hex)`` pairs or a mapping, in order.

    Lengths use the shortest form (short below 128 bytes, else 81/82/83/84).
    """
    pairs = items.items() if isinstance(items, Mapping) else items
    out = []
    for pair in pairs:
        try:
            tag_hex, value_hex = pair
        except (TypeError, ValueError):
            raise ValueError(f"field 55: expected (tag, value) pairs, got {pair!r}") from None
        tag = _hex_bytes(tag_hex, "field 55 tag")
        _check_tag(tag, tag_hex)
        if tag[0] == 0x00:
            raise ValueError("field 55: tag 00 is padding, not a tag")
        value = _hex_bytes(value_hex, f"field 55 tag {tag_hex}")
        out.append(tag + _length_bytes(len(value)) + value)
    return b"".join(out).hex().upper()
