"""Byte-level access to ISO 8583 messages of an all-ASCII spec, without decoding.

The bench tools (instant bank, relay, load generator) must cost as little CPU
as possible so that what a run measures is the process in the middle. They
never build a field dict: they find where a field's bytes sit and copy or
patch them.

Where the fields sit depends only on the bitmap and on the length prefixes of
the variable fields, so a ``Layout`` compiles, once per distinct bitmap, the
list of fields present with their fixed length or length-prefix size, and
caches it. Finding a field is then a short walk over that plan.

Only specs whose MTI, bitmaps, lengths and data are all ASCII (such as
pyiso8583's ``default_ascii``, the project's default wire dialect) are
supported; ``Layout`` refuses anything else.
"""

from __future__ import annotations

import iso8583.specs as _pyspecs

from cardswitch.iso8583.constants import F, response_mti

# Plan entry: (field number, fixed length or 0, length-prefix digits or 0)
PlanEntry = tuple[int, int, int]

_HEX_HIGH = frozenset(b"89ABCDEFabcdef")   # first bitmap digit with bit 1 set


class MalformedMessage(ValueError):
    """The bytes are not a message of the layout's spec."""


class Layout:
    """Compiled field positions for one all-ASCII pyiso8583 spec."""

    __slots__ = ("fixed", "lenlen", "_plans", "_finders")

    def __init__(self, spec: dict) -> None:
        for key in ("t", "p", "1"):
            f = spec[key]
            if f["len_type"] != 0 or f["data_enc"] != "ascii":
                raise ValueError(f"field {key}: only fixed ASCII MTI and bitmaps are supported")
        if spec["t"]["max_len"] != 4 or spec["p"]["max_len"] != 16:
            raise ValueError("only a 4-character MTI and a 16-hex-digit bitmap are supported")
        self.fixed = [0] * 129
        self.lenlen = [0] * 129
        for n in range(2, 129):
            f = spec[str(n)]
            if f["data_enc"] != "ascii" or f["len_enc"] != "ascii":
                raise ValueError(f"field {n}: only ASCII data and lengths are supported")
            if f["len_type"]:
                self.lenlen[n] = f["len_type"]
            else:
                self.fixed[n] = f["max_len"]
        self._plans: dict[bytes, tuple[int, tuple[PlanEntry, ...]]] = {}
        self._finders: dict[tuple[bytes, int], tuple[int, tuple[tuple[int, int], ...], int]] = {}

    # -- the plan of one bitmap ------------------------------------------------

    @staticmethod
    def bitmap_key(buf: bytes) -> bytes:
        """The bitmap bytes (16 or 32 hex digits) that decide the layout."""
        if len(buf) < 20:
            raise MalformedMessage("shorter than MTI and bitmap")
        if buf[4] in _HEX_HIGH:
            if len(buf) < 36:
                raise MalformedMessage("secondary bitmap announced but missing")
            return bytes(buf[4:36])
        return bytes(buf[4:20])

    def plan(self, key: bytes) -> tuple[int, tuple[PlanEntry, ...]]:
        """(offset of the first field, fields present in order) for a bitmap."""
        got = self._plans.get(key)
        if got is not None:
            return got
        try:
            bits = int(key, 16)
        except ValueError:
            raise MalformedMessage("bitmap is not hex") from None
        nbits = len(key) * 4
        entries = []
        for n in range(2, nbits + 1):
            if bits >> (nbits - n) & 1:
                entries.append((n, self.fixed[n], self.lenlen[n]))
        got = (4 + len(key), tuple(entries))
        if len(self._plans) < 4096:
            self._plans[key] = got
        return got

    # -- finding fields ----------------------------------------------------------

    def spans(self, buf: bytes) -> dict[int, tuple[int, int]]:
        """Every field present: number -> (start, end) of its value (no prefix)."""
        pos, entries = self.plan(self.bitmap_key(buf))
        out: dict[int, tuple[int, int]] = {}
        size = len(buf)
        for n, fixed, ll in entries:
            if fixed:
                end = pos + fixed
            else:
                digits = buf[pos:pos + ll]
                if len(digits) != ll or not digits.isdigit():
                    raise MalformedMessage(f"field {n}: bad length prefix")
                pos += ll
                end = pos + int(digits)
            if end > size:
                raise MalformedMessage(f"field {n}: runs past the end")
            out[n] = (pos, end)
            pos = end
        if pos != size:
            raise MalformedMessage(f"{size - pos} bytes after the last field")
        return out

    def find(self, buf: bytes, field: int) -> tuple[int, int] | None:
        """(start, end) of one field's value, or None when absent.

        Cheaper than ``spans``: consecutive fixed fields before it are one
        precomputed skip; only the length prefixes on the way are read.
        Does not check the rest of the message.
        """
        key = self.bitmap_key(buf)
        finder = self._finders.get((key, field))
        if finder is None:
            finder = self._compile_finder(key, field)
        start, steps, length = finder
        if start < 0:
            return None
        pos = start
        for skip, ll in steps:
            pos += skip
            if ll:
                digits = buf[pos:pos + ll]
                if len(digits) != ll or not digits.isdigit():
                    raise MalformedMessage("bad length prefix")
                pos += ll + int(digits)
        if length:
            end = pos + length
        else:  # the wanted field is variable: its own prefix was the last step
            ll = self.lenlen[field]
            digits = buf[pos:pos + ll]
            if len(digits) != ll or not digits.isdigit():
                raise MalformedMessage(f"field {field}: bad length prefix")
            pos += ll
            end = pos + int(digits)
        if end > len(buf):
            raise MalformedMessage(f"field {field}: runs past the end")
        return pos, end

    def _compile_finder(self, key: bytes, field: int):
        start, entries = self.plan(key)
        steps: list[tuple[int, int]] = []
        skip = 0
        for n, fixed, ll in entries:
            if n == field:
                if skip:
                    steps.append((skip, 0))
                finder = (start, tuple(steps), fixed)
                break
            if fixed:
                skip += fixed
            else:
                steps.append((skip, ll))
                skip = 0
        else:
            finder = (-1, (), 0)
        if len(self._finders) < 16384:
            self._finders[(key, field)] = finder
        return finder

    def answerer(self, keep: frozenset[int], add: dict[int, bytes]) -> "Answerer":
        """A builder of answers keeping ``keep``'s fields and adding ``add``'s."""
        return Answerer(self, keep, add)


