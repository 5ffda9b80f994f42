"""TR-31 (ANSI X9.143) key block unwrap, versions A, B, C and D.

A block is: 16-character header (version, length, key usage, algorithm,
mode of use, key version number, exportability, number of optional blocks,
reserved), the optional blocks, the encrypted key data in hex, the MAC in hex.
The clear key data is a 2-byte key length in bits, the key, then padding.

- A and C (key variant binding, TDES): encryption key = KBPK xor 45..,
  MAC key = KBPK xor 4D..; key data TDES-CBC with the first 8 header bytes
  as IV; MAC = the left 4 bytes of a CBC-MAC over header + encrypted data.
- B (key derivation binding, TDES) and D (AES): encryption and MAC keys are
  derived from the KBPK with CMAC over counter || usage (0000 encryption,
  0001 MAC) || 00 || algorithm || key length in bits; the MAC is the CMAC
  over header + clear key data (8 bytes for B, 16 for D) and is the IV of
  the key data's CBC encryption.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cardswitch.crypto.aes import aes_cbc_decrypt, aes_cmac
from cardswitch.crypto.des import tdes_cbc_decrypt, tdes_cmac, xor
from cardswitch.crypto.mac import mac_alg1

_HEADER_LEN = 16
# version -> (cipher block size, MAC length in bytes, allowed KBPK lengths)
_VERSIONS = {
    "A": (8, 4, (8, 16, 24)),
    "B": (8, 8, (16, 24)),
    "C": (8, 4, (8, 16, 24)),
    "D": (16, 16, (16, 24, 32)),
}
_HEX = frozenset("0123456789ABCDEFabcdef")


@dataclass(slots=True, frozen=True)
class Tr31Header:
    version: str
    key_usage: str
    algorithm: str
    mode_of_use: str
    key_version: str
    exportability: str
    optional_blocks: tuple[tuple[str, str], ...]
    text: str
    """The whole header as it appears in the block (what the MAC covers)."""


def parse_header(block: str) -> Tr31Header:
    """The header of a TR-31 key block (optional blocks included); ValueError when malformed."""
    if not block.isascii() or len(block) < _HEADER_LEN:
        raise ValueError("TR-31 key block is shorter than its 16-character header")
    version = block[0]
    if version not in _VERSIONS:
        raise ValueError(f"TR-31 key block version {version!r} is not supported (A, B, C, D)")
    if not block[1:5].isdigit() or int(block[1:5]) != len(block):
        raise ValueError(f"TR-31 key block length {block[1:5]!r} does not match its {len(block)} characters")
    if not block[12:14].isdigit():
        raise ValueError("TR-31 number of optional blocks is not 2 digits")
    count = int(block[12:14])
    pos = _HEADER_LEN
    blocks = []
    for _ in range(count):
        block_id = block[pos:pos + 2]
        length_hex = block[pos + 2:pos + 4]
        if len(length_hex) != 2 or not _HEX.issuperset(length_hex):
            raise ValueError(f"TR-31 optional block {block_id!r} has a malformed length")
        length, start = int(length_hex, 16), pos + 4
        if length == 0:  # extended length: its size in bytes (2H), then the length
            ll_hex = block[pos + 4:pos + 6]
            if len(ll_hex) != 2 or not _HEX.issuperset(ll_hex) or int(ll_hex, 16) == 0:
                raise ValueError(f"TR-31 optional block {block_id!r} has a malformed extended length")
            ll = 2 * int(ll_hex, 16)
            ext = block[pos + 6:pos + 6 + ll]
            if len(ext) != ll or not _HEX.issuperset(ext):
                raise ValueError(f"TR-31 optional block {block_id!r} has a malformed extended length")
            length, start = int(ext, 16), pos + 6 + ll
        if length < start - pos or pos + length > len(block):
            raise ValueError(f"TR-31 optional block {block_id!r} length is out of range")
        blocks.append((block_id, block[start:pos + length]))
        pos += length
    return Tr31Header(version, block[5:7], block[7], block[8], block[9:11], block[11],
                      tuple(blocks), block[:pos])


def _unhex(text: str, what: str) -> bytes:
    if not _HEX.issuperset(text):
        raise ValueError(f"TR-31 {what} is not hex")
    return bytes.fromhex(text)


def _derive(cmac, kbpk: bytes, usage: int, algorithm: int, block: int) -> bytes:
    bits = len(kbpk) * 8
    out = b""
    counter = 1
    while len(out) < len(kbpk):
        data = bytes((counter,)) + usage.to_bytes(2, "big") + b"\x00" + \
            algorithm.to_bytes(2, "big") + bits.to_bytes(2, "big")
        out += cmac(kbpk, data)[:block]
        counter += 1
    return out[:len(kbpk)]


def _clear_key(clear: bytes) -> bytes:
    bits = int.from_bytes(clear[:2], "big")
    if bits % 8 or bits // 8 > len(clear) - 2:
        raise ValueError("TR-31 decrypted key length is invalid")
    return clear[2:2 + bits // 8]


def unwrap(kbpk: bytes, block: str) -> tuple[Tr31Header, bytes]:
    """The header and the clear key of a TR-31 key block under ``kbpk``.

    ValueError when the block is malformed, of an unsupported version, the
    KBPK has the wrong length for the version, or the MAC does not verify.
    """
    header = parse_header(block)
    size, mac_len, kbpk_lens = _VERSIONS[header.version]
    kbpk = bytes(kbpk)
    if len(kbpk) not in kbpk_lens:
        raise ValueError(f"TR-31 version {header.version} KBPK must be "
                         f"{' or '.join(map(str, kbpk_lens))} bytes, not {len(kbpk)}")
    if len(block) % size:
        raise ValueError(f"TR-31 version {header.version} block length must be a multiple of {size}")
    hlen = len(header.text)
    body = block[hlen:]
    if len(body) < 2 * (mac_len + size):
        raise ValueError("TR-31 key block has no key data")
    mac = _unhex(body[-2 * mac_len:], "MAC")
    data = _unhex(body[:-2 * mac_len], "key data")
    if len(data) % size:
        raise ValueError(f"TR-31 key data must be a multiple of {size} bytes")
    head = header.text.encode("ascii")
    if header.version in "AC":
        kbek, kbak = xor(kbpk, b"\x45" * len(kbpk)), xor(kbpk, b"\x4d" * len(kbpk))
        expected = mac_alg1(kbak, head + data, padding=1)[:mac_len]
        if not hmac.compare_digest(expected, mac):
            raise ValueError("TR-31 key block MAC does not verify")
        return header, _clear_key(tdes_cbc_decrypt(kbek, data, head[:8]))
    if (len(head) + len(data)) % size:
        raise ValueError(f"TR-31 header length must be a multiple of {size}")
    if header.version == "B":
        algorithm = 0x0000 if len(kbpk) == 16 else 0x0001
        kbek = _derive(tdes_cmac, kbpk, 0x0000, algorithm, 8)
        kbak = _derive(tdes_cmac, kbpk, 0x0001, algorithm, 8)
        clear = tdes_cbc_decrypt(kbek, data, mac)
        expected = tdes_cmac(kbak, head + clear)
    else:
        algorithm = {16: 0x0002, 24: 0x0003, 32: 0x0004}[len(kbpk)]
        kbek = _derive(aes_cmac, kbpk, 0x0000, algorithm, 16)
        kbak = _derive(aes_cmac, kbpk, 0x0001, algorithm, 16)
        clear = aes_cbc_decrypt(kbek, data, mac)
        expected = aes_cmac(kbak, head + clear)
    if not hmac.compare_digest(expected, mac):
        raise ValueError("TR-31 key block MAC does not verify")
    return header, _clear_key(clear)
