"""Card numbers: Luhn, masking and the keyed token stored instead of a PAN.

A full PAN is never logged or stored. Where a PAN must be matched later
(reports, reconciliation, duplicate checks) we keep ``mask_pan`` (first 6,
last 4) and ``pan_token`` (HMAC-SHA256 under a per-installation secret).
"""

from __future__ import annotations

import hashlib


def luhn_ok(pan: str) -> bool:
    if not pan.isdigit() or not 12 <= len(pan) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def luhn_check_digit(partial: str) -> str:
    """The digit that makes ``partial + digit`` pass Luhn."""
    for d in "0123456789":
        if luhn_ok(partial + d):
            return d
    raise ValueError("no check digit")  # unreachable for digit strings


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits, ``*`` between (settlement.md 4)."""
    if len(pan) < 11:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def pan_token(pan: str, secret: bytes) -> str:
    """A keyed hash of the PAN: equal PANs give equal tokens, nothing reversible.

    BLAKE2b in its keyed (MAC) mode: as strong as HMAC-SHA256 here and several
    times cheaper, and it runs for every request.
    """
    return hashlib.blake2b(pan.encode("ascii"), key=secret[:64], digest_size=16).hexdigest()


def pan_from_track2(track2: str) -> tuple[str, str] | None:
    """(PAN, expiry YYMM) from track 2 equivalent data, or None if unreadable."""
    for sep in ("=", "D", "d"):
        if sep in track2:
            pan, rest = track2.split(sep, 1)
            pan = pan.lstrip(";")
            if pan.isdigit() and len(rest) >= 4 and rest[:4].isdigit():
                return pan, rest[:4]
            return None
    return None
