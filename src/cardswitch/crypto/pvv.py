"""Visa PIN Verification Value.

TSP (transformed security parameter) = the 11 right-most PAN digits
excluding the check digit + PVKI (1 digit) + the 4 left-most PIN digits,
encrypted under the PVK (TDES ECB) and decimalised Visa style (digits,
then A-F as 0-5): the first four digits are the PVV.
"""

from __future__ import annotations

import hmac

from cardswitch.crypto._digits import decimalise_visa, is_digits
from cardswitch.crypto.des import tdes_ecb_encrypt


def pvv(pvk: bytes, pvki: str, pin: str, pan: str) -> str:
    """The 4-digit PVV of ``pin`` for ``pan`` under ``pvk`` (8, 16 or 24 bytes).

    ``pan`` is the full PAN (13 to 19 digits, its last digit the check
    digit); for an HSM ``account 12N`` pass ``pinblock.account_pan(account)``.
    """
    if len(pvk) not in (8, 16, 24):
        raise ValueError(f"PVK must be 8, 16 or 24 bytes, not {len(pvk)}")
    if not is_digits(pvki, 1, 1):
        raise ValueError("PVKI must be one digit")
    if not is_digits(pin, 4, 12):
        raise ValueError("PIN must be 4 to 12 digits")
    if not is_digits(pan, 12, 19):
        raise ValueError("PAN must be 12 to 19 digits")
    tsp = bytes.fromhex(pan[-12:-1] + pvki + pin[:4])
    return decimalise_visa(tdes_ecb_encrypt(bytes(pvk), tsp).hex().upper(), 4)


def verify_pvv(pvk: bytes, pvki: str, pin: str, pan: str, value: str) -> bool:
    """True when ``value`` is the PVV of ``pin`` (constant-time comparison)."""
    return hmac.compare_digest(pvv(pvk, pvki, pin, pan), value)
