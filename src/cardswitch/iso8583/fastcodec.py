"""A specialised ISO 8583 encoder/decoder compiled from a pyiso8583 spec.

pyiso8583 interprets its spec dict for every field of every message; here the
spec is turned once into per-field tables (indexed by field number) and the
hot loops work on one ``str`` view of the frame (latin-1, one char per byte),
so a typical 0200 decodes or encodes several times faster (bench/bench_codec.py).

Contract, checked by differential tests against pyiso8583:

- decode: for any input the result equals pyiso8583's ``decode`` (bitmaps and
  header removed, the ``upper_fields`` upper-cased), and every input pyiso8583
  rejects raises :class:`DecodeError`. Nothing else is ever raised for bytes.
- encode: the bytes equal pyiso8583's ``encode`` of the same dict (with the
  ``upper_fields`` upper-cased); whatever pyiso8583 rejects raises
  :class:`EncodeError`. The fast path is optimistic: on anything unusual it
  hands the message to pyiso8583 itself, so the two cannot disagree.

Supported field kinds: fixed and LL../LLL.. variable fields; data as text in
any Python codec or binary (``"b"``, hex text inside); lengths as text
digits, binary or BCD; MTI and bitmaps as text or binary. Specs using a
message header (``h`` with ``max_len > 0``) or nibble lengths raise
:class:`UnsupportedSpec`; :class:`cardswitch.iso8583.dialect.Dialect` then
uses pyiso8583 for them.
"""

from __future__ import annotations

import binascii
import codecs
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import iso8583 as _pyiso  # pyiso8583 (absolute import; our package is cardswitch.iso8583)

Message = dict[str, str]

__all__ = [
    "DecodeError",
    "EncodeError",
    "FastCodec",
    "Message",
    "UnsupportedSpec",
    "reference_decode",
    "reference_encode",
]


