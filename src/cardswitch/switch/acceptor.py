"""The terminal acceptor: the TCP listener terminals and acquiring hosts talk to.

A thin asyncio shell (``asyncio.Protocol``, uvloop-friendly) around the pure
pieces: ``FrameReader`` cuts frames, the ``Dialect`` decodes them, and the
handler (the transaction pipeline) turns each request into a response::

    class Handler:
        async def handle(self, msg: Message, conn: ConnInfo) -> Message | None: ...
        def format_error(self, partial: Message, reason: str) -> Message | None: ...  # optional

Behaviour on the wire (wire.md 2, 4):

- Many requests may be in flight on one connection; each is answered on that
  connection as soon as its handler returns (completion order). The fixed
  header received with a frame goes back with its response, TPDU-swapped.
- Length-0 frames are keep-alives: no answer.
- A frame that does not decode is answered where its MTI and field 11 can be
  read: by ``handler.format_error(partial, reason)`` when the handler has one,
  else with MTI+10, 39 = 30 echoing 11 and 41. Otherwise nothing is answered.
  The connection stays open.
- A handler that raises is logged and answered 96 (MTI+10 echoing the fields
  wire.md 4 echoes); the connection stays open.
- An oversized frame, a malformed 4ascii length, or a frame not completed
  within ``read_timeout_ms`` closes that connection only (requests read
  before it are answered first; nothing after it is read).
- Backpressure: at most ``max_inflight`` handlers run per connection; beyond
  that the connection stops being read until one finishes. Frames already
  read past the cap wait in a queue bounded by one read. Reading also pauses
  while the transport's write buffer is above its high-water mark (a
  terminal that sends but never reads cannot make the switch buffer
  without bound).
- Overload: at most ``max_total_inflight`` handlers run across all
  connections (default 10,000). A request decoded while that many run is
  shed: answered at once, without the handler, by ``handler.overloaded(msg)``
  when the handler has one, else MTI+10 with 39 = 91 (issuer or switch
  inoperative) echoing the wire.md 4 fields and 37. Nothing of it is kept,
  so a resend is processed normally. Shedding rather than pausing every
  connection keeps latency bounded and answers the terminal before its own
  timeout (which would cost a reversal). Memory stays bounded: handlers by
  the cap, queued frames by one read per connection, unread answers by the
  write-buffer pause above.
- Idle connections cost a protocol object and a socket, no task and no timer
  (the read timer runs only while part of a frame is held), so thousands of
  terminals may stay connected. ``start`` raises the process's open-file
  soft limit to its hard limit (``raise_nofile_limit``) so they fit.
- Repeated trouble (undecodable frames, framing errors, shed requests) is
  logged for the first few occurrences and then at every power of ten; the
  counters see every one.
- A terminal that half-closes its side after sending gets its answers, then
  the connection is closed.
- When the terminal goes away, its in-flight handlers still complete (they
  journal); their answers are dropped. Frames it sent that no handler had
  started yet are dropped with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cardswitch.config import Endpoint, LinkOptions
from cardswitch.iso8583.constants import RC, F
from cardswitch.iso8583.dialect import DecodeError, Message, get_dialect
from cardswitch.iso8583.framing import swap_tpdu
from cardswitch.switch.framed import FRAMING, STALLED, TOO_LARGE, FramedProtocol, framing_of, worth_logging
from cardswitch.switch.replies import error_response, is_request_mti

__all__ = ["Acceptor", "AcceptorStats", "ConnInfo", "error_response", "DEFAULT_MAX_INFLIGHT",
           "DEFAULT_MAX_TOTAL_INFLIGHT", "raise_nofile_limit"]

DEFAULT_MAX_INFLIGHT = 256            # handlers per connection (then reading pauses)
DEFAULT_MAX_TOTAL_INFLIGHT = 10_000   # handlers across connections (then requests are shed, 91)

log = logging.getLogger("cardswitch.acceptor")


@dataclass(slots=True)
class ConnInfo:
    """Who a request came from: passed to the handler with every message."""

    id: int                       # connection number, unique per Acceptor
    peer: str                     # "host:port" of the terminal or acquiring host
    connected_at: datetime        # UTC


@dataclass(slots=True)
class AcceptorStats:
    """Counters of one or more acceptors (pass the same object to share)."""

    connections_opened: int = 0
    connections_closed: int = 0
    frames_in: int = 0            # non-empty frames read (keep-alives not counted)
    frames_out: int = 0           # responses written
    too_large: int = 0            # declared length above max_frame: connection closed
    framing_errors: int = 0       # 4ascii length not digits, frame shorter than its header: closed
    stalled: int = 0              # partial frame not completed within read_timeout_ms: closed
    decode_errors: int = 0        # frames that did not decode (answered 30 where possible)
    handler_errors: int = 0       # handler raised (answered 96)
    encode_errors: int = 0        # a response that would not encode (answered 96 instead)
    responses_dropped: int = 0    # answers whose connection had gone
    read_pauses: int = 0          # times a connection stopped being read (backpressure)
    shed: int = 0                 # requests answered at once (91) because max_total_inflight ran


def raise_nofile_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file soft limit towards ``wanted`` (never above
    the hard limit); the soft limit now. Each terminal connection holds a file
    descriptor; distributions often start processes at a soft limit of 1024."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class _TerminalConn(FramedProtocol):
    def __init__(self, acc: "Acceptor", conn_id: int) -> None:
        super().__init__(acc._framing, acc._read_timeout_s, acc._loop)
        self.acc = acc
        self.info = ConnInfo(conn_id, "?", datetime.now(timezone.utc))
        self.inflight: dict[asyncio.Task, tuple[bytes, Message]] = {}
        self.backlog: deque[tuple[bytes, bytes]] = deque()
        self.read_paused = False
        self.write_paused = False
        self.is_lost = False
        self.close_when_idle = False   # EOF or framing error: answer what is in flight, then close
        self.gone: asyncio.Future | None = None   # set by Acceptor.stop to wait for the close

    # -- connection ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        acc = self.acc
        self.info.peer = _peer_text(transport.get_extra_info("peername"))
        acc._conns.add(self)
        acc.stats.connections_opened += 1
        if acc._stopping:  # accepted just before the listener closed
            self.close()

    def lost(self, exc: Exception | None) -> None:
        acc = self.acc
        self.is_lost = True
        acc.stats.connections_closed += 1
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        if self.backlog:
            n = len(self.backlog)
            acc._work -= n
            acc.stats.responses_dropped += n
            self.backlog.clear()
        if not self.inflight:
            acc._conns.discard(self)
        acc._check_drained()

    def frame_error(self, kind: str, detail: str) -> None:
        stats = self.acc.stats
        n = 0
        if kind == TOO_LARGE:
            stats.too_large += 1
            n = stats.too_large
        elif kind == STALLED:
            stats.stalled += 1
            n = stats.stalled
        elif kind == FRAMING:
            stats.framing_errors += 1
            n = stats.framing_errors
        if worth_logging(n):
            self.acc.log.warning("conn %d %s: %s; closing (%s: %d so far)", self.info.id, self.info.peer,
                                 detail, kind, n)

    def eof_received(self) -> bool | None:
        # A terminal that half-closes after sending still gets its answers.
        if self.inflight or self.backlog:
            self.close_when_idle = True
            return True
        return None

    def close_on_error(self) -> None:
        # Requests read before the bad frame are still answered; nothing more is read.
        if self.inflight or self.backlog:
            self.close_when_idle = True
            self._update_reading()
        else:
            self.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        acc = self.acc
        want_pause = (self.write_paused or acc._stopping or self.broken or bool(self.backlog)
                      or len(self.inflight) >= acc._max_inflight)
        if want_pause == self.read_paused or self.closed or self.transport is None:
            return
        self.read_paused = want_pause
        try:
            if want_pause:
                acc.stats.read_pauses += 1
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()
        except (RuntimeError, AttributeError):  # transport closing
            pass

    # -- requests ------------------------------------------------------------

    def frame_received(self, header: bytes, payload: bytes) -> None:
        acc = self.acc
        acc.stats.frames_in += 1
        if self.backlog or len(self.inflight) >= acc._max_inflight:
            self.backlog.append((header, payload))
            acc._work += 1
            self._update_reading()
            return
        self._dispatch(header, payload)

    def _dispatch(self, header: bytes, payload: bytes) -> None:
        acc = self.acc
        try:
            msg = acc._dialect.decode(payload)
        except DecodeError as e:
            self._undecodable(header, e)
            return
        if acc._running >= acc._max_total:
            self._shed(header, msg)
            return
        try:
            coro = acc._handle(msg, self.info, payload) if acc._wants_raw else acc._handle(msg, self.info)
            task = acc._loop.create_task(coro)
        except Exception as e:  # handle() is not a coroutine function
            self._handler_failed(msg, e)
            resp = error_response(msg, RC.SYSTEM_MALFUNCTION)
            if resp is not None:
                self._send(resp, header, msg)
            return
        self.inflight[task] = (header, msg)
        acc._work += 1
        acc._running += 1
        task.add_done_callback(self._done)
        if len(self.inflight) >= acc._max_inflight:
            self._update_reading()

    def _done(self, task: asyncio.Task) -> None:
        header, msg = self.inflight.pop(task)
        acc = self.acc
        acc._work -= 1
        acc._running -= 1
        if not task.cancelled():
            exc = task.exception()
            if exc is None:
                resp = task.result()
            else:
                self._handler_failed(msg, exc)
                resp = error_response(msg, RC.SYSTEM_MALFUNCTION)
            if resp is not None:
                try:
                    self._send(resp, header, msg)
                except Exception:
                    acc.log.exception("conn %d %s: cannot send a response", self.info.id, self.info.peer)
        backlog = self.backlog
        while backlog and len(self.inflight) < acc._max_inflight:
            h, p = backlog.popleft()
            acc._work -= 1
            self._dispatch(h, p)
        if self.read_paused:
            self._update_reading()
        if not self.inflight and not backlog:
            if self.closed:
                acc._conns.discard(self)
            elif self.close_when_idle:
                self.close()
        if acc._stopping:
            acc._check_drained()

    def _shed(self, header: bytes, msg: Message) -> None:
        """Answer at once without the handler: every handler slot of the switch is taken."""
        acc = self.acc
        acc.stats.shed += 1
        if worth_logging(acc.stats.shed):
            acc.log.warning("overloaded (%d requests in flight): %s stan=%s tid=%s answered %s (%d shed so far)",
                            acc._running, msg.get(F.MTI), msg.get(F.STAN), msg.get(F.TERMINAL_ID),
                            RC.ISSUER_INOPERATIVE, acc.stats.shed)
        resp: Message | None = None
        hook = acc._overloaded
        if hook is not None:
            try:
                resp = hook(msg)
            except Exception as exc:
                self._handler_failed(msg, exc)
                resp = None
        if resp is None:
            resp = error_response(msg, RC.ISSUER_INOPERATIVE, also=(F.RRN,))
        if resp is not None:
            self._send(resp, header, msg)

    def _handler_failed(self, msg: Message, exc: BaseException) -> None:
        self.acc.stats.handler_errors += 1
        self.acc.log.error(
            "conn %d %s: handler failed on %s stan=%s tid=%s: %s: %s; answering 96",
            self.info.id, self.info.peer, msg.get(F.MTI), msg.get(F.STAN), msg.get(F.TERMINAL_ID),
            type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))

    def _undecodable(self, header: bytes, e: DecodeError) -> None:
        acc = self.acc
        acc.stats.decode_errors += 1
        partial = e.partial
        mti = partial.get(F.MTI)
        answer = is_request_mti(mti) and F.STAN in partial
        if worth_logging(acc.stats.decode_errors):
            acc.log.warning("conn %d %s: undecodable frame (mti=%s stan=%s tid=%s): %.120s; %s (%d so far)",
                            self.info.id, self.info.peer, mti, partial.get(F.STAN),
                            partial.get(F.TERMINAL_ID), e.reason, "answering 30" if answer else "no answer",
                            acc.stats.decode_errors)
        if not answer:
            return
        resp: Message | None
        fe = acc._format_error
        if fe is not None:
            try:
                resp = fe(partial, e.reason)
            except Exception as exc:
                self._handler_failed(partial, exc)
                resp = error_response(partial, RC.FORMAT_ERROR)
        else:
            resp = error_response(partial, RC.FORMAT_ERROR)
        if resp is not None:
            self._send(resp, header, partial)

    def _send(self, resp: Message, header: bytes, request: Message) -> None:
        acc = self.acc
        try:
            payload = acc._dialect.encode(resp)
        except Exception as e:  # EncodeError, or a handler that returned something odd
            acc.stats.encode_errors += 1
            acc.log.error("conn %d %s: response %s stan=%s does not encode: %.120s; answering 96",
                          self.info.id, self.info.peer, _get(resp, F.MTI), _get(resp, F.STAN), e)
            fallback = error_response(request, RC.SYSTEM_MALFUNCTION)
            try:
                payload = acc._dialect.encode(fallback)  # type: ignore[arg-type]
            except Exception:
                return
        if self.write_frame(payload, swap_tpdu(header) if header else b""):
            acc.stats.frames_out += 1
        else:
            acc.stats.responses_dropped += 1


def _get(msg: Any, key: str) -> Any:
    return msg.get(key) if isinstance(msg, dict) else None


class Acceptor:
    """Serves terminals and acquiring hosts on one listening endpoint."""

    def __init__(
        self,
        listen: Endpoint,
        options: LinkOptions,
        handler: Any,
        *,
        stats: AcceptorStats | None = None,
        logger: logging.Logger | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_total_inflight: int = DEFAULT_MAX_TOTAL_INFLIGHT,
        reuse_port: bool = False,
        backlog: int = 1024,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        if max_total_inflight < 1:
            raise ValueError("max_total_inflight must be at least 1")
        self.listen = listen
        self.options = options
        self.stats = stats if stats is not None else AcceptorStats()
        self.log = logger or log
        self._handler = handler
        self._handle = handler.handle
        # A handler that checks MACs needs the bytes as received (macfield).
        self._wants_raw = bool(getattr(handler, "wants_raw", False))
        self._format_error = getattr(handler, "format_error", None)
        # Optional: the answer to a request shed under overload (sync, cheap).
        self._overloaded = getattr(handler, "overloaded", None)
        self._dialect = get_dialect(options.dialect)
        self._framing, _ = framing_of(options)
        self._read_timeout_s = options.read_timeout_ms / 1000.0
        self._max_inflight = max_inflight
        self._max_total = max_total_inflight
        self._running = 0             # handlers running, all connections (<= max_total_inflight)
        self._reuse_port = reuse_port
        self._backlog = backlog
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_TerminalConn] = set()
        self._next_id = 0
        self._work = 0                # handlers running + frames queued, all connections
        self._stopping = False
        self._drained: asyncio.Future | None = None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        raise_nofile_limit()
        self._server = await self._loop.create_server(
            self._protocol, self.listen.host, self.listen.port,
            reuse_address=True, reuse_port=self._reuse_port or None, backlog=self._backlog)
        self.log.info("listening on %s:%d (%s, %s framing)", self.listen.host, self.port,
                      self.options.dialect, self.options.framing)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("acceptor not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def connections(self) -> int:
        """Open connections."""
        return sum(1 for c in self._conns if not c.closed)

    @property
    def in_flight(self) -> int:
        """Requests being handled or queued, over all connections."""
        return self._work

    @property
    def handlers_running(self) -> int:
        """Requests being handled now, over all connections (capped by max_total_inflight)."""
        return self._running

    async def stop(self, drain_timeout: float = 5.0) -> bool:
        """Stop accepting, let in-flight requests finish and be answered, close.

        Connections stop being read at once. Handlers still running after
        ``drain_timeout`` seconds are cancelled (their answers are lost).
        Returns True when everything drained in time.
        """
        if self._server is None:
            return True
        loop = self._loop
        self._stopping = True
        self._server.close()
        for c in list(self._conns):
            c._update_reading()
        drained = True
        if self._work > 0:
            self._drained = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), drain_timeout)
            except asyncio.TimeoutError:
                drained = False
                tasks = [t for c in self._conns for t in c.inflight]
                self.log.warning("drain timeout after %.1f s: cancelling %d handlers", drain_timeout, len(tasks))
                for t in tasks:
                    t.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=1.0)
        # Close connections (buffered answers are flushed first) and wait for them to go.
        waiters = []
        for c in list(self._conns):
            if not c.is_lost:
                c.gone = loop.create_future()
                waiters.append(c.gone)
                c.close()
        if waiters:
            await asyncio.wait(waiters, timeout=1.0)
        for c in list(self._conns):
            if not c.is_lost and c.transport is not None:
                c.transport.abort()  # a peer that does not read its answers
        self._server = None
        self.log.info("stopped%s", "" if drained else " (drain timed out)")
        return drained

    # -- internals -----------------------------------------------------------

    def _protocol(self) -> _TerminalConn:
        self._next_id += 1
        return _TerminalConn(self, self._next_id)

    def _check_drained(self) -> None:
        d = self._drained
        if d is not None and self._work <= 0 and not d.done():
            d.set_result(None)
