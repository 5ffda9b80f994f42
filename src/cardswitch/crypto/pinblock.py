"""ISO 9564-1 PIN blocks (formats 0, 1, 2, 3 and the AES format 4), the
Diebold/IBM 3624 block, and the switch's in-process PIN translation.

8-byte clear blocks, as hex nibbles:

- ISO0: ``0`` + length + PIN + ``F`` fill, XOR the PAN field ``0000`` +
  account 12N (the 12 right-most PAN digits excluding the check digit).
- ISO1: ``1`` + length + PIN + random fill ``0``-``F``; no PAN.
- ISO2: ``2`` + length + PIN + ``F`` fill; no PAN (ICC offline PIN).
- ISO3: ``3`` + length + PIN + random fill ``A``-``F``, XOR the PAN field.
- IBM3624 (the Diebold/IBM ATM format, Thales code 03): PIN left-justified,
  ``F`` padded to 16 nibbles, no control field, no PAN.

Format 4 (ISO 9564-1:2017) is 16 bytes and only exists enciphered under
AES: ``encipher_iso4`` / ``decipher_iso4``.

A clear PIN or clear block never leaves these functions except as their
return value; callers must not log either.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cardswitch.crypto.aes import aes_ecb_decrypt, aes_ecb_encrypt
from cardswitch.crypto.des import tdes_ecb_decrypt, tdes_ecb_encrypt, xor

Rand = Callable[[int], bytes]
"""A random source: ``rand(n)`` returns ``n`` random bytes (``os.urandom``)."""

FORMATS = ("ISO0", "ISO1", "ISO2", "ISO3", "IBM3624")

# Thales PIN block format codes (hsm.md section 3) to our format names.
HSM_FORMATS = {"01": "ISO0", "03": "IBM3624", "05": "ISO1", "47": "ISO3"}
HSM_FORMAT_CODES = {name: code for code, name in HSM_FORMATS.items()}

_HEX = frozenset("0123456789abcdefABCDEF")
_HEX_UPPER = "0123456789ABCDEF"
_CONTROL = {"ISO0": "0", "ISO1": "1", "ISO2": "2", "ISO3": "3"}
# Allowed fill nibbles per format (also the alphabet of a random fill).
_FILL = {"ISO0": "F", "ISO1": _HEX_UPPER, "ISO2": "F", "ISO3": "ABCDEF", "IBM3624": "F"}
_WITH_PAN = frozenset(("ISO0", "ISO3"))


def _pan_field(pan: str) -> bytes:
    if not (pan.isascii() and pan.isdigit()) or not 2 <= len(pan) <= 19:
        raise ValueError("PAN must be 2 to 19 digits")
    account = pan[:-1][-12:].rjust(12, "0")
    return bytes.fromhex("0000" + account)


def _check_pin(pin: str) -> None:
    if not (pin.isascii() and pin.isdigit()) or not 4 <= len(pin) <= 12:
        raise ValueError("PIN must be 4 to 12 digits")


def _check_format(fmt: str) -> None:
    if fmt not in _FILL:
        raise ValueError(f"unknown PIN block format {fmt!r} (one of {', '.join(FORMATS)})")


def account_pan(account12: str) -> str:
    """A PAN standing for an HSM ``account 12N`` field (12 right-most PAN
    digits excluding the check digit): the account plus a dummy check digit,
    which every function here drops again."""
    if len(account12) != 12 or not (account12.isascii() and account12.isdigit()):
        raise ValueError("account must be 12 digits")
    return account12 + "0"


def _random_fill(n: int, alphabet: str, rand: Rand | None) -> str:
    """``n`` nibbles drawn uniformly from ``alphabet`` (rejection sampling)."""
    if n == 0:
        return ""
    rand = rand or os.urandom
    k = len(alphabet)
    if k == 1:
        return alphabet * n
    limit = 256 - 256 % k
    out: list[str] = []
    for _ in range(64):
        out.extend(alphabet[b % k] for b in rand(n) if b < limit)
        if len(out) >= n:
            return "".join(out[:n])
    raise ValueError("random source gave no usable bytes")


def _fill_for(fmt: str, n: int, fill: str | None, rand: Rand | None) -> str:
    alphabet = _FILL[fmt]
    if fill is None:
        return _random_fill(n, alphabet, rand)
    fill = fill.upper()
    if len(fill) < n or not set(fill[:n]) <= set(alphabet):
        raise ValueError(f"{fmt} fill must be {n} nibbles from {alphabet}")
    return fill[:n]


def make_pin_block_iso0(pin: str, pan: str) -> bytes:
    """The clear 8-byte ISO 9564 format 0 PIN block of ``pin`` for ``pan``."""
    _check_pin(pin)
    pin_field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
    return xor(pin_field, _pan_field(pan))


def make_pin_block(fmt: str, pin: str, pan: str = "", rand: Rand | None = None,
                   *, fill: str | None = None) -> bytes:
    """The clear 8-byte PIN block of ``pin`` in format ``fmt`` (see ``FORMATS``).

    ``pan`` is needed by ISO0 and ISO3 only. The random fill of ISO1 (0-F)
    and ISO3 (A-F) comes from ``rand`` (default ``os.urandom``), or is given
    exactly as hex nibbles in ``fill`` (tests).
    """
    _check_format(fmt)
    if fmt == "ISO0":
        return make_pin_block_iso0(pin, pan)
    _check_pin(pin)
    n = len(pin)
    if fmt == "IBM3624":
        return bytes.fromhex(pin.ljust(16, "F"))
    field = f"{_CONTROL[fmt]}{n:X}{pin}" + _fill_for(fmt, 14 - n, fill, rand)
    block = bytes.fromhex(field)
    return xor(block, _pan_field(pan)) if fmt in _WITH_PAN else block


def pin_from_block(fmt: str, block: bytes, pan: str = "") -> str:
    """The PIN held in a clear 8-byte block of format ``fmt``.

    ValueError when the block is not a valid block of that format: wrong
    control nibble, PIN length outside 4..12, non-decimal PIN digits, or a
    fill outside the format's alphabet (F for ISO0/ISO2/IBM3624, A-F for ISO3).
    """
    _check_format(fmt)
    if len(block) != 8:
        raise ValueError("PIN block must be 8 bytes")
    if fmt in _WITH_PAN:
        block = xor(bytes(block), _pan_field(pan))
    field = bytes(block).hex().upper()
    if fmt == "IBM3624":
        n = len(field.rstrip("F"))
        if not 4 <= n <= 12:
            raise ValueError("PIN length out of range")
        pin = field[:n]
        if not pin.isdigit():
            raise ValueError("PIN digits are not decimal")
        return pin
    if field[0] != _CONTROL[fmt]:
        raise ValueError(f"not an {fmt[:3]} format {_CONTROL[fmt]} PIN block")
    n = int(field[1], 16)
    if not 4 <= n <= 12:
        raise ValueError("PIN length out of range")
    pin = field[2:2 + n]
    if not pin.isdigit():
        raise ValueError("PIN digits are not decimal")
    alphabet = _FILL[fmt]
    if len(alphabet) == 1:
        if field[2 + n:] != alphabet * (14 - n):
            raise ValueError(f"PIN block fill is not {alphabet}")
    elif not set(field[2 + n:]) <= set(alphabet):
        raise ValueError(f"PIN block fill is not {alphabet[0]}-{alphabet[-1]}")
    return pin


def pin_from_block_iso0(block: bytes, pan: str) -> str:
    """The PIN held in a clear format 0 block; ValueError when it is not one."""
    return pin_from_block("ISO0", block, pan)


# -- format 4 (AES) ------------------------------------------------------------

def make_pin_field_iso4(pin: str, rand: Rand | None = None, *, fill: str | None = None) -> bytes:
    """The 16-byte plain-text PIN field of format 4: ``4`` + length + PIN +
    ``A`` fill to 16 nibbles, then 16 random nibbles (``rand`` or ``fill``)."""
    _check_pin(pin)
    if fill is None:
        tail = (rand or os.urandom)(8)
        if len(tail) != 8:
            raise ValueError("random source must give the bytes asked for")
        random_part = tail.hex().upper()
    else:
        random_part = _fill_for("ISO1", 16, fill, None)
    return bytes.fromhex(f"4{len(pin):X}{pin}".ljust(16, "A") + random_part)


def pan_field_iso4(pan: str) -> bytes:
    """The 16-byte plain-text PAN field of format 4: length indicator (PAN
    length - 12, 0 when shorter), the PAN (left-padded with 0 to 12 digits),
    0 padding."""
    if not (pan.isascii() and pan.isdigit()) or not 1 <= len(pan) <= 19:
        raise ValueError("PAN must be 1 to 19 digits")
    return bytes.fromhex(f"{max(0, len(pan) - 12)}{pan.rjust(12, '0')}".ljust(32, "0"))


def pin_from_field_iso4(field: bytes) -> str:
    """The PIN in a plain-text format 4 PIN field; ValueError when it is not one."""
    if len(field) != 16:
        raise ValueError("format 4 PIN field must be 16 bytes")
    h = bytes(field).hex().upper()
    if h[0] != "4":
        raise ValueError("not an ISO format 4 PIN field")
    n = int(h[1], 16)
    if not 4 <= n <= 12:
        raise ValueError("PIN length out of range")
    pin = h[2:2 + n]
    if not pin.isdigit():
        raise ValueError("PIN digits are not decimal")
    if h[2 + n:16] != "A" * (14 - n):
        raise ValueError("PIN block fill is not A")
    return pin


def encipher_iso4(pin: str, pan: str, key: bytes, rand: Rand | None = None) -> bytes:
    """The 16-byte enciphered ISO 9564 format 4 PIN block under AES ``key``.

    Block A = E(K, PIN field); block B = A XOR PAN field; result E(K, B).
    """
    pan_field = pan_field_iso4(pan)
    a = aes_ecb_encrypt(key, make_pin_field_iso4(pin, rand))
    return aes_ecb_encrypt(key, xor(a, pan_field))


def decipher_iso4(block: bytes, pan: str, key: bytes) -> str:
    """The PIN in an enciphered format 4 block; ValueError when it is not one."""
    if len(block) != 16:
        raise ValueError("format 4 PIN block must be 16 bytes")
    b = aes_ecb_decrypt(key, bytes(block))
    return pin_from_field_iso4(aes_ecb_decrypt(key, xor(b, pan_field_iso4(pan))))


# -- encrypted blocks (field 52) -------------------------------------------------

def _block_bytes(block_hex: str) -> bytes:
    if len(block_hex) != 16 or not _HEX.issuperset(block_hex):
        raise ValueError("PIN block must be 16 hex characters")
    return bytes.fromhex(block_hex)


def encrypt_pin_block(pin: str, pan: str, key: bytes, fmt: str = "ISO0",
                      rand: Rand | None = None) -> str:
    """Field 52 for ``pin``: the ``fmt`` block (default format 0) under ``key``
    (TDES ECB), hex upper."""
    return tdes_ecb_encrypt(key, make_pin_block(fmt, pin, pan, rand)).hex().upper()


def decrypt_pin_block(block_hex: str, key: bytes, pan: str, fmt: str = "ISO0") -> str:
    """The PIN in an encrypted ``fmt`` block (field 52); ValueError when it is not one."""
    return pin_from_block(fmt, tdes_ecb_decrypt(key, _block_bytes(block_hex)), pan)


def translate_pin(block_hex: str, src_key: bytes, dst_key: bytes, pan: str,
                  src_fmt: str = "ISO0", dst_fmt: str | None = None,
                  rand: Rand | None = None) -> tuple[int, str]:
    """Re-encrypt a PIN block from ``src_key`` to ``dst_key``: (PIN length, block hex upper).

    The clear block is checked to be a valid ``src_fmt`` block for ``pan``
    (as an HSM does) and ValueError is raised otherwise. With the same
    format on both sides the clear block is kept as it is; otherwise a new
    ``dst_fmt`` block is built (fresh random fill where the format has one).
    """
    dst_fmt = dst_fmt or src_fmt
    _check_format(dst_fmt)
    clear = tdes_ecb_decrypt(src_key, _block_bytes(block_hex))
    pin = pin_from_block(src_fmt, clear, pan)
    if dst_fmt != src_fmt:
        clear = make_pin_block(dst_fmt, pin, pan, rand)
    return len(pin), tdes_ecb_encrypt(dst_key, clear).hex().upper()


def translate_pin_block(block_hex: str, src_key: bytes, dst_key: bytes, pan: str,
                        src_fmt: str = "ISO0", dst_fmt: str | None = None) -> str:
    """Re-encrypt a PIN block (default format 0) from ``src_key`` to ``dst_key``
    (hex upper); ValueError when the clear block is not a valid block for ``pan``."""
    return translate_pin(block_hex, src_key, dst_key, pan, src_fmt, dst_fmt)[1]