class DecodeError(ValueError):
    """A frame that is not a valid message of the dialect.

    ``partial`` holds the fields read, in order, before the first broken one
    (MTI, then data fields; never bitmaps), so the caller can answer 30 echoing
    the MTI, field 11 and field 41 where they were readable. A frame whose MTI
    is not 4 digits gives an empty ``partial``. It may hold a PAN or track 2:
    never log it whole. ``reason`` names the field and byte offset, no data.
    """

    def __init__(self, reason: str, partial: Message | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial or {}


class EncodeError(ValueError):
    """A message that cannot be encoded (a value too long, bad characters)."""


class UnsupportedSpec(ValueError):
    """The spec uses something the fast codec does not compile (header, nibbles)."""


# Field kinds in the compiled tables.
_TXT = 0       # ASCII text (the hot case)
_BIN = 1       # binary on the wire, upper-case hex text inside
_GEN = 2       # text in another codec (EBCDIC, latin-1, ...)
_MISSING = 3   # no spec for this field number: present means an error
_TXT_UP = 4    # ASCII text carrying hex: upper-cased both ways

_BIT1 = 1 << 63            # field 1 / 65 in a 64-bit bitmap word
_PLAN_CACHE_MAX = 4096     # distinct bitmaps remembered per codec


def _check_codec(name: str, what: str) -> None:
    try:
        codecs.lookup(name)
    except LookupError:
        raise UnsupportedSpec(f"{what}: unknown encoding {name!r}") from None


def _kind_of(data_enc: str) -> int:
    if data_enc == "b":
        return _BIN
    if codecs.lookup(data_enc).name == "ascii":
        return _TXT
    return _GEN


def _length_prefixes(fs: Mapping[str, Any], key: str) -> tuple[list[str | None], dict[str, int]]:
    """Encoded length prefixes (latin-1 text) for 0..max_len, and their inverse.

    A length pyiso8583 cannot write in the prefix gets ``None``. Tables are
    shared between fields (and codecs) of the same length format.
    """
    len_enc = fs["len_enc"]
    if len_enc not in ("b", "bcd"):
        _check_codec(len_enc, f"field {key} len_enc")
    return _prefix_tables(fs["len_type"], fs["max_len"], len_enc)


@functools.lru_cache(maxsize=None)
def _prefix_tables(len_type: int, max_len: int, len_enc: str) -> tuple[list[str | None], dict[str, int]]:
    enc: list[str | None] = []
    dec: dict[str, int] = {}
    for n in range(max_len + 1):
        if len_enc == "b":
            try:
                raw = n.to_bytes(len_type, "big", signed=False)
            except OverflowError:
                raw = None
        elif len_enc == "bcd":
            digits = "%0*d" % (len_type * 2, n)
            raw = bytes.fromhex(digits) if len(digits) <= len_type * 2 else None
        else:
            raw = ("%0*d" % (len_type, n)).encode(len_enc)
            if len(raw) > len_type:
                raw = None
        if raw is None:
            enc.append(None)
            continue
        text = raw.decode("latin-1")
        enc.append(text)
        dec[text] = n
    return enc, dec


class _Field:
    """One data field of the spec, compiled."""

    __slots__ = ("num", "key", "kind", "len_type", "max_len", "upper", "codec",
                 "len_enc", "enc_prefix", "dec_prefix", "row")

    def __init__(self, num: int, fs: Mapping[str, Any] | None, upper: bool) -> None:
        self.num = num
        self.key = str(num)
        self.upper = False
        self.len_type = 0
        self.max_len = 0
        self.codec = "ascii"
        self.len_enc = "ascii"
        self.enc_prefix: list[str | None] = []
        self.dec_prefix: dict[str, int] = {}
        if fs is None:
            self.kind = _MISSING
            self.row = (self.key, _MISSING, 0, 0, {}, self)
            return
        if fs.get("len_count", "bytes") != "bytes":
            raise UnsupportedSpec(f"field {num}: len_count {fs.get('len_count')!r}")
        data_enc = fs["data_enc"]
        if data_enc != "b":
            _check_codec(data_enc, f"field {num} data_enc")
        self.kind = _kind_of(data_enc)
        self.codec = data_enc
        self.len_type = fs["len_type"]
        self.max_len = fs["max_len"]
        self.len_enc = fs["len_enc"]
        self.upper = upper and self.kind == _TXT
        if self.len_type:
            self.enc_prefix, self.dec_prefix = _length_prefixes(fs, self.key)
        # What the hot loops unpack: key, kind, length-prefix width, length
        # (fixed) or maximum (variable), prefix text -> length, self.
        kind = _TXT_UP if self.upper else self.kind
        self.row = (self.key, kind, self.len_type, self.max_len, self.dec_prefix, self)

    def decode_length(self, raw: str) -> int:
        """The declared length of a variable field, exactly as pyiso8583 reads it.

        ``raw`` is the prefix as latin-1 text. Raises ValueError with the reason.
        """
        n = self.dec_prefix.get(raw)
        if n is not None:
            return n
        b = raw.encode("latin-1")
        if self.len_enc == "b":
            n = int.from_bytes(b, "big", signed=False)
        elif self.len_enc == "bcd":
            try:
                n = int(b.hex(), 10)
            except ValueError:
                raise ValueError("Failed to decode field length, invalid BCD data") from None
        else:
            try:
                text = b.decode(self.len_enc)
            except UnicodeDecodeError:
                raise ValueError("Failed to decode field length, invalid data") from None
            try:
                n = int(text)   # int() leniency (" 5", "+5", "0_5") is pyiso8583's too
            except ValueError:
                raise ValueError("Failed to decode field length, non-numeric data") from None
        if n > self.max_len:
            raise ValueError(f"Field data is {n} bytes, larger than maximum {self.max_len}")
        if n < 0:
            raise ValueError(f"Field data is 0 bytes, expecting {n}")
        return n


class _Header:
    """MTI or bitmap layout: byte width and how it is written."""

    __slots__ = ("kind", "codec", "width")

    def __init__(self, fs: Mapping[str, Any], bin_width: int, text_width: int, what: str) -> None:
        data_enc = fs["data_enc"]
        if data_enc != "b":
            _check_codec(data_enc, f"{what} data_enc")
        self.kind = _kind_of(data_enc)
        self.codec = data_enc
        self.width = bin_width if self.kind == _BIN else text_width


class FastCodec:
    """Encoder/decoder for one pyiso8583 spec.

    ``upper_fields``: keys of text fields that carry hex (52, 55, 64, 128 in
    the ASCII dialect); they are upper-cased on decode and on encode.
    """

    __slots__ = ("spec", "upper_fields", "_fields", "_keynum", "_mti", "_bm",
                 "_ascii_only", "_plans", "_plans2", "_enc_plans")

    def __init__(self, spec: Mapping[str, Mapping[str, Any]], upper_fields: Iterable[str] = ()) -> None:
        self.spec = spec
        self.upper_fields = frozenset(upper_fields)
        h = spec.get("h")
        if h is not None and h.get("max_len", 0) > 0:
            raise UnsupportedSpec("message header (field h) is not compiled")
        for k in ("t", "p", "1"):
            if k not in spec:
                raise UnsupportedSpec(f"spec has no field {k!r}")
        self._mti = _Header(spec["t"], 2, 4, "MTI")
        self._bm = _Header(spec["p"], 8, 16, "bitmap")
        sec = _Header(spec["1"], 8, 16, "secondary bitmap")
        if (sec.kind, sec.codec) != (self._bm.kind, self._bm.codec):
            raise UnsupportedSpec("primary and secondary bitmaps differ in encoding")
        fields: list[_Field | None] = [None] * 193
        keynum: dict[Any, int] = {"t": 0, "p": 0, "h": 0, "1": 0, "65": 0}
        for num in range(2, 193):
            if num == 65:
                continue   # the bit announces a tertiary bitmap; never a data field
            fs = spec.get(str(num))
            f = _Field(num, fs, str(num) in self.upper_fields)
            fields[num] = f
            if fs is not None:
                keynum[f.key] = num
        self._fields = fields
        self._keynum = keynum
        self._ascii_only = (
            self._mti.kind == _TXT and self._bm.kind == _TXT
            and all(f.kind in (_TXT, _MISSING) and (not f.len_type or f.len_enc == "ascii")
                    for f in fields if f is not None)
        )
        self._plans: dict[str, tuple[tuple[tuple, ...], bool]] = {}
        self._plans2: dict[str, tuple[tuple[tuple, ...], bool]] = {}
        self._enc_plans: dict[tuple, tuple[tuple[tuple, ...], str]] = {}

    # ------------------------------------------------------------------ decode

    def _bitmap_word(self, raw: str) -> int:
        """64 bits of a bitmap from its wire text (latin-1); ValueError if unreadable."""
        bm = self._bm
        if bm.kind == _BIN:
            return int.from_bytes(raw.encode("latin-1"), "big")
        if bm.kind == _TXT:
            if not raw.isascii():
                raise ValueError("Failed to decode field, invalid data")
            text = raw
        else:
            try:
                text = raw.encode("latin-1").decode(bm.codec)
            except UnicodeDecodeError:
                raise ValueError("Failed to decode field, invalid data") from None
        try:
            b = bytes.fromhex(text)   # like pyiso8583: whitespace between pairs is skipped
        except ValueError:
            raise ValueError("Failed to decode field, non-hex data") from None
        return int.from_bytes(b.ljust(8, b"\0"), "big")

    def _fields_of(self, word: int, offset: int) -> tuple[tuple[tuple, ...], bool]:
        """The rows of the data fields a bitmap word announces, in order, and whether its bit 1 is set."""
        fields = self._fields
        out = tuple(fields[offset + k].row for k in range(2, 65) if word >> (64 - k) & 1)
        return out, bool(word & _BIT1)

    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"ISO 8583 data must be bytes, not {type(data).__name__}")
            data = bytes(data)
        s = data.decode("latin-1")
        n = len(s)
        all_ascii = data.isascii()
        doc: Message = {}

        # MTI
        mti = self._mti
        i = mti.width
        if n < i:
            raise _error(f"Field data is {n} bytes, expecting {i}", "t", 0, doc)
        if mti.kind == _TXT:
            v = s[:i]
            if not all_ascii and not v.isascii():
                raise _error("Failed to decode field, invalid data", "t", 0, doc)
        elif mti.kind == _BIN:
            v = data[:i].hex().upper()
        else:
            try:
                v = data[:i].decode(mti.codec)
            except UnicodeDecodeError:
                raise _error("Failed to decode field, invalid data", "t", 0, doc) from None
        doc["t"] = v

        # Bitmaps, all read before any field (as pyiso8583 does). Plans (the
        # fields a bitmap announces) are cached by the bitmaps' wire text.
        w = self._bm.width
        j = i + w
        hit = self._plans.get(s[i:j])
        if hit is None:
            hit = self._plan_primary(s, i, n, doc)
        rows, more = hit
        i = j
        if more:
            j = i + w
            hit = self._plans2.get(s[i - w:j])
            if hit is None:
                hit = self._plan_secondary(s, i, n, rows, doc)
            rows, more = hit
            i = j
            if more:   # bit 65: a tertiary bitmap follows
                rows = self._plan_tertiary(s, i, n, rows, doc)
                i += w

        i = self._decode_fields(rows, data, s, i, n, all_ascii, doc)
        if i != n:
            raise _error("Extra data after last field", rows[-1][0] if rows else "p", i, doc)
        return doc

    def _decode_fields(self, rows: tuple, data: bytes, s: str, i: int, n: int, all_ascii: bool, doc: Message) -> int:
        """Read the fields of ``rows`` from offset ``i`` into ``doc``; the offset after them."""
        for key, kind, lt, ln, prefixes, f in rows:
            if lt:
                j = i + lt
                ln = prefixes.get(s[i:j])
                if ln is None:
                    if j > n:
                        raise _error(f"Field length is {n - i} bytes wide, expecting {lt}", key, i, doc)
                    try:
                        ln = f.decode_length(s[i:j])
                    except ValueError as e:
                        raise _error(str(e), key, i, doc) from None
                i = j
            j = i + ln
            if j > n:
                raise _error(f"Field data is {n - i} bytes, expecting {ln}", key, i, doc)
            if kind == _TXT:
                v = s[i:j]
                if not all_ascii and not v.isascii():
                    raise _error("Failed to decode field, invalid data", key, i, doc)
            elif kind == _BIN:
                v = data[i:j].hex().upper()
            elif kind == _TXT_UP:
                v = s[i:j]
                if not all_ascii and not v.isascii():
                    raise _error("Failed to decode field, invalid data", key, i, doc)
                v = v.upper()
            elif kind == _GEN:
                try:
                    v = data[i:j].decode(f.codec)
                except UnicodeDecodeError:
                    raise _error("Failed to decode field, invalid data", key, i, doc) from None
            else:
                raise _error(f"no spec for field {key}", key, i, doc)
            doc[key] = v
            i = j
        return i

    def _plan_primary(self, s: str, i: int, n: int, doc: Message) -> tuple[tuple, bool]:
        w = self._bm.width
        if i + w > n:
            raise _error(f"Field data is {n - i} bytes, expecting {w}", "p", i, doc)
        raw = s[i:i + w]
        try:
            hit = self._fields_of(self._bitmap_word(raw), 0)
        except ValueError as e:
            raise _error(str(e), "p", i, doc) from None
        if len(self._plans) >= _PLAN_CACHE_MAX:
            self._plans.clear()
        self._plans[raw] = hit
        return hit

    def _plan_secondary(self, s: str, i: int, n: int, rows: tuple, doc: Message) -> tuple[tuple, bool]:
        w = self._bm.width
        if i + w > n:
            raise _error(f"Field data is {n - i} bytes, expecting {w}", "1", i, doc)
        try:
            sec, ter = self._fields_of(self._bitmap_word(s[i:i + w]), 64)
        except ValueError as e:
            raise _error(str(e), "1", i, doc) from None
        hit = (rows + sec, ter)
        if len(self._plans2) >= _PLAN_CACHE_MAX:
            self._plans2.clear()
        self._plans2[s[i - w:i + w]] = hit
        return hit

    def _plan_tertiary(self, s: str, i: int, n: int, rows: tuple, doc: Message) -> tuple[tuple, ...]:
        w = self._bm.width
        if i + w > n:
            raise _error(f"Field data is {n - i + w} bytes, expecting {2 * w}", "1", i, doc)
        try:
            word = self._bitmap_word(s[i:i + w])
        except ValueError as e:
            raise _error(str(e), "1", i, doc) from None
        fields = self._fields
        # Bit 1 of this word is field 129, a data field.
        return rows + tuple(fields[128 + k].row for k in range(1, 65) if word >> (64 - k) & 1)

    # ------------------------------------------------------------------ encode

    def encode(self, msg: Message) -> bytes:
        if not isinstance(msg, dict):
            raise TypeError(f"ISO 8583 message must be a dict, not {type(msg).__name__}")
        try:
            out = self._encode_fast(msg)
        except Exception:   # anything unusual: pyiso8583 decides (and names the problem)
            out = None
        if out is None:
            return self.reference_encode(msg)
        return out

    def _encode_plan(self, keys: tuple) -> tuple[tuple[tuple, ...], str] | None:
        """Rows of the fields present, in order, and the bitmaps' wire text; None if unusual keys."""
        keynum = self._keynum
        nums: list[int] = []
        for k in keys:
            num = keynum.get(k)
            if num is None:
                if isinstance(k, str) and not k.isnumeric():
                    continue   # pyiso8583 ignores keys that are not field numbers
                return None
            if num:
                nums.append(num)
        nums.sort()
        pri = sec = ter = 0
        for num in nums:
            if num < 65:
                pri |= 1 << (64 - num)
            elif num < 129:
                sec |= 1 << (128 - num)
            else:
                ter |= 1 << (192 - num)
        if ter:
            sec |= _BIT1
        if sec:
            pri |= _BIT1
        bitmaps = self._bitmap_text(pri)
        if sec:
            bitmaps += self._bitmap_text(sec)
            if ter:
                bitmaps += self._bitmap_text(ter)
        fields = self._fields
        return tuple(fields[num].row for num in nums), bitmaps

    def _encode_fast(self, msg: Message) -> bytes | None:
        keys = tuple(msg)
        hit = self._enc_plans.get(keys)
        if hit is None:
            hit = self._encode_plan(keys)
            if hit is None:
                return None
            if len(self._enc_plans) >= _PLAN_CACHE_MAX:
                self._enc_plans.clear()
            self._enc_plans[keys] = hit
        plan, bitmaps = hit
        ascii_only = self._ascii_only

        mti = msg["t"]
        m = self._mti
        if m.kind == _TXT:
            if len(mti) != 4 or not mti.isascii():
                return None
        elif m.kind == _BIN:
            b = binascii.a2b_hex(mti)
            if len(b) != 2:
                return None
            mti = b.decode("latin-1")
        else:
            b = mti.encode(m.codec)
            if len(b) != 4:
                return None
            mti = b.decode("latin-1")
        parts = [mti, bitmaps]
        append = parts.append

        # Non-str values fail the join (TypeError), non-ASCII text the final
        # encode in an all-ASCII dialect: both fall back to pyiso8583.
        for key, kind, lt, mx, prefixes, f in plan:
            v = msg[key]
            if kind == _TXT:
                if not ascii_only and not v.isascii():
                    return None
            elif kind == _BIN:
                v = binascii.a2b_hex(v).decode("latin-1")
            elif kind == _TXT_UP:
                if not v.isascii():
                    return None
                v = v.upper()
            else:
                v = v.encode(f.codec).decode("latin-1")
            if lt:
                ln = len(v)
                if ln > mx:
                    return None
                prefix = f.enc_prefix[ln]
                if prefix is None:
                    return None
                append(prefix)
            elif len(v) != mx:
                return None
            append(v)
        if ascii_only:
            return "".join(parts).encode("ascii")
        return "".join(parts).encode("latin-1")

    def _bitmap_text(self, word: int) -> str:
        bm = self._bm
        if bm.kind == _TXT:
            return "%016X" % word
        if bm.kind == _BIN:
            return word.to_bytes(8, "big").decode("latin-1")
        return ("%016X" % word).encode(bm.codec).decode("latin-1")

    # -------------------------------------------------------------- reference

    def reference_decode(self, data: bytes | bytearray | memoryview) -> Message:
        return reference_decode(data, self.spec, self.upper_fields)

    def reference_encode(self, msg: Message) -> bytes:
        return reference_encode(msg, self.spec, self.upper_fields)


