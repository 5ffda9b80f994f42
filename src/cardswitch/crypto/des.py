"""DES / triple-DES primitives: a thin wrapper over ``cryptography``.

Keys are 8 (single DES), 16 (double-length K1K2) or 24 bytes (K1K2K3). We
always hand ``cryptography`` a 24-byte key (K1K1K1, K1K2K1, K1K2K3): shorter
TripleDES keys are deprecated there. Cipher objects are cached per key, so
the hot path (PIN translation, MACs) builds no key schedule twice.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.cmac import CMAC

BLOCK = 8
_ZERO_BLOCK = bytes(BLOCK)

# Bytes with odd parity: the 7 high bits kept, the low bit chosen.
_ODD = bytes(b if bin(b).count("1") & 1 else b ^ 1 for b in range(256))


def expand_key(key: bytes) -> bytes:
    """The 24-byte form of an 8-, 16- or 24-byte DES key."""
    n = len(key)
    if n == 8:
        return key * 3
    if n == 16:
        return key + key[:8]
    if n == 24:
        return key
    raise ValueError(f"DES key must be 8, 16 or 24 bytes, not {n}")


@lru_cache(maxsize=4096)
def _ecb(key: bytes) -> Cipher:
    return Cipher(TripleDES(expand_key(key)), modes.ECB())


@lru_cache(maxsize=4096)
def _cbc_zero_iv(key: bytes) -> Cipher:
    return Cipher(TripleDES(expand_key(key)), modes.CBC(_ZERO_BLOCK))


def _check_blocks(data: bytes) -> None:
    if len(data) % BLOCK:
        raise ValueError(f"data length {len(data)} is not a multiple of {BLOCK}")


def tdes_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """(Triple-)DES ECB encryption; single DES when ``key`` is 8 bytes."""
    _check_blocks(data)
    return _ecb(bytes(key)).encryptor().update(data)


def tdes_ecb_decrypt(key: bytes, data: bytes) -> bytes:
    """(Triple-)DES ECB decryption; single DES when ``key`` is 8 bytes."""
    _check_blocks(data)
    return _ecb(bytes(key)).decryptor().update(data)


def tdes_ecb_encrypt_once(key: bytes, data: bytes) -> bytes:
    """As ``tdes_ecb_encrypt`` without the cipher cache.

    For keys used once (DUKPT intermediate and transaction keys): caching
    them would only push the long-lived keys out of the cache.
    """
    _check_blocks(data)
    return Cipher(TripleDES(expand_key(bytes(key))), modes.ECB()).encryptor().update(data)


def tdes_cbc_encrypt(key: bytes, data: bytes, iv: bytes = _ZERO_BLOCK) -> bytes:
    """(Triple-)DES CBC encryption, no padding (zero IV unless given)."""
    _check_blocks(data)
    if iv == _ZERO_BLOCK:
        return _cbc_zero_iv(bytes(key)).encryptor().update(data)
    if len(iv) != BLOCK:
        raise ValueError("IV must be 8 bytes")
    return Cipher(TripleDES(expand_key(bytes(key))), modes.CBC(iv)).encryptor().update(data)


def tdes_cbc_decrypt(key: bytes, data: bytes, iv: bytes = _ZERO_BLOCK) -> bytes:
    """(Triple-)DES CBC decryption, no padding (zero IV unless given)."""
    _check_blocks(data)
    if iv == _ZERO_BLOCK:
        return _cbc_zero_iv(bytes(key)).decryptor().update(data)
    if len(iv) != BLOCK:
        raise ValueError("IV must be 8 bytes")
    return Cipher(TripleDES(expand_key(bytes(key))), modes.CBC(iv)).decryptor().update(data)


def xor(a: bytes, b: bytes) -> bytes:
    """Byte-wise XOR of two equal-length byte strings."""
    if len(a) != len(b):
        raise ValueError(f"cannot XOR {len(a)} bytes with {len(b)} bytes")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


@lru_cache(maxsize=256)
def _cmac(key: bytes) -> CMAC:
    return CMAC(TripleDES(expand_key(key)))


def tdes_cmac(key: bytes, data: bytes) -> bytes:
    """CMAC (NIST SP 800-38B, 8-byte blocks) under a DES key, 8 bytes."""
    ctx = _cmac(bytes(key)).copy()
    ctx.update(bytes(data))
    return ctx.finalize()


def kcv(key: bytes) -> str:
    """Key check value: first 3 bytes of E_K(8 zero bytes), 6 hex upper case."""
    return tdes_ecb_encrypt(key, _ZERO_BLOCK)[:3].hex().upper()


def check_odd_parity(key: bytes) -> bool:
    """True when every byte of ``key`` has an odd number of 1 bits."""
    return all(_ODD[b] == b for b in key)


def fix_parity(key: bytes) -> bytes:
    """``key`` with the low bit of each byte set so that each byte has odd parity."""
    return bytes(_ODD[b] for b in key)
