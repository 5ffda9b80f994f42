"""MACs on the issuer link (wire.md 7): ISO 9797-1 algorithm 3 under the ZAK.

The MAC covers the encoded message (MTI, bitmaps, every field, with the MAC
field's bit set) up to, not including, the MAC field itself, which is always
the last field: 64, or 128 when the message has a secondary bitmap.
"""

from __future__ import annotations

import hmac

from cardswitch.crypto.mac import mac_alg3
from cardswitch.iso8583.constants import F
from cardswitch.iso8583.dialect import Dialect, Message


def mac_field_of(msg: Message) -> str | None:
    """The MAC field a message carries, if any."""
    if F.MAC_SECONDARY in msg:
        return F.MAC_SECONDARY
    if F.MAC in msg:
        return F.MAC
    return None


def _wire_len(dialect: Dialect, field: str) -> int:
    return 8 if dialect.spec[field]["data_enc"] == "b" else 16


def _mac_bytes(dialect: Dialect, field: str, mac: bytes) -> bytes:
    return mac if _wire_len(dialect, field) == 8 else mac.hex().upper().encode("ascii")


def verify_mac(payload: bytes, msg: Message, dialect: Dialect, key: bytes) -> bool:
    """True when the MAC field of ``msg`` (decoded from ``payload``) is right under ``key``."""
    field = mac_field_of(msg)
    if field is None:
        return False
    n = _wire_len(dialect, field)
    expected = mac_alg3(key, bytes(payload[:-n])).hex().upper()
    return hmac.compare_digest(expected, msg[field].upper())


def add_mac(msg: Message, dialect: Dialect, key: bytes) -> bytes:
    """Encode ``msg`` with its MAC (64, or 128 when a secondary bitmap is needed)."""
    secondary = any(k.isdigit() and int(k) > 64 for k in msg)
    field = F.MAC_SECONDARY if secondary else F.MAC
    doc = {k: v for k, v in msg.items() if k not in (F.MAC, F.MAC_SECONDARY)}
    doc[field] = "0" * 16
    raw = dialect.encode(doc)
    n = _wire_len(dialect, field)
    body = raw[:-n]
    return body + _mac_bytes(dialect, field, mac_alg3(key, body))
