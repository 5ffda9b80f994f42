"""Dialects: how a message's fields become bytes.

A decoded message inside cardswitch is a ``dict[str, str]`` keyed like
pyiso8583 ("t" MTI, "2" PAN, ...), without bitmap keys. Binary-valued fields
(52, 55, 64, 128) are upper-case hex text whatever the dialect, so the
transaction logic never depends on the wire dialect.
"""

from __future__ import annotations

from dataclasses import dataclass

import iso8583 as _pyiso  # pyiso8583 (absolute import; our package is cardswitch.iso8583)
import iso8583.specs as _pyspecs

from cardswitch.iso8583.constants import BINARY_FIELDS, F

Message = dict[str, str]


class DecodeError(ValueError):
    """A frame that is not a valid message of the dialect.

    ``partial`` holds what could still be read (at least the MTI and field 11
    when they were readable), so the caller can answer 30 where possible.
    """

    def __init__(self, reason: str, partial: Message | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial or {}


class EncodeError(ValueError):
    """A message that cannot be encoded (a value too long, bad characters)."""


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    spec: dict

    @property
    def binary_fields(self) -> tuple[str, ...]:
        return tuple(k for k in BINARY_FIELDS if self.spec[k]["data_enc"] == "b")

    def decode(self, data: bytes) -> Message:
        try:
            doc, _ = _pyiso.decode(bytes(data), self.spec)
        except _pyiso.DecodeError as e:
            raise DecodeError(str(e), _salvage(data, self)) from None
        except Exception as e:  # pyiso8583 may raise others on hostile input
            raise DecodeError(f"undecodable: {type(e).__name__}", _salvage(data, self)) from None
        doc.pop(F.PRIMARY_BITMAP, None)
        doc.pop(F.SECONDARY_BITMAP, None)
        doc.pop("h", None)
        for k in self.binary_fields:
            v = doc.get(k)
            if v is not None:
                doc[k] = v.upper()
        return doc

    def encode(self, msg: Message) -> bytes:
        # pyiso8583 takes binary fields as hex text already.
        doc = {k: v for k, v in msg.items() if k not in (F.PRIMARY_BITMAP, F.SECONDARY_BITMAP)}
        try:
            raw, _ = _pyiso.encode(doc, self.spec)
        except _pyiso.EncodeError as e:
            raise EncodeError(str(e)) from None
        return bytes(raw)


def _salvage(data: bytes, dialect: Dialect) -> Message:
    """Read the MTI and field 11 from a frame that does not decode whole."""
    out: Message = {}
    try:
        mti = bytes(data[:4]).decode("ascii")
    except UnicodeDecodeError:
        return out
    if not (len(mti) == 4 and mti.isdigit()):
        return out
    out[F.MTI] = mti
    # Fields 2..10 precede 11; when the fields before it decode, so does 11.
    try:
        doc, _ = _pyiso.decode(bytes(data), dialect.spec)
    except _pyiso.DecodeError as e:
        doc = getattr(e, "doc_dec", {}) or {}
    except Exception:
        doc = {}
    stan = doc.get(F.STAN)
    if isinstance(stan, str) and len(stan) == 6 and stan.isdigit():
        out[F.STAN] = stan
    tid = doc.get(F.TERMINAL_ID)
    if isinstance(tid, str):
        out[F.TERMINAL_ID] = tid
    return out


ASCII = Dialect("ascii", _pyspecs.default_ascii)
BINARY = Dialect("binary", _pyspecs.default)

DIALECTS = {d.name: d for d in (ASCII, BINARY)}


def get_dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r} (known: {', '.join(DIALECTS)})") from None
