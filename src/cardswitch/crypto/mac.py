"""ISO/IEC 9797-1 MACs with DES: algorithm 1 (CBC-MAC) and algorithm 3 (retail MAC).

Padding method 1 appends zero bytes up to a whole block (an empty message
becomes one zero block); method 2 appends 0x80 then zero bytes.
"""

from __future__ import annotations

from cardswitch.crypto.des import BLOCK, tdes_cbc_encrypt, tdes_ecb_encrypt


def pad(data: bytes, padding: int = 1) -> bytes:
    """ISO 9797-1 padding method 1 or 2 to a multiple of 8 bytes."""
    if padding == 2:
        data = bytes(data) + b"\x80"
    elif padding != 1:
        raise ValueError(f"padding method {padding} is not supported (1 or 2)")
    rem = len(data) % BLOCK
    if rem:
        return bytes(data) + bytes(BLOCK - rem)
    if not data:
        return bytes(BLOCK)
    return bytes(data)


def mac_alg1(key: bytes, data: bytes, padding: int = 1) -> bytes:
    """ISO 9797-1 MAC algorithm 1: CBC-MAC under ``key`` (8, 16 or 24 bytes), 8 bytes."""
    return tdes_cbc_encrypt(key, pad(data, padding))[-BLOCK:]


def mac_alg3(key16: bytes, data: bytes, padding: int = 1) -> bytes:
    """ISO 9797-1 MAC algorithm 3 (ANSI X9.19 retail MAC), double-length key, 8 bytes.

    Single-DES CBC under K1 over every block, then the last output is
    decrypted under K2 and encrypted under K1 again. The last block's
    E_K1, D_K2, E_K1 is one two-key triple-DES encryption, so that is how
    it is computed: one CBC pass over all blocks but the last, one TDES block.
    """
    if len(key16) != 16:
        raise ValueError(f"retail MAC key must be 16 bytes, not {len(key16)}")
    padded = pad(data, padding)
    last = padded[-BLOCK:]
    if len(padded) > BLOCK:
        h = tdes_cbc_encrypt(bytes(key16[:8]), padded[:-BLOCK])[-BLOCK:]
        last = (int.from_bytes(h, "big") ^ int.from_bytes(last, "big")).to_bytes(BLOCK, "big")
    return tdes_ecb_encrypt(bytes(key16), last)
