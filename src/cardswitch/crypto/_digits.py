"""Digit helpers shared by the Visa CVV and PVV methods (not public API)."""

from __future__ import annotations

_LETTERS = str.maketrans("ABCDEF", "012345")


def is_digits(s: str, lo: int, hi: int) -> bool:
    """True when ``s`` is ``lo`` to ``hi`` ASCII decimal digits."""
    return s.isascii() and s.isdigit() and lo <= len(s) <= hi


def decimalise_visa(hex_upper: str, n: int) -> str:
    """Visa decimalisation: the decimal digits of ``hex_upper`` left to right,
    then, if fewer than ``n``, its letters A-F as 0-5; the first ``n``."""
    digits = [c for c in hex_upper if c <= "9"]
    if len(digits) < n:
        digits += [c for c in hex_upper if c > "9"][: n - len(digits)]
        return "".join(digits[:n]).translate(_LETTERS)
    return "".join(digits[:n])
