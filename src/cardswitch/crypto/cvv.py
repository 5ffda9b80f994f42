"""Visa CVV / Mastercard CVC (CVV1, CVV2, iCVV differ only in the service code).

Data: PAN + expiry (YYMM) + service code, right-padded with 0 to 32 digits,
as two 8-byte blocks. Block 1 is encrypted under key A (single DES), XORed
with block 2 and the result encrypted under A|B (triple DES, so E_A D_B E_A
in one call). The result is decimalised (digits first, then A-F as 0-5) and
the first three digits are the CVV.
"""

from __future__ import annotations

import hmac

from cardswitch.crypto._digits import decimalise_visa, is_digits
from cardswitch.crypto.des import tdes_ecb_encrypt, xor


def cvv(cvk: bytes, pan: str, expiry: str, service_code: str) -> str:
    """The 3-digit CVV/CVC/iCVV of ``pan`` under the double-length ``cvk``."""
    if len(cvk) != 16:
        raise ValueError(f"CVK must be 16 bytes (double length), not {len(cvk)}")
    if not is_digits(pan, 1, 19):
        raise ValueError("PAN must be 1 to 19 digits")
    if not is_digits(expiry, 4, 4):
        raise ValueError("expiry must be 4 digits (YYMM)")
    if not is_digits(service_code, 3, 3):
        raise ValueError("service code must be 3 digits")
    data = bytes.fromhex((pan + expiry + service_code).ljust(32, "0"))
    cvk = bytes(cvk)
    step = tdes_ecb_encrypt(cvk[:8], data[:8])
    out = tdes_ecb_encrypt(cvk, xor(step, data[8:]))
    return decimalise_visa(out.hex().upper(), 3)


def verify_cvv(cvk: bytes, pan: str, expiry: str, service_code: str, value: str) -> bool:
    """True when ``value`` is the CVV of ``pan`` (constant-time comparison)."""
    return hmac.compare_digest(cvv(cvk, pan, expiry, service_code), value)
