"""Where a message's MAC goes and what it covers (wire.md 7).

The MAC is field 64, or 128 when the message has a secondary bitmap; it is
computed over the encoded message (MTI, bitmaps with the MAC's bit set, all
fields) up to but excluding the MAC field itself, which is always last. So
a MAC is made by encoding with a placeholder and MACing all but the last
``wire_len`` bytes, and checked over the received bytes the same way: never
over a re-encoded message.
"""

from __future__ import annotations

from cardswitch.iso8583.constants import F
from cardswitch.iso8583.dialect import Dialect, Message

PLACEHOLDER = "0" * 16


def mac_field_for(msg: Message) -> str:
    """64, or 128 when any field above 64 is present."""
    for k in msg:
        if k.isdigit() and len(k) >= 2 and int(k) > 64 and k != F.MAC_SECONDARY:
            return F.MAC_SECONDARY
    return F.MAC


def received_mac(msg: Message) -> str:
    """The MAC a received message carries ('' when none)."""
    return msg.get(F.MAC_SECONDARY) or msg.get(F.MAC) or ""


def wire_len(dialect: Dialect, field: str) -> int:
    """Bytes the MAC field takes on the wire (16 hex characters, or 8 binary bytes)."""
    return int(dialect.spec[field]["max_len"])


def mac_input(dialect: Dialect, msg: Message, payload: bytes) -> bytes:
    """What a received message's MAC covers."""
    field = F.MAC_SECONDARY if F.MAC_SECONDARY in msg else F.MAC
    return payload[:-wire_len(dialect, field)]


def prepare(dialect: Dialect, msg: Message) -> tuple[str, bytes]:
    """Put a placeholder MAC in ``msg``; the field and the bytes the MAC covers."""
    msg.pop(F.MAC, None)
    msg.pop(F.MAC_SECONDARY, None)
    field = mac_field_for(msg)
    msg[field] = PLACEHOLDER
    payload = dialect.encode(msg)
    return field, payload[:-wire_len(dialect, field)]
