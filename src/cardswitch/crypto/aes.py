"""AES primitives (ECB, CBC, CMAC) and the AES key check value over ``cryptography``.

Keys are 16, 24 or 32 bytes. Cipher objects and fresh CMAC contexts are
cached per key, as in ``des``, so repeated calls build no key schedule
twice; ``aes_ecb_encrypt_once`` skips the cache for keys used once (DUKPT).
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

BLOCK = 16
_ZERO_BLOCK = bytes(BLOCK)


def _check_key(key: bytes) -> bytes:
    if len(key) not in (16, 24, 32):
        raise ValueError(f"AES key must be 16, 24 or 32 bytes, not {len(key)}")
    return bytes(key)


def _check_blocks(data: bytes) -> None:
    if len(data) % BLOCK:
        raise ValueError(f"data length {len(data)} is not a multiple of {BLOCK}")


@lru_cache(maxsize=1024)
def _ecb(key: bytes) -> Cipher:
    return Cipher(algorithms.AES(_check_key(key)), modes.ECB())


@lru_cache(maxsize=1024)
def _cbc_zero_iv(key: bytes) -> Cipher:
    return Cipher(algorithms.AES(_check_key(key)), modes.CBC(_ZERO_BLOCK))


@lru_cache(maxsize=256)
def _cmac(key: bytes) -> CMAC:
    return CMAC(algorithms.AES(_check_key(key)))


def _cbc(key: bytes, iv: bytes) -> Cipher:
    if iv == _ZERO_BLOCK:
        return _cbc_zero_iv(bytes(key))
    if len(iv) != BLOCK:
        raise ValueError(f"IV must be {BLOCK} bytes, not {len(iv)}")
    return Cipher(algorithms.AES(_check_key(key)), modes.CBC(bytes(iv)))


def aes_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """AES ECB encryption, no padding."""
    _check_blocks(data)
    return _ecb(bytes(key)).encryptor().update(data)


def aes_ecb_decrypt(key: bytes, data: bytes) -> bytes:
    """AES ECB decryption, no padding."""
    _check_blocks(data)
    return _ecb(bytes(key)).decryptor().update(data)


def aes_ecb_encrypt_once(key: bytes, data: bytes) -> bytes:
    """As ``aes_ecb_encrypt`` without the cipher cache (for keys used once)."""
    _check_blocks(data)
    return Cipher(algorithms.AES(_check_key(key)), modes.ECB()).encryptor().update(data)


def aes_cbc_encrypt(key: bytes, data: bytes, iv: bytes = _ZERO_BLOCK) -> bytes:
    """AES CBC encryption, no padding (zero IV unless given)."""
    _check_blocks(data)
    return _cbc(key, iv).encryptor().update(data)


def aes_cbc_decrypt(key: bytes, data: bytes, iv: bytes = _ZERO_BLOCK) -> bytes:
    """AES CBC decryption, no padding (zero IV unless given)."""
    _check_blocks(data)
    return _cbc(key, iv).decryptor().update(data)


def aes_cmac(key: bytes, data: bytes) -> bytes:
    """AES-CMAC (NIST SP 800-38B) of ``data``, 16 bytes."""
    ctx = _cmac(bytes(key)).copy()
    ctx.update(bytes(data))
    return ctx.finalize()


def kcv_aes(key: bytes, length: int = 3) -> str:
    """AES key check value: the first ``length`` bytes of CMAC(key, 16 zero bytes), hex upper."""
    if not 1 <= length <= BLOCK:
        raise ValueError(f"KCV length must be 1 to {BLOCK} bytes")
    return aes_cmac(key, _ZERO_BLOCK)[:length].hex().upper()
