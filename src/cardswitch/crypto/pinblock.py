"""ISO 9564-1 format 0 PIN blocks, and the switch's in-process translation.

Format 0: PIN field ``0`` + length + PIN digits + ``F`` fill, XOR the PAN
field ``0000`` + account 12N (the 12 right-most PAN digits excluding the
check digit). A clear PIN or clear block never leaves these functions except
as their return value; callers must not log either.
"""

from __future__ import annotations

from cardswitch.crypto.des import tdes_ecb_decrypt, tdes_ecb_encrypt

_HEX = frozenset("0123456789abcdefABCDEF")


def _pan_field(pan: str) -> bytes:
    if not (pan.isascii() and pan.isdigit()) or not 2 <= len(pan) <= 19:
        raise ValueError("PAN must be 2 to 19 digits")
    account = pan[:-1][-12:].rjust(12, "0")
    return bytes.fromhex("0000" + account)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(8, "big")


def make_pin_block_iso0(pin: str, pan: str) -> bytes:
    """The clear 8-byte ISO 9564 format 0 PIN block of ``pin`` for ``pan``."""
    if not (pin.isascii() and pin.isdigit()) or not 4 <= len(pin) <= 12:
        raise ValueError("PIN must be 4 to 12 digits")
    pin_field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
    return _xor(pin_field, _pan_field(pan))


def pin_from_block_iso0(block: bytes, pan: str) -> str:
    """The PIN held in a clear format 0 block; ValueError when it is not one."""
    if len(block) != 8:
        raise ValueError("PIN block must be 8 bytes")
    field = _xor(bytes(block), _pan_field(pan)).hex().upper()
    if field[0] != "0":
        raise ValueError("not an ISO format 0 PIN block")
    n = int(field[1], 16)
    if not 4 <= n <= 12:
        raise ValueError("PIN length out of range")
    pin = field[2:2 + n]
    if not pin.isdigit():
        raise ValueError("PIN digits are not decimal")
    if field[2 + n:] != "F" * (14 - n):
        raise ValueError("PIN block fill is not F")
    return pin


def _block_bytes(block_hex: str) -> bytes:
    if len(block_hex) != 16 or not _HEX.issuperset(block_hex):
        raise ValueError("PIN block must be 16 hex characters")
    return bytes.fromhex(block_hex)


def encrypt_pin_block(pin: str, pan: str, key: bytes) -> str:
    """Field 52 for ``pin``: the format 0 block under ``key`` (TDES ECB), hex upper."""
    return tdes_ecb_encrypt(key, make_pin_block_iso0(pin, pan)).hex().upper()


def decrypt_pin_block(block_hex: str, key: bytes, pan: str) -> str:
    """The PIN in an encrypted format 0 block (field 52); ValueError when it is not one."""
    return pin_from_block_iso0(tdes_ecb_decrypt(key, _block_bytes(block_hex)), pan)


def translate_pin_block(block_hex: str, src_key: bytes, dst_key: bytes, pan: str) -> str:
    """Re-encrypt a format 0 PIN block from ``src_key`` to ``dst_key`` (hex upper).

    The clear block is checked to be a valid format 0 block for ``pan`` (as
    an HSM does) and ValueError is raised otherwise.
    """
    clear = tdes_ecb_decrypt(src_key, _block_bytes(block_hex))
    pin_from_block_iso0(clear, pan)
    return tdes_ecb_encrypt(dst_key, clear).hex().upper()
