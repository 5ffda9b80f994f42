"""IBM 3624 PIN method: natural PIN, PIN offset, offset verification.

The 16 hex digits of validation data are encrypted under the PVK (TDES
ECB); each hex digit of the result is mapped to a decimal digit through the
decimalisation table (16 decimal digits, indexed by the hex digit); the
left-most ``pin_len`` digits are the natural PIN. The offset is the
customer PIN minus the natural PIN digit by digit, modulo 10, no carry.
"""

from __future__ import annotations

import hmac

from cardswitch.crypto._digits import is_digits
from cardswitch.crypto.des import tdes_ecb_encrypt

_HEX = frozenset("0123456789ABCDEF")


def validation_data(template: str, account: str, pad: str = "F") -> str:
    """The 16 hex digits of validation data from a Thales-style template.

    ``template`` (the DA/EA "PIN validation data", 12A) is hex characters
    with at most one ``N``, which is replaced by the last 5 digits of the
    account number; a result shorter than 16 is right-padded with ``pad``.
    ``account`` is the HSM ``account 12N`` (the 12 right-most PAN digits
    excluding the check digit) or a full PAN of 13 to 19 digits, from which
    that account number is taken.
    """
    if is_digits(account, 13, 19):
        account = account[:-1][-12:]
    elif not is_digits(account, 12, 12):
        raise ValueError("account must be 12 digits (or a full PAN of 13 to 19)")
    if len(pad) != 1 or pad.upper() not in _HEX:
        raise ValueError("validation data pad must be one hex character")
    t = template.upper()
    if t.count("N") > 1 or not set(t.replace("N", "")) <= _HEX:
        raise ValueError("PIN validation data must be hex characters and at most one N")
    data = t.replace("N", account[-5:])
    if len(data) > 16:
        raise ValueError("PIN validation data is longer than 16 characters")
    return data.ljust(16, pad.upper())


def _check(pvk: bytes, data: str, decimalisation: str) -> bytes:
    if len(pvk) not in (8, 16, 24):
        raise ValueError(f"PVK must be 8, 16 or 24 bytes, not {len(pvk)}")
    if len(data) != 16 or not set(data.upper()) <= _HEX:
        raise ValueError("validation data must be 16 hex characters")
    if not is_digits(decimalisation, 16, 16):
        raise ValueError("decimalisation table must be 16 digits")
    return bytes.fromhex(data)


def _intermediate(pvk: bytes, data: str, decimalisation: str) -> str:
    block = _check(pvk, data, decimalisation)
    out = tdes_ecb_encrypt(bytes(pvk), block).hex()
    return "".join(decimalisation[int(c, 16)] for c in out)


def natural_pin(pvk: bytes, validation_data: str, decimalisation: str, pin_len: int) -> str:
    """The natural PIN of ``pin_len`` (4..12) digits."""
    if not 4 <= pin_len <= 12:
        raise ValueError("PIN length must be 4 to 12")
    return _intermediate(pvk, validation_data, decimalisation)[:pin_len]


def pin_offset(pvk: bytes, validation_data: str, decimalisation: str, pin: str) -> str:
    """The offset of ``pin``: (pin - natural PIN) mod 10 digit-wise, as many digits as the PIN."""
    if not is_digits(pin, 4, 12):
        raise ValueError("PIN must be 4 to 12 digits")
    natural = _intermediate(pvk, validation_data, decimalisation)
    return "".join(str((int(p) - int(n)) % 10) for p, n in zip(pin, natural))


def verify_offset(pvk: bytes, validation_data: str, decimalisation: str, pin: str,
                  offset: str, check_len: int | None = None) -> bool:
    """True when ``pin`` matches ``offset`` (digits, optionally F-padded as in
    the Thales 12H field).

    By default every offset digit is checked and the PIN must be as long as
    the offset. With ``check_len`` (the Thales "check length", the minimum
    PIN length) only the left-most ``check_len`` digits of the PIN and the
    offset are checked, as the IBM 3624 method does.
    """
    digits = offset.upper().rstrip("F")
    if not is_digits(digits, 4, 12):
        raise ValueError("offset must be 4 to 12 digits, F-padded")
    if check_len is None:
        n = len(digits)
        if len(pin) != n:
            return False
    else:
        n = check_len
        if not 4 <= n <= len(digits):
            raise ValueError("check length must be 4 to the offset's length")
        if len(pin) < n:
            return False
    expected = pin_offset(pvk, validation_data, decimalisation, pin)
    return hmac.compare_digest(expected[:n], digits[:n])
