"""Dialects: how a message's fields become bytes.

A decoded message inside cardswitch is a ``dict[str, str]`` keyed like
pyiso8583 ("t" MTI, "2" PAN, ...), without bitmap keys. Binary-valued fields
(52, 55, 64, 128) are upper-case hex text whatever the dialect, so the
transaction logic never depends on the wire dialect: in the binary dialect
they are bytes on the wire, in the ASCII dialect hex text, accepted in either
case and always written upper case (wire.md 1).

``decode``/``encode`` use the compiled codec (:mod:`cardswitch.iso8583.fastcodec`);
``reference_decode``/``reference_encode`` run pyiso8583 itself with the same
normalisation, for differential tests and for specs the fast codec does not
compile. Both raise only :class:`DecodeError` / :class:`EncodeError` for bad
input (``TypeError`` for a wrong argument type).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import iso8583.specs as _pyspecs  # pyiso8583 (absolute import; our package is cardswitch.iso8583)

from cardswitch.iso8583.constants import BINARY_FIELDS
from cardswitch.iso8583.fastcodec import (
    DecodeError,
    EncodeError,
    FastCodec,
    Message,
    UnsupportedSpec,
    reference_decode,
    reference_encode,
)

__all__ = [
    "ASCII",
    "BINARY",
    "DIALECTS",
    "DecodeError",
    "Dialect",
    "EncodeError",
    "Message",
    "get_dialect",
]


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    spec: dict
    _codec: FastCodec | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            codec: FastCodec | None = FastCodec(self.spec, upper_fields=BINARY_FIELDS)
        except UnsupportedSpec:
            codec = None
        object.__setattr__(self, "_codec", codec)

    @property
    def binary_fields(self) -> tuple[str, ...]:
        """The binary-valued fields that are raw bytes on the wire in this dialect."""
        return tuple(k for k in BINARY_FIELDS if self.spec[k]["data_enc"] == "b")

    def decode(self, data: bytes) -> Message:
        """A frame's payload as a Message; DecodeError (with ``partial``) if it is not one."""
        codec = self._codec
        if codec is None:
            return reference_decode(data, self.spec, BINARY_FIELDS)
        return codec.decode(data)

    def encode(self, msg: Message) -> bytes:
        """A Message as bytes; EncodeError naming the field that cannot be written."""
        codec = self._codec
        if codec is None:
            return reference_encode(msg, self.spec, BINARY_FIELDS)
        return codec.encode(msg)

    def reference_decode(self, data: bytes) -> Message:
        """Same contract as ``decode``, done by pyiso8583 (slow; for tests)."""
        return reference_decode(data, self.spec, BINARY_FIELDS)

    def reference_encode(self, msg: Message) -> bytes:
        """Same contract as ``encode``, done by pyiso8583 (slow; for tests)."""
        return reference_encode(msg, self.spec, BINARY_FIELDS)


ASCII = Dialect("ascii", _pyspecs.default_ascii)
BINARY = Dialect("binary", _pyspecs.default)

DIALECTS = {d.name: d for d in (ASCII, BINARY)}


def get_dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r} (known: {', '.join(DIALECTS)})") from None