def _error(reason: str, key: str, pos: int, doc: Message) -> DecodeError:
    """A DecodeError whose partial is what was read before ``key`` broke."""
    return DecodeError(f"{reason}: field {key} pos {pos}", _salvaged(doc))


def _salvaged(doc: Message) -> Message:
    mti = doc.get("t")
    if not (isinstance(mti, str) and len(mti) == 4 and mti.isascii() and mti.isdigit()):
        return {}
    return doc


# --------------------------------------------------------------------------
# The pyiso8583 path, normalised to our message representation. Kept for
# specs the fast codec does not compile and for differential tests.

def reference_decode(data: bytes | bytearray | memoryview, spec: Mapping, upper_fields: Iterable[str] = ()) -> Message:
    """pyiso8583's decode, bitmaps and header dropped, ``upper_fields`` upper-cased."""
    if isinstance(data, memoryview):
        data = bytes(data)
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"ISO 8583 data must be bytes, not {type(data).__name__}")
    try:
        doc, _ = _pyiso.decode(data, spec)
    except _pyiso.DecodeError as e:
        partial = dict(e.doc_dec)
        if not e.msg.startswith("Extra data"):
            partial.pop(e.field, None)   # the field being read when it broke
        raise DecodeError(str(e), _salvaged(_normalise(partial, upper_fields))) from None
    except Exception as e:  # pyiso8583 raises KeyError for a field without spec
        raise DecodeError(f"undecodable: {type(e).__name__} {e}", {}) from None
    return _normalise(doc, upper_fields)


def _normalise(doc: dict, upper_fields: Iterable[str]) -> Message:
    doc.pop("p", None)
    doc.pop("1", None)
    doc.pop("h", None)
    for k in upper_fields:
        v = doc.get(k)
        if v is not None:
            doc[k] = v.upper()
    return doc


def reference_encode(msg: Message, spec: Mapping, upper_fields: Iterable[str] = ()) -> bytes:
    """pyiso8583's encode of ``msg`` with ``upper_fields`` upper-cased (msg is not changed)."""
    if not isinstance(msg, dict):
        raise TypeError(f"ISO 8583 message must be a dict, not {type(msg).__name__}")
    doc = dict(msg)
    for k in upper_fields:
        v = doc.get(k)
        if isinstance(v, str) and v.isascii():
            doc[k] = v.upper()
    try:
        raw, _ = _pyiso.encode(doc, spec)
    except _pyiso.EncodeError as e:
        raise EncodeError(str(e)) from None
    except Exception as e:  # unusual keys or values make pyiso8583 raise others
        raise EncodeError(f"cannot encode: {type(e).__name__} {e}") from None
    return bytes(raw)
