"""A framed ISO 8583 connection as an ``asyncio.Protocol``: the shared shell
of the terminal acceptor and the bank links.

Bytes go into a ``FrameReader``; whole frames come out to ``frame_received``.
A frame that declares a length above the maximum, a malformed length prefix,
or a frame begun but not completed within the read timeout closes this
connection (``frame_error`` names which). The read timer is armed only while
part of a frame is held, and re-armed when a frame completes, so a slow
trickle cannot keep a stalled frame alive.
"""

from __future__ import annotations

import asyncio

from cardswitch.config import LinkOptions
from cardswitch.iso8583.framing import FrameReader, FrameTooLarge, Framing, FramingError

TOO_LARGE = "too_large"
FRAMING = "framing"
STALLED = "stalled"


def worth_logging(n: int) -> bool:
    """Whether the ``n``-th occurrence (from 1) of a repeated event gets a log
    line: the first five, then the 10th, 100th, 1000th, ... A peer sending a
    flood of bad frames costs a few log lines, not one per frame; the counters
    (metrics) still see every one."""
    if n <= 5:
        return True
    while n % 10 == 0:
        n //= 10
    return n == 1


def framing_of(options: LinkOptions) -> tuple[Framing, bytes]:
    """The Framing and the configured fixed header bytes of a listener or link."""
    try:
        header = bytes.fromhex(options.header) if options.header else b""
    except ValueError:
        raise ValueError(f"link header {options.header!r} is not hex") from None
    if options.framing not in ("2byte", "4ascii"):
        raise ValueError(f"unknown framing {options.framing!r} (known: 2byte, 4ascii)")
    return Framing(options.framing, len(header), options.max_frame), header


class FramedProtocol(asyncio.Protocol):
    """Subclasses implement ``frame_received`` and may override the other hooks."""

    def __init__(self, framing: Framing, read_timeout_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.framing = framing
        self.reader = FrameReader(framing)
        self.read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False           # close requested or connection lost: write nothing more
        self.broken = False           # a framing error: read nothing more
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []

    # -- hooks ---------------------------------------------------------------

    def frame_received(self, header: bytes, payload: bytes) -> None:
        raise NotImplementedError

    def frame_error(self, kind: str, detail: str) -> None:
        """A framing problem that closes the connection (kind: too_large, framing, stalled)."""

    def lost(self, exc: Exception | None) -> None:
        """The connection is gone (after ``closed`` is set and the timer cancelled)."""

    def close_on_error(self) -> None:
        """After a framing error (reading has stopped): close at once by default."""
        self.close()

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed or self.broken:
            return
        reader = self.reader
        try:
            frames = reader.feed(data)
        except (FrameTooLarge, FramingError) as e:
            # Frames completed before the bad prefix are still served, then we close.
            for header, payload in getattr(e, "frames", ()):
                self.frame_received(header, payload)
            self._fail(TOO_LARGE if isinstance(e, FrameTooLarge) else FRAMING, str(e))
            return
        for header, payload in frames:
            self.frame_received(header, payload)
        if self.closed or self.broken:
            return
        timer = self._timer
        if reader.pending:
            if timer is None or frames:
                if timer is not None:
                    timer.cancel()
                if self.read_timeout_s > 0:
                    self._timer = self.loop.call_later(self.read_timeout_s, self._stalled)
        elif timer is not None:
            timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.lost(exc)

    # -- helpers -------------------------------------------------------------

    def write_frame(self, payload: bytes, header: bytes = b"") -> bool:
        """Frame and queue for sending; False (nothing sent) when the connection is
        closing or gone.

        Frames written in one turn of the event loop leave in one ``write``
        (one system call), flushed at the start of the next turn: under load a
        bank link carries many requests per turn, and the syscall per frame
        was the largest single cost of a switched transaction.
        """
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return False
        out = self._out
        out.append(self.framing.encode(payload, header))
        if len(out) == 1:
            self.loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        t = self.transport
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if t is not None and not t.is_closing():
            t.write(data)

    def close(self) -> None:
        """Close after flushing what was already written."""
        self._flush()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    def _stalled(self) -> None:
        self._timer = None
        if not self.closed and not self.broken:
            self._fail(STALLED, f"partial frame of {self.reader.pending} bytes not completed "
                                f"within {self.read_timeout_s * 1000:.0f} ms")

    def _fail(self, kind: str, detail: str) -> None:
        self.broken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.frame_error(kind, detail)
        self.close_on_error()