_SKIP, _COPY, _SKIP_VAR, _COPY_VAR, _INSERT = range(5)


class Answerer:
    """Builds a new message from a request by copying fields byte for byte.

    The answer has the response MTI of the request's (or a given one), the
    request's fields listed in ``keep``, and the fields of ``add`` (number ->
    value with its length prefix, see ``encode_added``; replacing a copied
    field of the same number). Per bitmap it compiles a short list of
    operations: runs of consecutive fixed fields are one copy or one skip.
    """

    __slots__ = ("layout", "keep", "add", "_recipes", "_mtis")

    def __init__(self, layout: Layout, keep: frozenset[int], add: dict[int, bytes]) -> None:
        for n, v in add.items():
            if layout.fixed[n] and len(v) != layout.fixed[n]:
                raise ValueError(f"field {n} must be {layout.fixed[n]} characters")
        self.layout = layout
        self.keep = frozenset(keep)
        self.add = dict(add)
        self._recipes: dict[bytes, tuple] = {}
        self._mtis: dict[bytes, bytes] = {}

    def answer(self, buf: bytes, mti: bytes | None = None) -> bytes:
        key = Layout.bitmap_key(buf)
        recipe = self._recipes.get(key)
        if recipe is None:
            recipe = self._compile(key)
        out_bitmap, ops = recipe
        if mti is None:
            m = buf[:4]
            mti = self._mtis.get(m)
            if mti is None:
                mti = self._response_mti(m)
        parts = [mti, out_bitmap]
        pos = 4 + len(key)
        for code, v in ops:
            if code == _SKIP:
                pos += v
            elif code == _COPY:
                end = pos + v
                parts.append(buf[pos:end])
                pos = end
            elif code == _INSERT:
                parts.append(v)
            else:
                digits = buf[pos:pos + v]
                if len(digits) != v or not digits.isdigit():
                    raise MalformedMessage("bad length prefix")
                end = pos + v + int(digits)
                if code == _COPY_VAR:
                    parts.append(buf[pos:end])
                pos = end
        if pos != len(buf):
            raise MalformedMessage("fields do not fill the message")
        return b"".join(parts)

    def _response_mti(self, m: bytes) -> bytes:
        if len(m) != 4 or not m.isdigit():
            raise MalformedMessage("MTI is not 4 digits")
        out = response_mti(m.decode("ascii")).encode("ascii")
        if len(self._mtis) < 256:
            self._mtis[bytes(m)] = out
        return out

    def _compile(self, key: bytes) -> tuple[bytes, tuple]:
        _, entries = self.layout.plan(key)
        add = self.add
        kept = {n for n, _, _ in entries if n in self.keep and n not in add}
        fields = sorted(kept | set(add))
        secondary = any(n > 64 for n in fields)
        nbits = 128 if secondary else 64
        bits = 1 << (nbits - 1) if secondary else 0
        for n in fields:
            bits |= 1 << (nbits - n)
        out_bitmap = b"%0*X" % (nbits // 4, bits)
        # walk the request's fields and the added ones in field order
        inserts = sorted(add)
        ops: list[list] = []

        def push(code: int, v) -> None:
            if ops and code in (_SKIP, _COPY) and ops[-1][0] == code:
                ops[-1][1] += v   # merge runs of fixed fields
            else:
                ops.append([code, v])

        i = 0
        for n, fixed, ll in entries:
            while i < len(inserts) and inserts[i] < n:
                push(_INSERT, add[inserts[i]])
                i += 1
            copy = n in kept
            if fixed:
                push(_COPY if copy else _SKIP, fixed)
            else:
                push(_COPY_VAR if copy else _SKIP_VAR, ll)
        for n in inserts[i:]:
            push(_INSERT, add[n])
        recipe = (out_bitmap, tuple((c, v) for c, v in ops))
        if len(self._recipes) < 4096:
            self._recipes[key] = recipe
        return recipe


def encode_added(layout: Layout, fields: dict[int, str]) -> dict[int, bytes]:
    """Values for ``Answerer``'s ``add``: variable fields get their length prefix."""
    out: dict[int, bytes] = {}
    for n, v in fields.items():
        raw = v.encode("ascii")
        ll = layout.lenlen[n]
        out[n] = (b"%0*d" % (ll, len(raw)) + raw) if ll else raw
    return out


ASCII_LAYOUT = Layout(_pyspecs.default_ascii)

STAN = int(F.STAN)
RESPONSE_CODE = int(F.RESPONSE_CODE)


class Frames2:
    """2-byte length framing reader (wire.md 2), lighter than FrameReader:
    no header, no copy of the buffer when a read holds whole frames."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = 8192) -> None:
        self._buf = b""
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        """Whole payloads in ``data`` (plus what was held); keep-alives dropped.
        Raises ValueError for a declared length above ``max_frame``."""
        if self._buf:
            data = self._buf + data
        out = []
        pos = 0
        size = len(data)
        while size - pos >= 2:
            n = (data[pos] << 8) | data[pos + 1]
            if n > self.max_frame:
                raise ValueError(f"declared length {n} > {self.max_frame}")
            end = pos + 2 + n
            if end > size:
                break
            if n:
                out.append(data[pos + 2:end])
            pos = end
        self._buf = data[pos:] if pos < size else b""
        return out
