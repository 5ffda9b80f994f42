"""Framing: where one message ends and the next begins on a byte stream.

Sans-I/O: ``FrameReader.feed(bytes)`` returns complete frames; the asyncio
layer only moves bytes. A frame is ``(header, payload)``.

On the wire (wire.md 2) each frame is a length prefix, then an optional fixed
header (e.g. a 5-byte TPDU), then the ISO 8583 message. The prefix counts the
bytes that follow it (fixed header and message, not the prefix itself) and is
either 2 bytes unsigned big-endian (``2byte``) or 4 ASCII digits (``4ascii``).
A length of 0 is a keep-alive: no frame, no answer. The fixed header of a
request goes back on its response with source and destination swapped
(:func:`swap_tpdu`).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("2byte", "4ascii")


class FrameTooLarge(ValueError):
    """A declared length above the maximum: the connection is to be closed."""

    frames: list[tuple[bytes, bytes]] = []   # set by FrameReader.feed (frames completed before)


class FramingError(ValueError):
    """A stream that is not framed as configured: the connection is to be closed."""

    frames: list[tuple[bytes, bytes]] = []   # set by FrameReader.feed (frames completed before)


@dataclass(frozen=True, slots=True)
class Framing:
    kind: str = "2byte"      # "2byte" | "4ascii"
    header_len: int = 0      # bytes of fixed header after the length (e.g. 5 for a TPDU)
    max_frame: int = 4096    # largest declared length accepted when reading

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown framing {self.kind!r} (known: {', '.join(KINDS)})")
        if self.header_len < 0:
            raise ValueError(f"header length {self.header_len} is negative")
        if self.max_frame < 1:
            raise ValueError(f"max_frame {self.max_frame} must be positive")

    @property
    def prefix_len(self) -> int:
        return 2 if self.kind == "2byte" else 4

    @property
    def capacity(self) -> int:
        """The largest length the prefix can express."""
        return 0xFFFF if self.kind == "2byte" else 9999

    def encode(self, payload: bytes, header: bytes = b"") -> bytes:
        """One frame: prefix, fixed header (exactly ``header_len`` bytes), payload."""
        if len(header) != self.header_len:
            raise FramingError(f"header of {len(header)} bytes, this framing has {self.header_len}")
        n = len(header) + len(payload)
        if n > self.capacity:
            raise FrameTooLarge(f"frame of {n} bytes does not fit a {self.kind} length")
        if self.kind == "2byte":
            return n.to_bytes(2, "big") + header + payload
        return b"%04d" % n + header + payload

    def keepalive(self) -> bytes:
        """A length-0 frame."""
        return b"\0\0" if self.kind == "2byte" else b"0000"


def swap_tpdu(header: bytes) -> bytes:
    """Echo a 5-byte TPDU (id, destination 2, source 2) with destination and source swapped.

    Any other header is echoed unchanged.
    """
    if len(header) == 5:
        return header[:1] + header[3:5] + header[1:3]
    return header


class FrameReader:
    """Accumulates bytes and yields whole frames. Length 0 is a keep-alive.

    ``feed`` raises :class:`FrameTooLarge` for a declared length above
    ``max_frame`` and :class:`FramingError` for a 4ascii prefix that is not 4
    digits or a frame shorter than its fixed header. The frames completed
    before the bad prefix in the same call are on the exception's ``frames``
    and are not returned again; the stream cannot be resynchronised, so every
    later ``feed`` raises again.
    """

    __slots__ = ("framing", "_buf", "_lensize", "_hl", "_max")

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self._buf = bytearray()
        self._lensize = framing.prefix_len
        self._hl = framing.header_len
        self._max = framing.max_frame

    @property
    def pending(self) -> int:
        """Bytes held of a frame not yet complete (0 when between frames)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[bytes, bytes]] = []
        ls = self._lensize
        hl = self._hl
        end = len(buf)
        pos = 0
        try:
            while end - pos >= ls:
                if ls == 2:
                    n = (buf[pos] << 8) | buf[pos + 1]
                else:
                    digits = bytes(buf[pos:pos + 4])
                    if not digits.isdigit():
                        raise FramingError(f"length prefix {digits!r} is not 4 ASCII digits")
                    n = int(digits)
                if n == 0:
                    pos += ls
                    continue
                if n > self._max:
                    raise FrameTooLarge(f"declared length {n} > {self._max}")
                if n < hl:
                    raise FramingError(f"frame of {n} bytes is shorter than its {hl}-byte header")
                start = pos + ls
                stop = start + n
                if stop > end:
                    break
                out.append((bytes(buf[start:start + hl]), bytes(buf[start + hl:stop])))
                pos = stop
        except (FrameTooLarge, FramingError) as e:
            del buf[:pos]
            e.frames = out
            raise
        if pos:
            del buf[:pos]
        return out
