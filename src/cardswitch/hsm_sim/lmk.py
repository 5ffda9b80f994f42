"""The variant LMK: 20 double-length DES key pairs, and keys encrypted under them.

A working key travels as text: 16 hex (single length, ``Z`` + 16 hex is
accepted too), ``U`` + 32 hex (double) or ``T`` + 48 hex (triple). Its key
type (``002`` TPK, ``402`` CVK, ...) names an LMK pair and a variant: the
variant digit n (1-9) XORs the pair's first byte with the n-th of
``A6 5A 6A DE 2B 50 74 9C FA``. The key scheme adds a second variant on the
pair's byte 8 (the first byte of its right key), one per 8-byte part of the
key: ``A6``/``5A`` for ``U``, ``6A``/``DE``/``2B`` for ``T``; a single-length
key uses the pair as it is. Each part is encrypted with two-key TDES ECB.

The same scheme variants protect keys exported under a ZMK or TMK with
scheme ``U``/``T``; schemes ``X``/``Y`` (ANSI X9.17) and single-length keys
are plain TDES ECB under the key-encrypting key.

LMK file format (``Lmk.from_file``): one line per pair, ``NN HEX32`` (the pair
index 00-19, white space, the pair's 32 hex digits); blank lines and text
after ``#`` are ignored; all 20 pairs must be present, each once, with odd
parity.

Errors are :class:`HsmError` carrying the payShield error code, so command
handlers can answer with it directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cardswitch.crypto.des import check_odd_parity, tdes_ecb_decrypt, tdes_ecb_encrypt


class HsmError(Exception):
    """A request that gets an error code instead of a result."""

    def __init__(self, code: str, reason: str = "") -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason


class LmkError(ValueError):
    """An LMK set that cannot be loaded (the message names the line and problem)."""


# Error codes of hsm.md 4 used by the key model.
E_SRC_PARITY = "10"
E_DST_PARITY = "11"
E_KEY_TYPE = "04"
E_INPUT = "15"
E_SCHEME = "26"
E_KEY_LEN = "27"

VARIANTS = (0x00, 0xA6, 0x5A, 0x6A, 0xDE, 0x2B, 0x50, 0x74, 0x9C, 0xFA)   # index = variant digit
SCHEME_VARIANTS: dict[str, tuple[int, ...]] = {
    "": (0x00,),             # single length: the pair unchanged
    "U": (0xA6, 0x5A),
    "T": (0x6A, 0xDE, 0x2B),
}
SCHEME_LENGTH = {"": 8, "Z": 8, "U": 16, "T": 24, "X": 16, "Y": 24}

# LMK pair code (the last two digits of a key type code) -> index of the pair in the set.
PAIR_INDEX = {"00": 2, "01": 3, "02": 7, "03": 8, "04": 9, "05": 10, "06": 11, "07": 12,
              "08": 13, "09": 14, "0A": 15, "0B": 16, "0C": 17, "0D": 18, "0E": 19}


@dataclass(slots=True, frozen=True)
class KeyType:
    code: str        # 3 characters: variant digit + LMK pair code
    name: str
    pair: int        # index 0-19 in the LMK set
    variant: int     # 0-9


def _kt(code: str, name: str) -> KeyType:
    return KeyType(code, name, PAIR_INDEX[code[1:]], int(code[0]))


KEY_TYPES: dict[str, KeyType] = {kt.code: kt for kt in (
    _kt("000", "ZMK"),
    _kt("001", "ZPK"),
    _kt("002", "TMK/TPK/PVK"),
    _kt("003", "TAK"),
    _kt("008", "ZAK"),
    _kt("009", "BDK"),
    _kt("109", "MK-AC"),
    _kt("402", "CVK"),
)}

ZMK, ZPK, TPK, TMK, PVK, TAK, ZAK, BDK, MK_AC, CVK = (
    "000", "001", "002", "002", "002", "003", "008", "009", "109", "402")


def key_type(code: str) -> KeyType:
    kt = KEY_TYPES.get(code)
    if kt is None:
        raise HsmError(E_KEY_TYPE, "unknown key type code")
    return kt


# The Thales test LMK set (hsm.md 2).
TEST_LMK_PAIRS = (
    "01010101010101017902CD1FD36EF8BA", "20202020202020203131313131313131",
    "40404040404040405151515151515151", "61616161616161617070707070707070",
    "80808080808080809191919191919191", "A1A1A1A1A1A1A1A1B0B0B0B0B0B0B0B0",
    "C1C1010101010101D0D0010101010101", "E0E0010101010101F1F1010101010101",
    "1C587F1C13924FEF0101010101010101", "01010101010101010101010101010101",
    "02020202020202020404040404040404", "07070707070707071010101010101010",
    "13131313131313131515151515151515", "16161616161616161919191919191919",
    "1A1A1A1A1A1A1A1A1C1C1C1C1C1C1C1C", "23232323232323232525252525252525",
    "26262626262626262929292929292929", "2A2A2A2A2A2A2A2A2C2C2C2C2C2C2C2C",
    "2F2F2F2F2F2F2F2F3131313131313131", "01010101010101010101010101010101",
)

_HEX = frozenset(b"0123456789ABCDEFabcdef")


def is_hex(text: bytes | str) -> bool:
    b = text.encode("latin-1") if isinstance(text, str) else text
    return bool(b) and _HEX.issuperset(b)


def split_key_text(text: bytes | str) -> tuple[str, bytes]:
    """``(scheme, encrypted bytes)`` of a key as text; HsmError 15/26 when malformed.

    The scheme is ``""`` for 16 bare hex digits (``Z`` is the same), ``X`` or
    ``U`` for double length, ``Y`` or ``T`` for triple length. 32 bare hex
    digits are not a key here (see :func:`split_key_pair`).
    """
    t = text.decode("latin-1") if isinstance(text, (bytes, bytearray)) else text
    if not t:
        raise HsmError(E_INPUT, "empty key")
    first = t[0].upper()
    if first in "0123456789ABCDEF" and len(t) == 16:
        scheme, body = "", t
    elif first.isalpha() and first not in "ABCDEF":
        if first not in SCHEME_LENGTH:
            raise HsmError(E_SCHEME, "unknown key scheme")
        scheme, body = ("" if first == "Z" else first), t[1:]
    else:
        raise HsmError(E_INPUT, "key is not 16 hex digits")
    if len(body) != 2 * SCHEME_LENGTH[scheme] or not is_hex(body):
        raise HsmError(E_INPUT, "key digits malformed")
    return scheme, bytes.fromhex(body)


def _with_variants(pair: bytes, variant: int, scheme_variant: int) -> bytes:
    b = bytearray(pair)
    b[0] ^= VARIANTS[variant]
    b[8] ^= scheme_variant
    return bytes(b)


def encrypt_under_kek(kek: bytes, clear: bytes, scheme: str) -> str:
    """``clear`` (8, 16 or 24 bytes) under a double-length ``kek`` as key text.

    ``U``/``T`` use the scheme variants on the KEK's byte 8 per part; ``X``/``Y``
    and single length are plain TDES ECB. ``scheme`` ``""`` or ``Z`` = single.
    """
    scheme = "" if scheme == "Z" else scheme
    if SCHEME_LENGTH.get(scheme) != len(clear):
        raise HsmError(E_KEY_LEN, "key length does not fit the key scheme")
    if scheme in ("U", "T"):
        out = b"".join(tdes_ecb_encrypt(_with_variants(kek, 0, v), clear[8 * i:8 * i + 8])
                       for i, v in enumerate(SCHEME_VARIANTS[scheme]))
    else:
        out = tdes_ecb_encrypt(kek, clear)
    return scheme + out.hex().upper()


def decrypt_under_kek(kek: bytes, scheme: str, enc: bytes) -> bytes:
    """The inverse of :func:`encrypt_under_kek` (no parity check here)."""
    if scheme in ("U", "T"):
        return b"".join(tdes_ecb_decrypt(_with_variants(kek, 0, v), enc[8 * i:8 * i + 8])
                        for i, v in enumerate(SCHEME_VARIANTS[scheme]))
    return tdes_ecb_decrypt(kek, enc)


class Lmk:
    """One LMK set. ``Lmk.test()`` is the Thales test set."""

    __slots__ = ("pairs", "_keys")

    def __init__(self, pairs: list[bytes] | tuple[bytes, ...]) -> None:
        if len(pairs) != 20:
            raise LmkError(f"an LMK set has 20 pairs, not {len(pairs)}")
        for i, p in enumerate(pairs):
            if len(p) != 16:
                raise LmkError(f"LMK pair {i:02d} is {len(p)} bytes, not 16")
            if not check_odd_parity(p):
                raise LmkError(f"LMK pair {i:02d} does not have odd parity")
        self.pairs = tuple(bytes(p) for p in pairs)
        # (pair, variant, scheme) -> the TDES keys, one per 8-byte part.
        self._keys: dict[tuple[int, int, str], tuple[bytes, ...]] = {}

    @classmethod
    def test(cls) -> Lmk:
        return cls([bytes.fromhex(p) for p in TEST_LMK_PAIRS])

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> Lmk:
        pairs: dict[int, bytes] = {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"(\d{2})\s+([0-9A-Fa-f]{32})", line)
            if not m:
                raise LmkError(f"{source}:{lineno}: expected 'NN HEX32' (pair index, 32 hex digits)")
            idx = int(m.group(1))
            if idx > 19:
                raise LmkError(f"{source}:{lineno}: pair index {idx:02d} is not 00-19")
            if idx in pairs:
                raise LmkError(f"{source}:{lineno}: pair {idx:02d} given twice")
            pairs[idx] = bytes.fromhex(m.group(2))
        missing = [f"{i:02d}" for i in range(20) if i not in pairs]
        if missing:
            raise LmkError(f"{source}: LMK pairs missing: {', '.join(missing)}")
        try:
            return cls([pairs[i] for i in range(20)])
        except LmkError as e:
            raise LmkError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Lmk:
        p = Path(path)
        try:
            text = p.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise LmkError(f"{p}: cannot read the LMK file ({e.__class__.__name__})") from None
        return cls.parse(text, str(p))

    def check_value(self) -> str:
        """16 hex: pair 00-01 encrypting a zero block; tells one LMK set from another."""
        return tdes_ecb_encrypt(self.pairs[0], bytes(8)).hex().upper()

    def _lmk_keys(self, kt: KeyType, scheme: str) -> tuple[bytes, ...]:
        k = (kt.pair, kt.variant, scheme)
        keys = self._keys.get(k)
        if keys is None:
            pair = self.pairs[kt.pair]
            keys = tuple(_with_variants(pair, kt.variant, v) for v in SCHEME_VARIANTS[scheme])
            self._keys[k] = keys
        return keys

    def encrypt(self, clear: bytes, key_type_code: str) -> str:
        """Key text of ``clear`` (8, 16 or 24 bytes) under this LMK for the key type."""
        scheme = {8: "", 16: "U", 24: "T"}.get(len(clear))
        if scheme is None:
            raise HsmError(E_KEY_LEN, "a DES key is 8, 16 or 24 bytes")
        keys = self._lmk_keys(key_type(key_type_code), scheme)
        return scheme + b"".join(tdes_ecb_encrypt(k, clear[8 * i:8 * i + 8])
                                 for i, k in enumerate(keys)).hex().upper()

    def decrypt(self, text: bytes | str, key_type_code: str, *, dest: bool = False) -> bytes:
        """The clear key of ``text`` of the key type; HsmError 10 (11 when ``dest``) on bad parity."""
        scheme, enc = split_key_text(text)
        if scheme in ("X", "Y"):
            raise HsmError(E_SCHEME, "X/Y schemes are for keys under a ZMK, not the LMK")
        keys = self._lmk_keys(key_type(key_type_code), scheme)
        clear = b"".join(tdes_ecb_decrypt(k, enc[8 * i:8 * i + 8]) for i, k in enumerate(keys))
        if not check_odd_parity(clear):
            raise HsmError(E_DST_PARITY if dest else E_SRC_PARITY, "key parity")
        return clear


TEST_LMK = Lmk.test()


def encrypt_under_lmk(clear: bytes, key_type: str, lmk: Lmk | None = None) -> str:
    """``clear`` under the LMK (the test LMK unless given) for ``key_type`` (e.g. ``"001"``)."""
    return (lmk or TEST_LMK).encrypt(clear, key_type)


def decrypt_under_lmk(text: bytes | str, key_type: str, lmk: Lmk | None = None, *,
                      dest: bool = False) -> bytes:
    """The clear key of ``text``; HsmError with code 10 (source) or 11 (``dest``) on bad parity."""
    return (lmk or TEST_LMK).decrypt(text, key_type, dest=dest)
