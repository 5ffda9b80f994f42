"""DUKPT host-side key derivation: TDES (ANSI X9.24-1:2009) and AES (ANSI X9.24-3-2017).

TDES DUKPT. The KSN is 10 bytes: initial key serial number (59 bits) and a
21-bit transaction counter. The IPEK is E(BDK, KSN') | E(BDK xor C0C0C0C0
00000000 C0C0C0C000000000, KSN') with KSN' the left 8 bytes of the KSN with
the counter cleared. The transaction key is reached from the IPEK by the
non-reversible key generation process, once per 1 bit of the counter, from
the high bit down, with the shift register accumulating those bits. Working
keys are variants of that key (PIN, MAC request/response, data).

AES DUKPT. The KSN is 12 bytes: 8-byte initial key ID (BDK ID + derivation
ID) and a 32-bit counter. Every derivation is AES-ECB of a 16-byte block of
derivation data (version, block counter, key usage, algorithm, length, then
the initial key ID or derivation ID + counter) under the derivation key;
longer keys take more blocks with the block counter advanced.

Intermediate keys are used once, so they go through the uncached cipher
calls and do not push long-lived keys out of the caches.
"""

from __future__ import annotations

from cardswitch.crypto.aes import aes_ecb_encrypt_once
from cardswitch.crypto.des import tdes_ecb_encrypt_once

# -- TDES DUKPT (X9.24-1:2009) -------------------------------------------------

_COUNTER_BITS = 21
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
_KEY_MASK = 0xC0C0C0C000000000C0C0C0C000000000
PIN_VARIANT = 0x00000000000000FF00000000000000FF
MAC_VARIANT = 0x000000000000FF00000000000000FF00          # MAC, request (or both ways)
MAC_RESPONSE_VARIANT = 0x00000000FF00000000000000FF000000
DATA_VARIANT = 0x0000000000FF00000000000000FF0000          # data, request (or both ways)
DATA_RESPONSE_VARIANT = 0x000000FF00000000000000FF00000000


def _ksn10(ksn: bytes | str) -> bytes:
    if isinstance(ksn, str):
        try:
            ksn = bytes.fromhex(ksn)
        except ValueError:
            raise ValueError("KSN must be hex") from None
    if len(ksn) != 10:
        raise ValueError(f"TDES DUKPT KSN must be 10 bytes (20 hex), not {len(ksn)}")
    return bytes(ksn)


def _key16(key: bytes, what: str) -> bytes:
    if len(key) != 16:
        raise ValueError(f"{what} must be 16 bytes (double-length TDES), not {len(key)}")
    return bytes(key)


def _variant(key: bytes, mask: int) -> bytes:
    return (int.from_bytes(_key16(key, "DUKPT key"), "big") ^ mask).to_bytes(16, "big")


def ksn_counter(ksn: bytes | str) -> int:
    """The 21-bit transaction counter of a TDES DUKPT KSN."""
    return int.from_bytes(_ksn10(ksn), "big") & _COUNTER_MASK


def tdes_ipek(bdk: bytes, ksn: bytes | str) -> bytes:
    """The initial PIN encryption key (IPEK) of the device that sent ``ksn``."""
    bdk = _key16(bdk, "BDK")
    reg = ((int.from_bytes(_ksn10(ksn), "big") & ~_COUNTER_MASK) >> 16).to_bytes(8, "big")
    left = tdes_ecb_encrypt_once(bdk, reg)
    right = tdes_ecb_encrypt_once((int.from_bytes(bdk, "big") ^ _KEY_MASK).to_bytes(16, "big"), reg)
    return left + right


def _nrkgp(key: int, reg: bytes) -> int:
    """Non-reversible key generation process on a 16-byte key (as int) and
    the 8-byte KSN register: single DES under the key's left half, whitened
    with its right half; once with the key and once with its C0C0 variant."""
    halves = []
    for k in ((key ^ _KEY_MASK), key):
        kl = (k >> 64).to_bytes(8, "big")
        kr = k & 0xFFFFFFFFFFFFFFFF
        msg = (int.from_bytes(reg, "big") ^ kr).to_bytes(8, "big")
        halves.append(int.from_bytes(tdes_ecb_encrypt_once(kl, msg), "big") ^ kr)
    return halves[0] << 64 | halves[1]


def tdes_transaction_key(bdk: bytes, ksn: bytes | str, *, from_ipek: bool = False) -> bytes:
    """The base transaction key (the "future key" of the device) for ``ksn``.

    ``bdk`` is the base derivation key, or the IPEK itself with ``from_ipek``.
    Apply ``tdes_pin_key`` / ``tdes_mac_key`` / ``tdes_data_key`` for the
    working key.
    """
    ksn = _ksn10(ksn)
    key = int.from_bytes(_key16(bdk, "IPEK") if from_ipek else tdes_ipek(bdk, ksn), "big")
    right = int.from_bytes(ksn[2:], "big")
    counter = right & _COUNTER_MASK
    reg = right & ~_COUNTER_MASK & 0xFFFFFFFFFFFFFFFF
    bit = 1 << (_COUNTER_BITS - 1)
    while bit:
        if counter & bit:
            reg |= bit
            key = _nrkgp(key, reg.to_bytes(8, "big"))
        bit >>= 1
    return key.to_bytes(16, "big")


def tdes_pin_key(key: bytes) -> bytes:
    """PIN encryption key: the transaction key XOR 00000000000000FF00000000000000FF."""
    return _variant(key, PIN_VARIANT)


def tdes_mac_key(key: bytes, response: bool = False) -> bytes:
    """MAC key: the transaction key XOR the request (000000000000FF00...) or response variant."""
    return _variant(key, MAC_RESPONSE_VARIANT if response else MAC_VARIANT)


