"""Framing: where one message ends and the next begins on a byte stream.

Sans-I/O: ``FrameReader.feed(bytes)`` returns complete frames; the asyncio
layer only moves bytes. A frame is ``(header, payload)``.
"""

from __future__ import annotations

from dataclasses import dataclass


class FrameTooLarge(ValueError):
    pass


class FramingError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Framing:
    kind: str = "2byte"      # "2byte" | "4ascii"
    header_len: int = 0      # bytes of fixed header after the length (e.g. 5 for a TPDU)
    max_frame: int = 4096

    def encode(self, payload: bytes, header: bytes = b"") -> bytes:
        body = header + payload
        n = len(body)
        if self.kind == "2byte":
            if n > 0xFFFF:
                raise FrameTooLarge(f"frame of {n} bytes")
            return n.to_bytes(2, "big") + body
        if n > 9999:
            raise FrameTooLarge(f"frame of {n} bytes")
        return b"%04d" % n + body


def swap_tpdu(header: bytes) -> bytes:
    """Echo a 5-byte TPDU with destination and source swapped."""
    if len(header) == 5:
        return header[:1] + header[3:5] + header[1:3]
    return header


class FrameReader:
    """Accumulates bytes and yields whole frames. Length 0 is a keep-alive."""

    __slots__ = ("framing", "_buf", "_lensize")

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self._buf = bytearray()
        self._lensize = 2 if framing.kind == "2byte" else 4

    @property
    def pending(self) -> int:
        """Bytes held of a frame not yet complete (0 when between frames)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[bytes, bytes]] = []
        ls = self._lensize
        hl = self.framing.header_len
        while len(buf) >= ls:
            if ls == 2:
                n = (buf[0] << 8) | buf[1]
            else:
                digits = bytes(buf[:4])
                if not digits.isdigit():
                    raise FramingError(f"length prefix {digits!r} is not 4 ASCII digits")
                n = int(digits)
            if n > self.framing.max_frame:
                raise FrameTooLarge(f"declared length {n} > {self.framing.max_frame}")
            if len(buf) < ls + n:
                break
            if n == 0:
                del buf[:ls]
                continue
            frame = bytes(buf[ls:ls + n])
            del buf[:ls + n]
            if len(frame) < hl:
                raise FramingError(f"frame of {len(frame)} bytes is shorter than its {hl}-byte header")
            out.append((frame[:hl], frame[hl:]))
        return out