def tdes_data_key(key: bytes, response: bool = False) -> bytes:
    """Data encryption key (X9.24-1:2009): the data variant of the transaction
    key, then each half encrypted under the variant key (one-way function)."""
    v = _variant(key, DATA_RESPONSE_VARIANT if response else DATA_VARIANT)
    return tdes_ecb_encrypt_once(v, v)


# -- AES DUKPT (X9.24-3-2017) --------------------------------------------------

# Key usage indicators of the derivation data.
USAGE_KEY_ENCRYPTION = 0x0002
USAGE_PIN_ENCRYPTION = 0x1000
USAGE_MAC_GENERATION = 0x2000
USAGE_MAC_VERIFICATION = 0x2001
USAGE_MAC_BOTH = 0x2002
USAGE_DATA_ENCRYPT = 0x3000
USAGE_DATA_DECRYPT = 0x3001
USAGE_DATA_BOTH = 0x3002
USAGE_KEY_DERIVATION = 0x8000
USAGE_INITIAL_KEY = 0x8001

# Key type -> (algorithm indicator, length in bits).
KEY_TYPES = {
    "TDES2": (0x0000, 128),
    "TDES3": (0x0001, 192),
    "AES128": (0x0002, 128),
    "AES192": (0x0003, 192),
    "AES256": (0x0004, 256),
}
_AES_BY_LEN = {16: "AES128", 24: "AES192", 32: "AES256"}


def _aes_type(key: bytes, what: str) -> str:
    try:
        return _AES_BY_LEN[len(key)]
    except KeyError:
        raise ValueError(f"{what} must be an AES key of 16, 24 or 32 bytes, not {len(key)}") from None


def _key_type(key_type: str) -> tuple[int, int]:
    try:
        return KEY_TYPES[key_type]
    except KeyError:
        raise ValueError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})") from None


def _bytes(value: bytes | str, n: int, what: str) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{what} must be hex") from None
    if len(value) != n:
        raise ValueError(f"{what} must be {n} bytes ({2 * n} hex), not {len(value)}")
    return bytes(value)


def _derive(key: bytes, usage: int, key_type: str, data8: bytes) -> bytes:
    """DeriveKey: AES-ECB of the derivation data under ``key``, one block per 128 bits."""
    algorithm, bits = _key_type(key_type)
    head = usage.to_bytes(2, "big") + algorithm.to_bytes(2, "big") + bits.to_bytes(2, "big")
    out = b"".join(
        aes_ecb_encrypt_once(key, bytes((0x01, i)) + head + data8)
        for i in range(1, (bits + 127) // 128 + 1)
    )
    return out[: bits // 8]


def aes_initial_key(bdk: bytes, initial_key_id: bytes | str) -> bytes:
    """The initial key of a device from the BDK and its 8-byte initial key ID
    (BDK ID + derivation ID); it has the BDK's AES type."""
    ikid = _bytes(initial_key_id, 8, "initial key ID")
    return _derive(bytes(bdk), USAGE_INITIAL_KEY, _aes_type(bdk, "BDK"), ikid)


def aes_ksn(initial_key_id: bytes | str, counter: int) -> bytes:
    """The 12-byte AES DUKPT KSN: initial key ID + 32-bit counter."""
    if not 0 <= counter <= 0xFFFFFFFF:
        raise ValueError("AES DUKPT counter must be 0 to 2^32-1")
    return _bytes(initial_key_id, 8, "initial key ID") + counter.to_bytes(4, "big")


def aes_transaction_key(bdk: bytes, ksn: bytes | str, *, from_initial_key: bool = False) -> bytes:
    """The transaction key (the device's derivation key for the KSN's counter).

    ``ksn`` is 12 bytes (initial key ID + counter). ``bdk`` is the BDK, or the
    initial key itself with ``from_initial_key``. The key keeps the AES type
    of the BDK.
    """
    ksn = _bytes(ksn, 12, "AES DUKPT KSN")
    key_type = _aes_type(bdk, "initial key" if from_initial_key else "BDK")
    key = bytes(bdk) if from_initial_key else aes_initial_key(bdk, ksn[:8])
    derivation_id = ksn[4:8]
    counter = int.from_bytes(ksn[8:], "big")
    working = 0
    bit = 1 << 31
    while bit:
        if counter & bit:
            working |= bit
            key = _derive(key, USAGE_KEY_DERIVATION, key_type,
                          derivation_id + working.to_bytes(4, "big"))
        bit >>= 1
    return key


def aes_working_key(transaction_key: bytes, ksn: bytes | str, usage: int,
                    key_type: str = "AES128") -> bytes:
    """A working key of ``usage`` (USAGE_*) and ``key_type`` (KEY_TYPES) from a transaction key."""
    ksn = _bytes(ksn, 12, "AES DUKPT KSN")
    _aes_type(transaction_key, "transaction key")
    return _derive(bytes(transaction_key), usage, key_type, ksn[4:])


def aes_pin_key(transaction_key: bytes, ksn: bytes | str, key_type: str = "AES128") -> bytes:
    """The PIN encryption working key for ``ksn``."""
    return aes_working_key(transaction_key, ksn, USAGE_PIN_ENCRYPTION, key_type)


def aes_mac_key(transaction_key: bytes, ksn: bytes | str, key_type: str = "AES128",
                usage: int = USAGE_MAC_GENERATION) -> bytes:
    """A MAC working key (generation by default) for ``ksn``."""
    return aes_working_key(transaction_key, ksn, usage, key_type)


def aes_data_key(transaction_key: bytes, ksn: bytes | str, key_type: str = "AES128",
                 usage: int = USAGE_DATA_ENCRYPT) -> bytes:
    """A data encryption working key (encrypt by default) for ``ksn``."""
    return aes_working_key(transaction_key, ksn, usage, key_type)
